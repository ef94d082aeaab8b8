"""The degrade stage end to end: real Prefect (embedded server), real Parquet, real codecs."""

import json
import os
import signal
import subprocess
import time

import pyarrow as pa
import pyarrow.parquet as pq

from bfr_models import manifest, storage
from bfr_models.imageio import decode_rgb
from bfr_models.degradations import load_preset
from flows.degrade import degrade_flow
from tasks.degrade import degradation_seed
from tasks.shards import derived_seed
from tests.conftest import BIN, REPO, face_like, task_states, write_png


def test_degrade_writes_manifest_and_second_run_is_cached(image_folder, tmp_path):
    out = str(tmp_path / "run")
    kwargs = dict(input=str(image_folder), out=out, preset="gfpgan", seed=7, shard_size=2, batch_size=4,
                  device="cpu")
    first = degrade_flow(**kwargs, return_state=True)
    uri = first.result()
    df = manifest.read_manifest(uri)
    assert len(df) == 6 and (df["status"] == "ok").all()
    assert df["image_id"].is_unique and df["parent_uri"].nunique() == 6
    for row in df.itertuples():
        data = storage.read_bytes(row.uri)
        assert storage.sha256_hex(data) == row.sha256
        rgb, _ = decode_rgb(data)
        assert rgb.shape == (row.height, row.width, 3) == (64, 64, 3)  # GFPGAN resizes back
        params = json.loads(row.params)
        assert {"seed", "jpeg_quality"} <= set(params) or "jpeg" in json.dumps(params)
    n_shards = len(manifest.read_index(uri)["shards"])
    assert task_states(first) == ["Completed"] * n_shards

    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("shards/*.parquet")}
    second = degrade_flow(**kwargs, return_state=True)
    assert second.result() == uri
    assert task_states(second) == ["Cached"] * n_shards  # no shard work the second time
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_same_seed_gives_byte_identical_images(image_folder, tmp_path):
    def run(out, seed, scale=8):
        uri = degrade_flow(input=str(image_folder), out=str(tmp_path / out), preset="dr2", split="severe",
                           scale=scale, seed=seed, shard_size=3, batch_size=2, device="cpu")
        df = manifest.read_manifest(uri).sort_values("parent_uri")
        return [storage.read_bytes(u) for u in df["uri"]], df

    a, dfa = run("a", 1)
    b, dfb = run("b", 1)
    c, _ = run("c", 2)
    assert a == b and dfa["params"].tolist() == dfb["params"].tolist()
    assert all(x != y for x, y in zip(a, c))
    p = json.loads(dfa["params"].iloc[0])
    assert p["noise_type"] in ("gaussian", "laplace", "poisson")
    _, dfd = run("d", 1, scale=4)  # the same image at another scale: its own seed (stream, noise type)
    assert all(x != y for x, y in zip(dfa["seed"], dfd["seed"]))


def test_a_shards_batches_give_the_same_bytes_in_turn_and_cut_over_two_lanes(image_folder, tmp_path):
    # a lone shard cuts each batch into one part per CPU lane (bfr_models.device.split_on_lanes)
    from bfr_models.device import set_cpu_lanes
    from tasks.degrade import degrade_shard
    from tasks.shards import ShardSpec, list_inputs

    spec = ShardSpec("degrade", "k", tuple(list_inputs(str(image_folder))[0]))

    def images(lanes: int) -> list[bytes]:
        set_cpu_lanes(lanes)
        try:
            result = degrade_shard.fn(spec, "gfpgan", None, None, 3, str(tmp_path / f"on{lanes}"), "cpu", 5)
        finally:
            set_cpu_lanes(1)
        rows = pq.read_table(tmp_path / f"on{lanes}" / result["path"]).to_pylist()
        return [storage.read_bytes(row["uri"]) for row in sorted(rows, key=lambda row: row["parent_uri"])]

    in_turn = images(1)
    assert len(in_turn) == 6 and in_turn == images(2)


def test_degradation_seed_joins_split_and_scale():
    """DR2's 3 splits x 3 scales give one image 9 seeds; their draws differ; presets without them keep theirs."""
    seeds = {(split, scale): degradation_seed(1, "dr2", split, scale, "img0")
             for split in ("mild", "medium", "severe") for scale in (4, 8, 16)}
    assert len(set(seeds.values())) == 9
    assert degradation_seed(1, "dr2", "mild", 8.0, "img0") == seeds[("mild", 8)]
    presets = {key: load_preset("dr2", *key) for key in seeds}
    draws = [presets[key].sample(s) for key, s in seeds.items()]
    # the relative position in each split's noise range (the old seed gave all 9 the same one)
    where = {round((d["noise_sigma"] - lo) / (hi - lo), 9) for d, (lo, hi) in
             zip(draws, (presets[k].config["noise"]["sigma"] for k in seeds))}
    assert len({d["noise_type"] for d in draws}) > 1 and len(where) == 9
    assert degradation_seed(7, "gfpgan", None, None, "img0") == derived_seed(7, "degrade", "gfpgan", "img0")


def test_bad_inputs_become_error_rows_and_the_run_completes(bad_folder, tmp_path):
    uri = degrade_flow(input=str(bad_folder), out=str(tmp_path / "run"), preset="gfpgan", shard_size=4,
                       device="cpu")
    df = manifest.read_manifest(uri)
    by_name = {os.path.basename(r.parent_uri): r for r in df.itertuples()}
    assert set(by_name) == {p.name for p in bad_folder.iterdir()}  # nothing disappears
    errors = {n for n, r in by_name.items() if r.status == "error"}
    assert errors == {"zero.png", "truncated.jpg", "text.png", "huge.png"}
    assert all(by_name[n].error for n in errors)
    for name in ("ok.png", "gray16.png", "rgb16.png", "cmyk.jpg", "rgba.png", "gray.png"):
        assert by_name[name].status == "ok" and by_name[name].width == 64


def test_s3_input_and_output(image_folder, s3_bucket):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.put(str(image_folder), f"{s3_bucket}/inputs/faces", recursive=True)
    uri = degrade_flow(input=f"{s3_bucket}/inputs/faces", out=f"{s3_bucket}/run1", preset="gfpgan",
                       shard_size=4, device="cpu")
    assert uri.startswith(f"{s3_bucket}/run1/degrade/")
    df = manifest.read_manifest(uri)
    assert len(df) == 6 and (df["status"] == "ok").all()
    for row in df.itertuples():
        assert row.uri.startswith("s3://") and storage.sha256_hex(fs.cat(row.uri)) == row.sha256
    # a manifest on S3 is itself a valid input for the next stage
    again = degrade_flow(input=uri, out=f"{s3_bucket}/run2", preset="dr2", split="mild", scale=4, device="cpu")
    df2 = manifest.read_manifest(again)
    assert set(df2["parent_id"]) == set(df["image_id"])


def _cli(*args, **kw):
    return subprocess.run([str(BIN / "bfr-curate"), *args], capture_output=True, text=True, cwd=REPO, **kw)


def test_kill_and_resume(tmp_path):
    folder = tmp_path / "many"
    for i in range(16):
        write_png(folder / f"f{i:02d}.png", face_like(i, size=96))
    out = tmp_path / "run"
    cmd = [str(BIN / "bfr-curate"), "degrade", "--input", str(folder), "--preset", "gfpgan", "--out", str(out),
           "--shard-size", "1", "--workers", "1", "--device", "cpu"]
    (tmp_path / "tmp").mkdir()  # what a killed command leaves in its temporary folder stays with the test
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "TMPDIR": str(tmp_path / "tmp")})
    deadline = time.time() + 240
    while time.time() < deadline and len(list(out.rglob("shards/*.parquet"))) < 3:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group, embedded Prefect server included
    proc.wait()
    done_before = {p: p.stat().st_mtime_ns for p in out.rglob("shards/*.parquet")}
    bytes_before = {p: p.read_bytes() for p in done_before}
    assert 3 <= len(done_before) < 16 and not list(out.rglob("index.json"))

    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    stage = next(out.rglob("index.json")).parent
    df = manifest.read_manifest(str(stage))
    assert len(df) == 16 and df["parent_uri"].is_unique and (df["status"] == "ok").all()
    # shards finished before the kill were not recomputed; the kill may fall between a shard's file and its
    # Prefect result record (at most --workers shards): such a shard is recomputed, to the same rows. Only
    # its `worker` column differs: the host:pid of the process that made it
    rewritten = [p for p, mtime in done_before.items() if p.stat().st_mtime_ns != mtime]
    assert len(rewritten) <= 1, rewritten
    for path, data in bytes_before.items():
        if path in rewritten:
            before, after = (pq.read_table(pa.BufferReader(b)) for b in (data, path.read_bytes()))
            assert before.drop_columns(["worker"]).equals(after.drop_columns(["worker"]))
        else:
            assert path.read_bytes() == data


def test_cli_errors_are_one_line_and_manifest_show(image_folder, tmp_path):
    bad = _cli("degrade", "--input", str(image_folder), "--preset", "nope", "--out", str(tmp_path))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "nope" in bad.stderr
    bad = _cli("degrade", "--input", str(tmp_path / "missing"), "--preset", "gfpgan", "--out", str(tmp_path))
    assert bad.returncode == 2 and "input not found" in bad.stderr
    ok = _cli("degrade", "--input", str(image_folder), "--preset", "gfpgan", "--out", str(tmp_path / "o"),
              "--device", "cpu")
    assert ok.returncode == 0, ok.stderr[-2000:]
    index = next((tmp_path / "o").rglob("index.json"))
    assert str(index) in ok.stdout
    shown = _cli("manifest", "show", str(index.parent))
    assert shown.returncode == 0 and "rows:     6  ok 6  error 0" in shown.stdout
    listed = _cli("presets")
    assert listed.returncode == 0 and "gfpgan" in listed.stdout and "dr2" in listed.stdout


def test_stage_run_is_named_tagged_with_untagged_shards_and_publishes_its_summary(image_folder, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.run_info import call_flow

    state = call_flow(degrade_flow, input=str(image_folder), out=str(tmp_path / "run"), preset="dr2", split="mild",
                      scale=4, shard_size=4, device="cpu", return_state=True)
    index = manifest.read_index(state.result())
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
        artifacts = client.request("POST", "/artifacts/filter", json={
            "flow_runs": {"id": {"any_": [str(run.id)]}}, "limit": 10, "offset": 0, "sort": "CREATED_DESC"}).json()
        shard_runs = client.request("POST", "/task_runs/filter", json={
            "flow_runs": {"id": {"any_": [str(run.id)]}}, "limit": 10, "offset": 0}).json()
    assert run.name == f"degrade {image_folder.parent.name}/{image_folder.name} (preset dr2, split mild, scale 4)"
    assert {"stage:degrade", "preset:dr2"} <= set(run.tags)
    # shard runs untagged: Prefect would ask for a tag concurrency slot before each (flows/stage.py, untagged).
    # One run per shard of the index: how many there are depends on the files' paths (content-defined cuts).
    assert len(shard_runs) == len(index["shards"]) >= 1
    assert all(r["name"].startswith("degrade-shard") and r["tags"] == [] for r in shard_runs)
    (summary,) = artifacts
    assert summary["key"] == f"degrade-{index['key']}" and str(image_folder) in summary["description"]
    assert [(r["rows"], r["ok"], r["error"]) for r in json.loads(summary["data"])] == [(6, 6, 0)]


def test_dask_local_runs_the_shards_in_worker_processes(image_folder, tmp_path):
    """`--dask local` from the console: a LocalCluster of worker processes (sharing the command's Prefect API)
    runs every shard; each row names the worker process that made it, never the command's own."""
    proc = subprocess.Popen([str(BIN / "bfr-curate"), "degrade", "-i", str(image_folder), "--preset", "gfpgan",
                             "-o", str(tmp_path / "o"), "--device", "cpu", "--dask", "local", "--workers", "2",
                             "--shard-size", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    index = next((tmp_path / "o").rglob("index.json"))
    frame = manifest.read_manifest(str(index.parent))
    assert len(frame) == 6 and (frame["status"] == "ok").all()
    pids = {worker.rsplit(":", 1)[1] for worker in frame["worker"]}
    assert pids and str(proc.pid) not in pids and set(frame["device"]) == {"cpu"}
