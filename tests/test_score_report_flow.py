"""Score and report end to end: real Prefect, Parquet, metrics with weights the test builds."""

import io
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from PIL import Image, ImageFilter

from bfr_models import manifest, models, storage
from bfr_models.manifest import ManifestWriter
from bfr_models.metrics import fid as F
from bfr_models.metrics.musiq import build_musiq_arch
from flows.report import report_flow
from flows.score import plan_score, score_flow
from tasks.rows import content_id
from tests.conftest import face_like, install_models


def _state_bytes(module: torch.nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return buf.getvalue()


@pytest.fixture
def weights(monkeypatch, tmp_path):
    torch.manual_seed(0)
    return install_models(monkeypatch, tmp_path, {
        "lpips_vgg16_backbone": _state_bytes(torchvision.models.vgg16(weights=None)),
        "musiq_koniq": _state_bytes(build_musiq_arch()),
        "fid_inception_pytorch": _state_bytes(F.FIDInceptionV3()),
    })


def _png(rgb) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def degraded_manifest(tmp_path):
    """HQ faces and blurred LQ children, written as a manifest with parents."""
    w = ManifestWriter(str(tmp_path / "lq"))
    rows = []
    for i in range(5):
        hq = face_like(0, size=192)  # one face, blurred more and more
        hq_uri = w.write_image(f"hq{i}", _png(hq))
        lq = np.asarray(Image.fromarray(hq).filter(ImageFilter.GaussianBlur(1 + i)))
        data = _png(lq)
        uri = w.write_image(content_id(data, f"hq{i}"), data)
        rows.append({"image_id": content_id(data, f"hq{i}"), "uri": uri, "sha256": storage.sha256_hex(data), "width": 192,
                     "height": 192, "parent_id": f"hq{i}", "parent_uri": hq_uri, "stage": "degrade",
                     "split": "mild" if i < 3 else "severe", "status": "ok"})
    rows.append({"image_id": "bad", "parent_uri": "/nowhere.png", "stage": "degrade", "status": "error",
                 "error": "empty file (0 bytes)"})
    w.write_index("degrade", "k", {}, [w.write_shard("s", rows)])
    return str(tmp_path / "lq")


def test_score_adds_columns_records_conventions_and_caches(weights, degraded_manifest, tmp_path):
    before = (tmp_path / "lq" / "shards" / "s.parquet").read_bytes()
    kwargs = dict(input=degraded_manifest, out=str(tmp_path / "out"), metrics="niqe,musiq,lpips,psnr,ssim,fid",
                  fid_ref=degraded_manifest, fid_convention="legacy_pytorch", fid_allow_small=True,
                  device="cpu", shard_size=2)
    state = score_flow(**kwargs, return_state=True)
    uri = state.result()
    df = manifest.read_manifest(uri).set_index("image_id")
    assert (tmp_path / "lq" / "shards" / "s.parquet").read_bytes() == before  # input untouched
    assert df.loc["bad", "status"] == "error" and len(df) == 6
    ok = df[df["status"] == "ok"]
    assert ok[["niqe", "musiq", "lpips", "psnr", "ssim"]].notna().all().all()
    # PSNR by hand for one row
    row = ok.iloc[0]
    a = np.asarray(Image.open(io.BytesIO(storage.read_bytes(row["uri"]))), dtype=np.float64)
    b = np.asarray(Image.open(io.BytesIO(storage.read_bytes(row["parent_uri"]))), dtype=np.float64)
    assert row["psnr"] == pytest.approx(10 * np.log10(255**2 / np.mean((a - b) ** 2)), abs=1e-6)
    # more blur -> lower PSNR and SSIM
    by_blur = ok.sort_values("parent_id")
    assert by_blur["psnr"].is_monotonic_decreasing and by_blur["ssim"].is_monotonic_decreasing
    config = manifest.read_index(uri)["config"]
    assert set(config["conventions"]) == {"niqe", "musiq", "lpips", "psnr", "ssim", "fid"}
    assert config["set_metrics"]["fid_convention"] == "legacy_pytorch"
    assert config["set_metrics"]["fid"] == pytest.approx(0.0, abs=1e-3)  # the set against itself

    from tests.conftest import task_states

    again = score_flow(**kwargs, return_state=True)
    assert again.result() == uri and set(task_states(again)) == {"Cached"}

    report_state = report_flow(input=uri, out=str(tmp_path / "report.html"), return_state=True)
    html = open(report_state.result()).read()
    assert html.count("<svg") >= 5 and "data:image/png;base64" in html
    assert "legacy_pytorch" in html and "empty file (0 bytes)" in html
    # the same summary is published on the flow run as Prefect artifacts (read back from the API)
    from prefect.client.orchestration import get_client

    def artifacts(state):
        run_id = str(state.state_details.flow_run_id)
        with get_client(sync_client=True) as client:
            return client.request("POST", "/artifacts/filter", json={
                "flow_runs": {"id": {"any_": [run_id]}}, "limit": 10, "offset": 0, "sort": "CREATED_DESC"}).json()

    key = manifest.read_index(uri)["key"]  # one pair of cards per scored set, not two shared by every report
    assert {(a["key"], a["type"]) for a in artifacts(report_state)} == {
        (f"quality-summary-{key}", "table"), (f"quality-report-{key}", "markdown")}
    # the score stage publishes its own summary: rows, ok/error and each metric's mean
    (summary,) = artifacts(state)
    assert summary["key"] == f"score-{key}" and summary["type"] == "table"
    rows = {r["split"]: r for r in json.loads(summary["data"])}
    assert [(s, r["rows"], r["ok"], r["error"]) for s, r in rows.items()] == [
        ("-", 1, 0, 1), ("mild", 3, 3, 0), ("severe", 2, 2, 0), ("all", 6, 5, 1)]
    assert rows["all"]["mean_psnr"] == pytest.approx(ok["psnr"].mean(), abs=1e-3) and "fid" in summary["description"]


def test_bad_score_arguments_fail_before_work(weights, degraded_manifest, tmp_path, monkeypatch):
    common = dict(reference=None, fid_ref=None, niqe_convention="pyiqa", crop_border=0, y_channel=False,
                  lpips_net="vgg", fid_convention="clean", skip_missing=False)
    with pytest.raises(ValueError, match="unknown metric brisque"):
        plan_score(degraded_manifest, "niqe,brisque", **common)
    with pytest.raises(ValueError, match="unknown NIQE convention 'octave'"):
        plan_score(degraded_manifest, "niqe", **{**common, "niqe_convention": "octave"})
    # the old name of the official LIVE computequality.m convention is accepted and recorded under the new one
    config = plan_score(degraded_manifest, "niqe", **{**common, "niqe_convention": "matlab"})[0]
    assert config.niqe_convention == "live_computequality"
    with pytest.raises(ValueError, match="fid needs --fid-ref"):
        plan_score(degraded_manifest, "fid", **{**common, "fid_convention": "legacy_pytorch"})
    with pytest.raises(ValueError, match="rank-deficient below 2048"):
        plan_score(degraded_manifest, "fid", **{**common, "fid_convention": "legacy_pytorch",
                                               "fid_ref": degraded_manifest})
    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / "a.png").write_bytes(_png(face_like(1)))
    with pytest.raises(ValueError, match="needs a reference"):
        plan_score(str(folder), "psnr", **common)
    small = tmp_path / "small"
    small.mkdir()
    (small / "a.png").write_bytes(_png(face_like(1)[:32, :32]))
    with pytest.raises(ValueError, match="sizes differ"):
        plan_score(str(folder), "psnr", **{**common, "reference": str(small)})
    # the clean-convention Inception is not installed: a one-line error naming the file and the command
    with pytest.raises(models.ModelMissingError) as err:
        plan_score(degraded_manifest, "fid", **{**common, "fid_ref": degraded_manifest})
    assert "\n" not in str(err.value) and "inception-2015-12-05.pt" in str(err.value)
    assert "bfr-curate models pull fid_inception_clean" in str(err.value)
    _, _, skip, not_computed = plan_score(degraded_manifest, "niqe,fid", **{**common, "skip_missing": True})
    assert skip == ["fid"] and not_computed[0]["needs"] == "inception-2015-12-05.pt"


def test_scoring_a_folder_identifies_images_by_content_and_name(tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    files = {}
    for i in range(2):
        data = _png(face_like(i, size=192))
        (folder / f"f{i}.png").write_bytes(data)
        files[str(folder / f"f{i}.png")] = data
    uri = score_flow(input=str(folder), out=str(tmp_path / "out"), metrics="niqe", device="cpu")
    df = manifest.read_manifest(uri)
    assert len(df) == 2 and (df["status"] == "ok").all() and df["niqe"].notna().all()
    for row in df.itertuples():
        assert row.sha256 == storage.sha256_hex(files[row.uri]) and row.image_id == content_id(files[row.uri], row.uri.rsplit("/", 1)[1])


def test_fid_features_are_read_once_per_shard_and_the_index_written_once(weights, degraded_manifest, tmp_path,
                                                                       monkeypatch):
    reads, index_writes = [], []
    read, write = storage.read_bytes, storage.write_bytes_atomic
    monkeypatch.setattr(storage, "read_bytes", lambda uri, *a, **k: reads.append(str(uri)) or read(uri, *a, **k))
    monkeypatch.setattr(storage, "write_bytes_atomic",
                        lambda uri, *a, **k: index_writes.append(str(uri)) or write(uri, *a, **k))
    uri = score_flow(input=degraded_manifest, out=str(tmp_path / "out"), metrics="fid", fid_ref=degraded_manifest,
                     fid_convention="legacy_pytorch", fid_allow_small=True, device="cpu", shard_size=2)
    index = manifest.read_index(uri)
    feature_reads = [r for r in reads if "/fid/" in r]
    assert len(index["shards"]) >= 2
    assert sorted(feature_reads) == sorted(f"{uri}/fid/{s['name']}.npz" for s in index["shards"])  # each once
    assert index["config"]["set_metrics"]["fid_n"] == 5
    assert index["config"]["set_metrics"]["fid"] == pytest.approx(0.0, abs=1e-3)  # same set as the reference
    assert [w for w in index_writes if w.endswith("/index.json")] == [f"{uri}/index.json"]  # written once
    # a feature file removed since its shard ran is extracted again from the shard's images
    lost = f"{uri}/fid/{index['shards'][0]['name']}.npz"
    os.remove(lost)
    again = score_flow(input=degraded_manifest, out=str(tmp_path / "out"), metrics="fid", fid_ref=degraded_manifest,
                       fid_convention="legacy_pytorch", fid_allow_small=True, device="cpu", shard_size=2)
    assert os.path.exists(lost)
    assert manifest.read_index(again)["config"]["set_metrics"]["fid"] == pytest.approx(
        index["config"]["set_metrics"]["fid"], abs=1e-3)


def test_an_image_too_small_for_niqe_keeps_its_other_metrics(tmp_path):
    inputs, refs = tmp_path / "lq", tmp_path / "hq"
    inputs.mkdir()
    refs.mkdir()
    for name, size in (("big.png", 192), ("small.png", 64)):
        hq = face_like(0, size=size)
        (refs / name).write_bytes(_png(hq))
        (inputs / name).write_bytes(_png(np.asarray(Image.fromarray(hq).filter(ImageFilter.GaussianBlur(2)))))
    uri = score_flow(input=str(inputs), out=str(tmp_path / "out"), metrics="niqe,psnr", reference=str(refs),
                     device="cpu")
    df = manifest.read_manifest(uri).set_index("uri")
    small, big = df.loc[str(inputs / "small.png")], df.loc[str(inputs / "big.png")]
    assert small["status"] == "ok" and np.isnan(small["niqe"]) and np.isfinite(small["psnr"])
    assert small["score_notes"].startswith("niqe: NIQE needs at least two 96x96 blocks")
    assert big["status"] == "ok" and np.isfinite(big["niqe"]) and pd.isna(big["score_notes"])


def test_a_lone_score_shard_gives_the_same_rows_and_features_on_two_lanes_as_in_turn(weights, tmp_path, monkeypatch):
    import flows.threads

    folder = tmp_path / "faces"
    folder.mkdir()
    for i in range(6):
        (folder / f"f{i}.png").write_bytes(_png(face_like(i, size=192)))
    runs = {}
    for lanes in (1, 2):  # what the stage's rule gives a lone shard on 1 core, on 2
        monkeypatch.setattr(flows.threads, "cpu_lanes", lambda *a, lanes=lanes, **k: lanes)
        uri = score_flow(input=str(folder), out=str(tmp_path / f"out{lanes}"), metrics="niqe,musiq,fid",
                         fid_ref=str(folder), fid_convention="legacy_pytorch", fid_allow_small=True, device="cpu",
                         batch_size=2)
        index = manifest.read_index(uri)
        assert len(index["shards"]) == 1
        (shard,) = index["shards"]
        features = np.load(io.BytesIO(storage.read_bytes(f"{uri}/fid/{shard['name']}.npz")))
        runs[lanes] = (manifest.read_manifest(uri)[["image_id", "status", "niqe", "musiq"]],
                       {k: features[k] for k in features.files})
    (rows1, feats1), (rows2, feats2) = runs[1], runs[2]
    assert (rows1["status"] == "ok").all() and rows1["musiq"].nunique() == 6
    pd.testing.assert_frame_equal(rows1, rows2, check_exact=True)
    # the Inception features FID is computed from (FID itself passes through a matrix square root whose last
    # bits follow the BLAS kernels)
    assert feats1.keys() == feats2.keys() and all(np.array_equal(feats1[k], feats2[k]) for k in feats1)


def test_the_networks_score_warms_are_the_ones_its_shards_and_fid_use(weights, tmp_path):
    """What the console command loads while Prefect starts (flows/warm.py) is what the shard task and the set's
    FID then find in their caches: each network is built once."""
    from tasks import score as S

    folder = tmp_path / "faces"
    folder.mkdir()
    for i in range(3):
        (folder / f"f{i}.png").write_bytes(_png(face_like(i, size=64)))
    opts = dict(input=str(folder), metrics="musiq,fid", reference=None, fid_ref=str(folder), niqe_convention="pyiqa",
                crop_border=0, y_channel=False, lpips_net="vgg", fid_convention="legacy_pytorch", skip_missing=False,
                fid_allow_small=True)
    config, _, skip, _ = plan_score(**opts)
    S._suite.cache_clear()
    S.extractor.cache_clear()
    S.warm(config.as_dict(), skip, "cpu")
    assert S._suite.cache_info().misses == 1 and S.extractor.cache_info().misses == 1
    score_flow(out=str(tmp_path / "out"), device="cpu", **opts)
    # no second build: the shard and the set's FID (the reference's features, the shards') found the warmed ones
    assert S._suite.cache_info().misses == 1 and S._suite.cache_info().hits >= 1
    assert S.extractor.cache_info().misses == 1 and S.extractor.cache_info().hits >= 2
