"""IDM cleaning as a stage: it cleans, rounds chain models, the run is incremental, the report shows it."""

from __future__ import annotations

import subprocess

import numpy as np
import pandas as pd
import pytest

from bfr_models import manifest
from bfr_models.idm import IDMConfig, idm_unet, load_idm, save_idm
from tests.conftest import BIN, face_like, write_png
from tests.test_fid import inception_cache, inception_files  # noqa: F401 (fixtures)

TINY = dict(crop=32, channels=(16, 32, 32), layers_per_block=1, attention=(8,), norm_groups=8)


def mildly_noisy_faces(folder, n: int, size: int, seed: int = 0):
    """Clean synthetic faces with mild sensor noise (sigma 6/255): the flaw a cleaner should remove."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        face = face_like(i, size).astype(float)
        write_png(folder / f"face{i:03d}.png", np.clip(face + rng.normal(0, 6, face.shape), 0, 255).round().astype(np.uint8))
    return folder


def test_clean_improves_quality_within_the_content_limit_over_two_rounds(tmp_path):
    from flows.idm import clean_flow, idm_train_flow

    hq = str(mildly_noisy_faces(tmp_path / "hq", 6, 192))
    out = str(tmp_path / "run")
    model = idm_train_flow(input=hq, out=out, resolution=192, **TINY, iters=250, batch_size=8, lr=3e-3, warmup=20,
                           preset="idm_noise", checkpoint_every=250, device="cpu")
    uri = clean_flow(input=hq, out=out, model=model, rounds=2, round_iters=5, round_batch_size=4, round_warmup=1,
                     steps=10, device="cpu")
    frame = manifest.read_manifest(uri)
    assert len(frame) == 6 and (frame["status"] == "ok").all()
    # the cleaned dataset: x* where accepted, x where not; its mean NIQE is lower, the low band is kept
    after = np.where(frame["replaced"], frame["niqe_after"], frame["niqe_before"])
    assert frame["replaced"].sum() >= 4, frame[["niqe_before", "niqe_after", "lowpass_psnr", "degraded", "reasons"]]
    assert after.mean() < frame["niqe_before"].mean() - 0.3
    assert (frame.loc[frame["replaced"], "lowpass_psnr"] >= 30).all()
    rejected = frame[~frame["replaced"]]
    assert (rejected["uri"] == rejected["source_uri"]).all() and rejected["reasons"].notna().all()
    index = manifest.read_index(uri)["config"]
    rounds = index["rounds"]
    assert [r["round"] for r in rounds] == [1, 2] and rounds[0]["model"] != rounds[1]["model"]
    second = load_idm(rounds[1]["model"])
    assert second.meta["source"]["round"] == 2 and second.meta["source"]["init"]["sha256"] == load_idm(model).sha256
    assert {r["metric"] for r in index["not_computed"]} == {"musiq", "lpips", "identity_cos", "fid"}
    # the thresholds (catalogs/acceptance/idm.yaml) and the set's calibration are recorded: without MUSIQ the
    # worst 15% of 6 by NIQE (one image, the highest NIQE) is "degraded" and had to improve by 0.3
    assert index["acceptance"]["max_niqe_increase"] == 0.1 and index["acceptance"]["max_lpips"] == 0.15
    cal = index["calibration"]
    assert cal["degraded_metric"] == "niqe" and cal["images_scored"] == 6 and cal["min_identity"] is None
    first_round = manifest.read_manifest(rounds[0]["manifest"])
    assert first_round["degraded"].sum() == 1
    assert first_round.loc[first_round["degraded"], "niqe_before"].item() == first_round["niqe_before"].max()
    gained = first_round["niqe_after"] - first_round["niqe_before"]
    content_kept = first_round["lowpass_psnr"].isna() | (first_round["lowpass_psnr"] >= 30)
    quality_rule = np.where(first_round["degraded"], gained <= -0.3, gained <= 0.1)
    assert (first_round["replaced"] == (quality_rule & content_kept)).all()

    from flows.report import report_flow

    html = open(report_flow(input=uri, out=str(tmp_path / "report.html"))).read()
    assert "Cleaning: clean" in html and "acceptance rate" in html and "NIQE before and after" in html
    assert "FID cleaned vs original not computed" in html


def test_clean_is_incremental_when_images_are_added(tmp_path):
    """100 images cleaned; 10 more arrive; the rerun processes only those 10; 110 rows, each once."""
    from flows.idm import clean_flow

    folder = tmp_path / "hq"
    folder.mkdir()
    for i in range(100):
        write_png(folder / f"img{i:03d}.png", face_like(i, 32))
    model = save_idm(idm_unet(IDMConfig(**TINY)), IDMConfig(**TINY), str(tmp_path / "model"))
    kwargs = dict(out=str(tmp_path / "run"), model=model, steps=2, shard_size=16, batch_size=16, device="cpu")
    uri = clean_flow(input=str(folder), **kwargs)
    first = manifest.read_index(uri)
    stage = tmp_path / "run" / uri.split("/run/")[1]
    shard_files = {s["name"]: (stage / s["path"]).read_bytes() for s in first["shards"]}
    assert first["rows"] == 100 and len(shard_files) > 1
    for i in range(100, 110):
        write_png(folder / f"img{i:03d}.png", face_like(i, 32))
    again = clean_flow(input=str(folder), **kwargs)
    assert again == uri  # the same stage folder: the stage key does not depend on the folder's content
    second = manifest.read_index(uri)
    frame = manifest.read_manifest(uri)
    assert second["rows"] == 110 and frame["source_uri"].is_unique and len(frame) == 110
    assert (frame["dtype"] == "fp32").all()  # the CPU default precision, on every row
    # every earlier shard is kept byte for byte; the new shards hold exactly the 10 new images
    for name, data in shard_files.items():
        path = next(s["path"] for s in second["shards"] if s["name"] == name)
        assert (stage / path).read_bytes() == data
    new = [s for s in second["shards"] if s["name"] not in shard_files]
    rows = pd.concat([pd.read_parquet(stage / s["path"]) for s in new])
    assert sorted(rows["source_uri"].str.rsplit("/", n=1).str[-1]) == [f"img{i:03d}.png" for i in range(100, 110)]


def test_clean_refuses_bf16_and_compile_on_the_cpu_before_any_work(tmp_path):
    from bfr_models.device import DeviceError
    from flows.idm import plan_clean

    for dtype, compile, message in (("bf16", False, "--dtype bf16 needs a CUDA device"),
                                    (None, True, "--compile needs a CUDA device")):
        with pytest.raises(DeviceError, match=message):
            plan_clean(str(tmp_path / "nowhere"), str(tmp_path / "no-model"), 1, 10, "posterior", 1, "original",
                       dtype, "cpu", compile)


def test_set_calibration_is_computed_once_and_kept_when_images_are_added(tmp_path):
    """The 'degraded' cut is the rank of the set first seen: added images do not move it (earlier verdicts stay
    valid); other rules are another calibration."""
    from bfr_models.idm import AcceptanceConfig
    from flows.idm import _frozen_calibration
    from tasks.shards import list_inputs

    folder = mildly_noisy_faces(tmp_path / "hq", 4, 192)
    out = str(tmp_path / "run")
    items = list_inputs(str(folder))[0]
    first = _frozen_calibration(str(folder), out, items, AcceptanceConfig(), False, False, "cpu", 4)
    assert first.degraded_metric == "niqe" and first.images_scored == 4 and first.degraded_cut is not None
    mildly_noisy_faces(tmp_path / "more", 2, 192, seed=1)
    for f in (tmp_path / "more").iterdir():
        f.rename(folder / f"new_{f.name}")
    items = list_inputs(str(folder))[0]
    assert len(items) == 6
    assert _frozen_calibration(str(folder), out, items, AcceptanceConfig(), False, False, "cpu", 4) == first
    other = _frozen_calibration(str(folder), out, items, AcceptanceConfig(degraded_fraction=0.5), False, False,
                                "cpu", 4)
    assert other.images_scored == 6


def test_clean_cli_bad_inputs_fail_in_one_line(tmp_path):
    folder = mildly_noisy_faces(tmp_path / "hq", 1, 32)

    def run(*args):
        p = subprocess.run([str(BIN / "bfr-curate"), *args], capture_output=True, text=True)
        return p.returncode, p.stderr.strip()

    rc, err = run("clean", "--input", str(folder), "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert rc == 2 and "no idm.json" in err and len(err.splitlines()) == 1
    bad = tmp_path / "accept.yaml"
    bad.write_text("max_lowpass_lpips: 0.15\n")
    rc, err = run("clean", "--input", str(folder), "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"),
                  "--acceptance", str(bad))
    assert rc == 2 and "unknown field(s) max_lowpass_lpips" in err and len(err.splitlines()) == 1
    rc, err = run("schedule", "demo", "--cron", "0 25 * * *")
    assert rc == 2 and "not a valid cron string" in err and len(err.splitlines()) == 1
    rc, err = run("idm", "train", "--input", str(folder), "--out", str(tmp_path / "o"), "--resolution", "64",
                  "--channels", "16,32", "--attention", "8", "--norm-groups", "8")
    assert rc == 2 and "attention resolutions" in err and len(err.splitlines()) == 1


def test_clean_runs_a_model_at_its_resolution_and_says_what_each_check_rejected(tmp_path, capsys):
    """A model trained at 32 px cleans 192-px faces at 32 px (resized in and back, recorded per row); the console
    says how many rows each check rejected, that the images were resized, and which checks were skipped for
    want of their weights (MUSIQ, LPIPS, FaceNet are not in the test's model cache)."""
    from flows.cli import main

    hq = mildly_noisy_faces(tmp_path / "hq", 2, 192)
    model = save_idm(idm_unet(IDMConfig(**TINY)), IDMConfig(**TINY), str(tmp_path / "model"),
                     source={"resolution": 32})  # untrained: its outputs fail some checks
    assert load_idm(model).resolution == 32
    capsys.readouterr()
    assert main(["clean", "--input", str(hq), "--model", model, "--out", str(tmp_path / "run"), "--steps", "2",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    uri = out.split("manifest: ")[1].split()[0].rsplit("/", 1)[0]
    frame = manifest.read_manifest(uri)
    assert (frame["model_px"] == 32).all() and frame["resized"].all() and (frame["width"] == 192).all()
    rounds = manifest.read_index(uri)["config"]["rounds"]
    rejected = frame["rejected_by"].dropna().str.split(",").explode().value_counts().to_dict()
    assert rounds[0]["rejected_by"] == rejected and rounds[0]["resized"] == 2
    assert "rejected by: " + (", ".join(f"{k} {v}" for k, v in rounds[0]["rejected_by"].items()) or "no check") in out
    assert "2 images resized to the model's 32x32 px and back" in out
    assert "not computed (their checks skipped): musiq (weights missing: bfr-curate models pull musiq_koniq)" in out
    assert "lpips (weights missing" in out and "identity_cos (weights missing" in out


def test_clean_fid_comes_from_the_shards_feature_files(tmp_path, inception_cache):
    """With the Inception weights cached, each clean shard writes the FID features of its cleaned and original
    images; the flow sums them once into the index's FID. A missing feature file is extracted again from the
    shard's images and gives the same FID."""
    from bfr_models.manifest import ShardInfo
    from flows.idm import _fid_cleaned_vs_original, clean_flow

    folder = tmp_path / "hq"
    for i in range(4):
        write_png(folder / f"img{i}.png", face_like(i, 32))
    model = save_idm(idm_unet(IDMConfig(**TINY)), IDMConfig(**TINY), str(tmp_path / "model"))
    uri = clean_flow(input=str(folder), out=str(tmp_path / "run"), model=model, steps=1, shard_size=2, batch_size=2,
                     device="cpu")
    index = manifest.read_index(uri)
    record = index["config"]["set_metrics"]["fid_cleaned_vs_original"]
    files = sorted((tmp_path / "run" / uri.split("/run/")[1] / "fid").glob("*.npz"))
    assert len(index["shards"]) >= 2 and len(files) == 2 * len(index["shards"])  # cleaned and original per shard
    # 32-px faces have no quality score (NIQE needs 96-px blocks, no MUSIQ here): every x* is rejected, so the
    # cleaned set is the original set and their FID is 0 (to rounding)
    assert not manifest.read_manifest(uri)["replaced"].any()
    assert record["fid_n"] == 4 and record["fid"] == pytest.approx(0, abs=1e-3)
    for f in files:
        f.unlink()
    again = _fid_cleaned_vs_original(uri, [ShardInfo(**s) for s in index["shards"]], "cpu")
    assert again["fid_cleaned_vs_original"]["fid"] == pytest.approx(record["fid"], rel=1e-6, abs=1e-6)
    assert len(list((tmp_path / "run" / uri.split("/run/")[1] / "fid").glob("*.npz"))) == len(files)


def test_clean_rounds_on_dask_local_train_on_a_worker(tmp_path):
    """`clean --rounds 2 --dask local`: round 2's model is trained as one task on a worker process (its
    metadata says which), beside the cleaning shards."""
    hq = mildly_noisy_faces(tmp_path / "hq", 4, 32)
    model = save_idm(idm_unet(IDMConfig(**TINY)), IDMConfig(**TINY), str(tmp_path / "model"),
                     source={"resolution": 32})
    proc = subprocess.Popen([str(BIN / "bfr-curate"), "clean", "--input", str(hq), "--model", model, "--out",
                             str(tmp_path / "run"), "--steps", "2", "--rounds", "2", "--round-iters", "3",
                             "--round-batch-size", "4", "--device", "cpu", "--dask", "local"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    uri = out.split("manifest: ")[1].split()[0].rsplit("/", 1)[0]
    second = load_idm(manifest.read_index(uri)["config"]["rounds"][1]["model"])
    worker = second.meta["source"]["worker"]
    assert worker.rsplit(":", 1)[1] != str(proc.pid) and second.meta["source"]["round"] == 2


def test_the_model_clean_warms_is_the_one_its_plan_flow_and_shards_use(tmp_path):
    """What the console command loads while Prefect starts (flows/warm.py) is what the command's plan, its flow
    and its shard task then find in their caches: the IDM model is read from disk once."""
    from bfr_models import storage
    from flows.cli import main
    from flows.idm import clean_scorers
    from tasks.clean import cached_idm, cached_scorer, warm

    hq = mildly_noisy_faces(tmp_path / "hq", 2, 32)
    model = save_idm(idm_unet(IDMConfig(**TINY)), IDMConfig(**TINY), str(tmp_path / "model"))
    cached_idm.cache_clear()
    cached_scorer.cache_clear()
    warm(storage.normalize(model), "cpu", *clean_scorers(None, None, None, None, []))
    assert cached_idm.cache_info().misses == 1
    assert main(["clean", "--input", str(hq), "--model", model, "--out", str(tmp_path / "run"), "--steps", "1",
                 "--device", "cpu"]) == 0
    # no second load: the plan (in the command and in the flow), the flow and the shard found the warmed ones
    assert cached_idm.cache_info().misses == 1 and cached_idm.cache_info().hits >= 4
    assert cached_scorer.cache_info().misses == 0  # no MUSIQ, LPIPS nor FaceNet weights here: none built
