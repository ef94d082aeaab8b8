"""Scale: bounded concurrency of recipes, per-stage code versions, balanced shards."""

from __future__ import annotations

import datetime as dt
import hashlib
import shutil
import statistics
from pathlib import Path

import yaml

from flows.cli import main
from tasks.shards import InputItem, code_version, make_shards, module_files
from tests.conftest import REPO


def _task_runs_since(start: dt.datetime) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterStartTime
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:
        return client.read_task_runs(task_run_filter=TaskRunFilter(start_time=TaskRunFilterStartTime(after_=start)),
                                     sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=200)


def test_recipe_with_one_worker_never_runs_two_shards_at_once(image_folder, tmp_path, capsys):
    recipe = tmp_path / "small.yaml"
    recipe.write_text(yaml.safe_dump({"name": "small", "photos": str(image_folder),
                                      "degrade": {"preset": "gfpgan", "shard_size": 2},
                                      "score": {"metrics": "niqe", "shard_size": 2}}))
    start = dt.datetime.now(dt.timezone.utc)
    assert main(["run", str(recipe), "--out", str(tmp_path / "run"), "--workers", "1", "--device", "cpu"]) == 0
    assert "score degrade: 6 rows (6 ok, 0 error)" in capsys.readouterr().out
    runs = _task_runs_since(start)
    for name in ("degrade-shard", "score-shard"):  # task runs of both stages, read back from the Prefect API
        spans = sorted((r.start_time, r.end_time) for r in runs if r.name.startswith(name))
        assert len(spans) >= 3
        # with --workers 1 each shard starts after the previous one ended (a subflow's default runner ran all at once)
        assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:])), spans


def _copy_code(dest: Path) -> Path:
    for package in ("bfr_models", "tasks"):
        shutil.copytree(REPO / package, dest / package, ignore=shutil.ignore_patterns("__pycache__", "*.npz", "*.pt"))
    return dest


def test_stage_code_version_covers_only_the_modules_the_stage_runs(tmp_path):
    root = _copy_code(tmp_path / "code")
    files = {p.relative_to(root).as_posix() for p in module_files("tasks.degrade", root)}
    assert {"tasks/degrade.py", "bfr_models/degradations/presets.py", "tasks/rows.py"} <= files
    assert "bfr_models/report/page.py" not in files and "tasks/score.py" not in files
    before = code_version("tasks.degrade", root)
    page = root / "bfr_models" / "report" / "page.py"
    page.write_text(page.read_text() + "\n# typo fixed\n")
    (root / "tasks" / "score.py").write_text((root / "tasks" / "score.py").read_text() + "\n# another stage\n")
    code_version.cache_clear()
    assert code_version("tasks.degrade", root) == before  # editing elsewhere keeps the degrade cache
    kernels = root / "bfr_models" / "degradations" / "kernels.py"  # imported through the presets, transitively
    kernels.write_text(kernels.read_text() + "\n# a real change\n")
    code_version.cache_clear()
    assert code_version("tasks.degrade", root) != before


def _uris(n: int, prefix: str = "s3://ffhq/images/") -> list[str]:
    return [prefix + hashlib.sha256(str(i).encode()).hexdigest()[:16] + ".png" for i in range(n)]


def _shards(uris: list[str], size: int):
    return make_shards("degrade", {"p": 1}, [InputItem(uri=u, version="v") for u in sorted(uris)], size)


def test_shards_are_balanced_and_adding_images_changes_few(tmp_path):
    size = 256
    uris = _uris(10_000)
    shards = _shards(uris, size)
    lengths = [len(s.items) for s in shards]
    assert sum(lengths) == 10_000
    assert all(size // 2 <= n <= 2 * size for n in lengths[:-1])
    assert 0.7 * size <= statistics.median(lengths) <= 1.3 * size
    # a new batch of 1% (a new folder: the names sort together) changes under 5% of the shards
    new = _shards(uris + _uris(100, "s3://ffhq/images/2026-12-03/"), size)
    changed = {s.key for s in shards} - {s.key for s in new}
    assert len(changed) < 0.05 * len(shards)
    # 1% added at random places: beyond the shards they land in, at most a few others change
    scattered = _uris(10_100)[10_000:]
    grown = _shards(uris + scattered, size)
    added = set(scattered)
    fresh = [s for s in grown if s.key not in {x.key for x in shards}]
    ripple = [s for s in fresh if not added & {i.uri for i in s.items}]
    assert len(ripple) <= 3


def _slow_shard(spec, stage_uri: str, batch_size: int) -> dict:
    """A shard task that takes 0.7 s per batch of images and reports each batch (as the image stages do)."""
    import time
    from dataclasses import asdict

    from bfr_models.imageio import encode_png
    from bfr_models.manifest import ManifestWriter
    from tasks.rows import decode_items, ok_row, same_size_batches, write_output
    from tasks.shards import read_many

    writer = ManifestWriter(stage_uri)
    decoded, rows = decode_items("slow", spec.items, read_many([i.uri for i in spec.items]))
    for batch in same_size_batches(decoded, batch_size, shard=spec.key):
        time.sleep(0.7)
        for item, parent_id, rgb, _ in batch:
            png = encode_png(rgb)
            rows.append(ok_row("slow", item, parent_id, write_output(writer, png, parent_id), rgb))
    return asdict(writer.write_shard(spec.key, rows))


def test_the_progress_bar_moves_per_batch_inside_a_shard(image_folder, tmp_path, capsys):
    """One shard of 6 images in batches of 2: the bar shows 2/6 and 4/6 while the shard runs, not only 6/6."""
    import re

    from prefect import flow, task

    from flows.stage import run_stage
    from tasks.runtime import shard_cache_key
    from tasks.shards import list_inputs

    slow = task(name="slow-shard", cache_key_fn=shard_cache_key, persist_result=True)(_slow_shard)

    @flow(name="slow-stage")
    def slow_stage() -> str:
        items, _ = list_inputs(str(image_folder))
        return run_stage(slow, "slow", {}, items, str(image_folder), str(tmp_path / "run"), shard_size=100,
                         batch_size=2)

    slow_stage()
    shown = {int(n) for n in re.findall(r"slow:[^\r\n]*?\| (\d)/6 ", capsys.readouterr().err)}
    assert {2, 4, 6} <= shown, shown
