"""`bfr-curate gc`: removes what no current index references, and nothing else."""

from __future__ import annotations

import os
import time

from bfr_models import manifest
from flows.cli import main
from flows.degrade import degrade_flow


def test_gc_removes_old_versions_only(image_folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    kwargs = dict(input=str(image_folder), out=str(out), preset="gfpgan", seed=7, shard_size=2, device="cpu")
    uri = degrade_flow(**kwargs)
    stage = out / "degrade" / os.path.basename(uri)
    old_shards = {p.name for p in (stage / "shards").iterdir()}
    old_results = {p.name for p in (stage / "_prefect").iterdir()}
    assert {n.removesuffix(".parquet") for n in old_shards} <= old_results  # results are named by the shard key
    monkeypatch.setattr("flows.stage.code_version", lambda module: "a-new-version")  # as after a code edit
    assert degrade_flow(**kwargs) == uri
    rows = manifest.read_manifest(uri)
    (stage / "images" / "orphan.png").write_bytes(b"an image an earlier version wrote")
    (stage / "notes.txt").write_text("not ours to remove")
    partial = out / "degrade" / "partial"  # a run that has not written its index yet
    (partial / "shards").mkdir(parents=True)
    (partial / "shards" / "x.parquet").write_bytes(b"in progress")
    past = time.time() - 3600
    for path in [*stage.rglob("*"), *partial.rglob("*")]:
        os.utime(path, (past, past))
    os.utime(stage / "index.json", (past + 60, past + 60))

    assert main(["gc", str(out), "--min-age", "0"]) == 0  # dry run
    said = capsys.readouterr().out
    n_old = len(old_shards)
    assert f"would remove {2 * n_old + 1} files" in said and f"{n_old} shards, 1 images, {n_old} _prefect" in said
    assert (stage / "images" / "orphan.png").exists() and {p.name for p in (stage / "shards").iterdir()} >= old_shards

    assert main(["gc", str(out), "--delete"]) == 0  # the default --min-age (10 min): these files are 1 h old
    assert f"removed {2 * n_old + 1} files" in capsys.readouterr().out
    assert not old_shards & {p.name for p in (stage / "shards").iterdir()}
    assert not (stage / "images" / "orphan.png").exists()
    assert (stage / "notes.txt").exists() and (partial / "shards" / "x.parquet").exists()
    after = manifest.read_manifest(uri)
    assert after.equals(rows) and all(os.path.exists(u) for u in after["uri"])  # the current version is intact

    # a folder written after its index (a run in progress) is skipped whole; fresh files are kept
    (stage / "images" / "orphan.png").write_bytes(b"new")
    assert main(["gc", str(out), "--min-age", "0"]) == 0
    assert "a run in progress or interrupted" in capsys.readouterr().out
    os.utime(stage / "images" / "orphan.png", (past, past))
    os.utime(stage / "index.json", (time.time(), time.time()))
    assert main(["gc", str(out)]) == 0
    assert "would remove 1 files" in capsys.readouterr().out
    os.utime(stage / "images" / "orphan.png", (time.time() - 60, time.time() - 60))
    os.utime(stage / "index.json", (time.time(), time.time()))
    assert main(["gc", str(out)]) == 0
    assert "would remove 0 files" in capsys.readouterr().out
