"""`bfr-curate finetune` and `restore` end to end: pseudo-target pairs in, a restorer, a log, a report section out."""

from __future__ import annotations

import io
import os
import socket

import pandas as pd
import pytest
import torch
import yaml

from bfr_models import manifest, storage
from bfr_models.imageio import encode_png
from bfr_models.manifest import ManifestWriter
from flows.cli import main
from tests.conftest import face_like, install_models, write_png

SMALL = dict(iters=12, batch_size=4, micro_batch=2, lr=1e-3, lr_min=1e-4, lpips_net="alex", d_num_feat=8,
             checkpoint_every=6, validate_every=6, val_pairs=2)


@pytest.fixture()
def lpips_alex(monkeypatch, tmp_path):
    import torchvision

    torch.manual_seed(0)
    state = {k: v for k, v in torchvision.models.alexnet(weights=None).state_dict().items() if k.startswith("features.")}
    buf = io.BytesIO()
    torch.save(state, buf)
    return install_models(monkeypatch, tmp_path, {"lpips_alex_backbone": buf.getvalue()})


def pairs_manifest(tmp_path, n: int = 8, odd_size: bool = False, gate_failed: int = 0) -> tuple[str, str]:
    """Faces -> a real degrade stage -> a hand-written pseudo-target manifest (target = the face, one error row;
    with ``gate_failed``, that many targets failed the quality gate)."""
    from flows.degrade import degrade_flow

    faces = tmp_path / "faces"
    faces.mkdir()
    for i in range(n):
        write_png(faces / f"f{i}.png", face_like(i, 32))
    lq = degrade_flow(input=str(faces), out=str(tmp_path / "run"), preset="idm", device="cpu")
    writer = ManifestWriter(storage.join(str(tmp_path / "run"), "pseudo-targets", "handmade"))
    rows = []
    for k, r in enumerate(manifest.read_manifest(lq).to_dict("records")):
        size = 48 if odd_size and k == 0 else 32
        png = encode_png(face_like(int(r["parent_uri"].rsplit("f", 1)[1].split(".")[0]), size))
        image_id = storage.sha256_hex(png)[:20]
        rows.append({"image_id": image_id, "uri": writer.write_image(image_id, png), "sha256": storage.sha256_hex(png),
                     "width": size, "height": size, "parent_id": r["image_id"], "parent_uri": r["uri"],
                     "stage": "pseudo-targets", "status": "ok",
                     **({"gate": "fail" if k < gate_failed else "pass"} if gate_failed else {})})
    rows.append({"image_id": "e" * 20, "parent_uri": str(faces / "broken.png"), "stage": "pseudo-targets",
                 "status": "error", "error": "pseudo-targets: the sampler produced non-finite values"})
    writer.write_index("pseudo-targets", "handmade", {}, [writer.write_shard("s0", rows)])
    return writer.stage_uri, str(faces)


def config_file(tmp_path, **changes) -> str:
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump({**SMALL, **changes}))
    return str(path)


def test_finetune_then_restore_then_report(tmp_path, lpips_alex, capsys):
    pairs, faces = pairs_manifest(tmp_path)
    rc = main(["finetune", "--pairs", pairs, "--restorer", "small", "--real", faces, "--out", str(tmp_path / "run"),
               "--config", config_file(tmp_path), "--device", "cpu"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "6 training pairs, 2 held out (1 error or gate-failed rows skipped)" in text
    stage = text.split("manifest: ")[1].split()[0].rsplit("/", 1)[0]
    index = manifest.read_index(stage)
    log = pd.read_parquet(io.BytesIO(storage.read_bytes(index["config"]["log_uri"])))
    assert log["step"].max() == 12 and log["val_psnr_gt"].notna().sum() == 3  # steps 0, 6, 12
    frame = manifest.read_manifest(stage)
    assert len(frame) == 2 and {"psnr", "ssim", "lpips", "psnr_gt"} <= set(frame.columns)
    assert set(frame["worker"]) == {f"{socket.gethostname()}:{os.getpid()}"} and set(frame["device"]) == {"cpu"}
    # the fine-tuned restorer is a checkpoint `restore` (and pseudo-targets --restorer) can use
    rc = main(["restore", "--input", str(tmp_path / "faces"), "--restorer", index["config"]["restorer_uri"], "--out", str(tmp_path / "run"),
               "--device", "cpu"])
    assert rc == 0 and "restore: 8 rows (8 ok, 0 error)" in capsys.readouterr().out
    # the same command again resumes nothing and recomputes nothing (cached task)
    assert main(["finetune", "--pairs", pairs, "--restorer", "small", "--real", faces, "--out", str(tmp_path / "run"),
                 "--config", config_file(tmp_path), "--device", "cpu"]) == 0
    from flows.report import report_flow

    html = open(report_flow(input=stage, out=str(tmp_path / "r.html"))).read()
    assert "Fine-tuning: finetune" in html and "validation PSNR" in html and "<polyline" in html


@pytest.mark.parametrize("case, match", [
    ("iters0", "iters must be >= 1"),
    ("sizes", "pairs whose sizes differ"),
    ("reals", "fewer than the batch"),
    ("spandrel", "spandrel can load: "),
])
def test_finetune_bad_input_is_one_line_before_work(tmp_path, lpips_alex, capsys, case, match):
    pairs, faces = pairs_manifest(tmp_path, odd_size=case == "sizes")
    args = ["finetune", "--pairs", pairs, "--restorer", "small", "--real", faces, "--out", str(tmp_path / "o"),
            "--config", config_file(tmp_path), "--device", "cpu"]
    if case == "iters0":
        args += ["--iters", "0"]
    if case == "reals":
        args[args.index(faces)] = str(tmp_path / "two")
        (tmp_path / "two").mkdir()
        for i in range(2):
            write_png(tmp_path / "two" / f"r{i}.png", face_like(i, 32))
    if case == "spandrel":
        torch.save({"conv.weight": torch.zeros(3, 3, 3, 3)}, tmp_path / "mystery.pth")
        args[args.index("small")] = str(tmp_path / "mystery.pth")
    capsys.readouterr()  # the degrade stage's progress bar
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()  # nothing was written: it failed before any work


def test_finetune_offline_without_lpips_then_restore_runs_it_at_its_resolution(tmp_path, capsys):
    """No LPIPS backbone in the model cache: finetune refuses in one line naming --no-lpips; with the flag it warns
    and trains L1 + GAN. The restorer file records its 32-px training size; `restore` on 48-px faces applies it at
    32 px and back, says so, and each row records model_px and resized."""
    pairs, faces = pairs_manifest(tmp_path)
    out = str(tmp_path / "run")
    args = ["finetune", "--pairs", pairs, "--restorer", "small", "--real", faces, "--out", out, "--device", "cpu",
            "--config", config_file(tmp_path, iters=2, checkpoint_every=2, validate_every=2)]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "lpips_alex_backbone" in err and "finetune --no-lpips" in err and len(err.splitlines()) == 1
    assert main(args + ["--no-lpips"]) == 0
    captured = capsys.readouterr()
    assert "warning: --no-lpips: the LPIPS term is dropped" in captured.err
    assert "(trained at 32 px" in captured.out
    index = manifest.read_index(captured.out.split("manifest: ")[1].split()[0].rsplit("/", 1)[0])["config"]
    assert index["finetune"]["lpips_weight"] == 0 and index["no_lpips"] and index["resolution"] == 32
    big = tmp_path / "big"
    for i in range(2):
        write_png(big / f"b{i}.png", face_like(i, 48))
    assert main(["restore", "--input", str(big), "--restorer", index["restorer_uri"], "--out", out,
                 "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "trained at 32x32 px: 2 of 2 images of other sizes were resized to 32 px for it and back" in text
    frame = manifest.read_manifest(text.split("manifest: ")[1].split()[0].rsplit("/", 1)[0])
    assert (frame["model_px"] == 32).all() and frame["resized"].all() and (frame["width"] == 48).all()
