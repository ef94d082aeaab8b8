"""Restorer fine-tuning: it learns, it resumes after a kill exactly where it stopped, SwinIR's size, bad configs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from bfr_models.restorers import SmallRestorer, SwinIRRestorer
from bfr_models.training.finetune import FinetuneConfig, FinetuneError, Pairs, finetune, load_finetune_config
from bfr_models.training.state import STATE_FILE, load_state
from tests.conftest import REPO


def synthetic_pairs(n: int, size: int = 32, seed: int = 0) -> Pairs:
    """Smooth 'faces' and a known degradation (blur, a contrast/brightness shift, mild noise): a restorer can
    learn to undo most of it."""
    g = torch.Generator().manual_seed(seed)
    clean = F.interpolate(torch.rand(n, 3, size // 4, size // 4, generator=g), size=size, mode="bicubic",
                          align_corners=False).clamp(0, 1)
    blurred = F.avg_pool2d(F.pad(clean, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    lq = (0.7 * blurred + 0.2 + 0.02 * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    return Pairs(lq=lq, target=clean, gt=clean)


def test_defaults_are_the_papers():
    c = load_finetune_config()
    assert (c.l1_weight, c.lpips_weight, c.gan_weight, c.lpips_net) == (1.0, 0.1, 0.1, "vgg")
    assert (c.iters, c.batch_size, c.micro_batch, c.accumulation) == (20000, 16, 4, 4)
    assert (c.lr, c.lr_min, c.weight_decay, c.d_num_feat, c.d_skip_connection) == (2e-5, 5e-6, 0.0, 64, True)
    assert c == FinetuneConfig()  # the dataclass defaults and the catalog agree


def test_swinir_has_the_papers_parameter_count():
    n = sum(p.numel() for p in SwinIRRestorer().parameters())
    assert round(n / 1e6, 2) == 15.79


@pytest.mark.parametrize("override, match", [
    ({"iters": 0}, "iters must be >= 1"),
    ({"batch_size": 6, "micro_batch": 4}, "multiple of micro_batch"),
    ({"precision": "fp8"}, "precision"),
    ({"nonsense": 1}, "unknown key 'nonsense'"),
])
def test_bad_config_is_one_line(override, match):
    with pytest.raises(FinetuneError, match=match) as e:
        load_finetune_config(**override)
    assert "\n" not in str(e.value)


def test_real_set_smaller_than_a_micro_batch_is_refused(tmp_path):
    pairs = synthetic_pairs(4)
    with pytest.raises(FinetuneError, match="fewer than a micro-batch"):
        finetune(SmallRestorer(8, 1), pairs, None, pairs.target[:2], FinetuneConfig(iters=1, micro_batch=4, batch_size=4,
                                                                                    lpips_weight=0), str(tmp_path))


def test_small_restorer_learns(tmp_path):
    """A few hundred steps on synthetic pairs: validation L1 falls well below its start (the identity)."""
    train, val = synthetic_pairs(48, seed=1), synthetic_pairs(8, seed=2)
    config = FinetuneConfig(iters=300, batch_size=16, micro_batch=8, lr=3e-3, lr_min=3e-4, lpips_weight=0.0,
                            gan_weight=0.0, validate_every=100, checkpoint_every=300)
    log = finetune(SmallRestorer(16, 2), train, val, train.target, config, str(tmp_path))
    v = log.dropna(subset=["val_l1"])
    assert v["step"].tolist() == [0, 100, 200, 300]
    assert v["val_l1"].iloc[-1] < 0.4 * v["val_l1"].iloc[0], v["val_l1"].tolist()
    assert v["val_psnr_gt"].iloc[-1] > v["val_psnr_gt"].iloc[0] + 2
    assert (tmp_path / "log.parquet").exists() and (tmp_path / "log.csv").exists()


RUN = """
import sys, torch
sys.path.insert(0, {repo!r})
from tests.test_finetune import synthetic_pairs, full_objective_run
full_objective_run({out!r}, {lpips!r}, slow={slow})
"""


def full_objective_run(out: str, lpips_cache: str, slow: bool = False) -> pd.DataFrame:
    """L1 + LPIPS + GAN on the small restorer; ``slow`` sleeps each step so a test can kill it mid-run."""
    import lpips as lpips_pkg

    from bfr_models.metrics.lpips_metric import LPIPS
    from bfr_models.restorers import save_restorer

    torch.set_num_threads(1)
    net = LPIPS("alex", backbone_path=lpips_cache).model
    train, val = synthetic_pairs(16, seed=1), synthetic_pairs(4, seed=2)
    config = FinetuneConfig(iters=24, batch_size=4, micro_batch=2, lr=1e-3, lr_min=1e-4, lpips_net="alex",
                            d_num_feat=8, checkpoint_every=6, validate_every=12)
    assert isinstance(net, lpips_pkg.LPIPS)
    step_cb = (lambda s, r: time.sleep(0.4)) if slow else None
    torch.manual_seed(0)  # the restorer's initialisation: the same in every process
    return finetune(SmallRestorer(8, 1), train, val, train.target, config, out, lpips_net=net,
                    save=save_restorer, on_step=step_cb)


@pytest.fixture()
def alex_backbone(tmp_path):
    import torchvision

    torch.manual_seed(0)
    state = {k: v for k, v in torchvision.models.alexnet(weights=None).state_dict().items() if k.startswith("features.")}
    path = tmp_path / "alex.pth"
    torch.save(state, path)
    return str(path)


def test_killed_training_resumes_and_its_loss_curve_continues(tmp_path, alex_backbone, capfd):
    reference = full_objective_run(str(tmp_path / "straight"), alex_backbone)
    assert {"l1", "lpips", "gan", "d_loss", "val_lpips", "val_ssim_gt"} <= set(reference.columns)
    out = tmp_path / "killed"
    code = RUN.format(repo=str(REPO), out=str(out), lpips=alex_backbone, slow=True)
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (out / "log.parquet").exists() and pd.read_parquet(out / "log.parquet")["step"].max() >= 12:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stopped_at = int(pd.read_parquet(out / "log.parquet")["step"].max())
    assert 12 <= stopped_at < 24
    # the log is written before the state: a kill between the two leaves the state one checkpoint behind
    state_step = load_state(str(out / STATE_FILE))["step"]
    assert state_step in (stopped_at, stopped_at - 6)
    capfd.readouterr()
    resumed = full_objective_run(str(out), alex_backbone)
    assert f"finetune: resuming from step {state_step} (" in capfd.readouterr().err  # it says so, once
    assert resumed["step"].tolist() == reference["step"].tolist()  # no step lost, none repeated
    pd.testing.assert_frame_equal(resumed, reference, check_exact=False, rtol=1e-5)
