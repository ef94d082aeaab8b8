import json

import pyarrow.parquet as pq
import pytest

from bfr_models import manifest, storage
from bfr_models.manifest import ManifestError, ManifestWriter
from tasks.shards import InputItem, make_shards


def _rows(n, stage="degrade"):
    return [{"image_id": f"id{i}", "uri": f"/x/{i}.png", "stage": stage, "status": "ok", "seed": i,
             "params": json.dumps({"sigma": i})} for i in range(n)]


def test_shards_index_and_read_back(tmp_path):
    w = ManifestWriter(str(tmp_path / "stage"))
    a = w.write_shard("a", _rows(3))
    b = w.write_shard("b", _rows(2))
    w.write_index("degrade", "k1", {"preset": "x"}, [a, b])
    df = manifest.read_manifest(str(tmp_path / "stage"))
    assert len(df) == 5 and list(df.columns[: len(manifest.CORE_COLUMNS)]) == manifest.CORE_COLUMNS
    assert a.sha256 == storage.sha256_hex((tmp_path / "stage" / "shards" / "a.parquet").read_bytes())
    # no temp files left behind by the atomic writes
    assert not [p for p in (tmp_path / "stage").rglob("*.tmp")]


def test_extra_metric_columns_are_kept(tmp_path):
    rows = _rows(2)
    rows[0]["niqe"] = 4.5
    rows[1]["niqe"] = 5.5
    w = ManifestWriter(str(tmp_path))
    w.write_index("score", "k", {}, [w.write_shard("s", rows)])
    df = manifest.read_manifest(str(tmp_path))
    assert df["niqe"].tolist() == [4.5, 5.5]


def test_incomplete_stage_and_unknown_version_are_rejected(tmp_path):
    w = ManifestWriter(str(tmp_path))
    info = w.write_shard("s", _rows(1))
    with pytest.raises(ManifestError, match="no complete manifest"):
        manifest.read_manifest(str(tmp_path))
    w.write_index("degrade", "k", {}, [info])
    index = json.loads((tmp_path / "index.json").read_text())
    index["schema_version"] = 99
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(ManifestError, match="schema version 99"):
        manifest.read_manifest(str(tmp_path))
    table = pq.read_table(tmp_path / "shards" / "s.parquet")
    pq.write_table(table.replace_schema_metadata({b"bfr_curate.schema_version": b"7"}), tmp_path / "v7.parquet")
    with pytest.raises(ManifestError, match="schema version 7"):
        manifest.read_manifest(str(tmp_path / "v7.parquet"))


def test_shards_are_stable_when_images_are_added():
    items = [InputItem(uri=f"/data/img_{i:04d}.png", version="v") for i in range(300)]
    before = make_shards("degrade", {"p": 1}, items, shard_size=16)
    more = sorted(items + [InputItem(uri=f"/data/new_{i:02d}.png", version="v") for i in range(10)],
                  key=lambda i: i.uri)
    after = make_shards("degrade", {"p": 1}, more, shard_size=16)
    assert sum(len(s.items) for s in after) == 310
    unchanged = {s.key for s in before} & {s.key for s in after}
    # the new files all sort together, so only the shards around them change
    assert len(unchanged) >= len(before) - 3
    changed_config = make_shards("degrade", {"p": 2}, items, shard_size=16)
    assert not {s.key for s in before} & {s.key for s in changed_config}
