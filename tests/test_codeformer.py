"""CodeFormer: our adapter equals upstream's forward, and its code-level fine-tuning recipe (spec §2.3)."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import save_file

from bfr_models.restorers import load_restorer
from bfr_models.restorers.codeformer import CodeFormerRestorer
from bfr_models.training.codeformer import (CodeFormerFinetuneConfig, code_losses, finetune_codeformer,
                                            nearest_codes)
from bfr_models.training.finetune import Pairs, load_finetune_config


def tiny_codeformer(latent_size: int = 4):
    """CodeFormer's fixed VQGAN with a small Transformer; latent_size 4 = a 2x2 token grid (64-px input)."""
    from spandrel_extra_arches.architectures.CodeFormer import CodeFormer

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CodeFormer(dim_embd=64, n_head=8, n_layers=1, codebook_size=32, latent_size=latent_size,
                          connect_list=["32"])


def test_adapter_equals_upstream_forward_at_512():
    net = tiny_codeformer(latent_size=256).eval()
    x = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        upstream = (net(x * 2 - 1, weight=0.5)[0] + 1) / 2
        ours = CodeFormerRestorer(net, 0.5)(x)
    assert torch.allclose(ours, upstream, atol=1e-3)


def test_nearest_codes_by_hand():
    codebook = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    feats = torch.tensor([[0.9, 0.1], [0.1, 0.8], [-0.2, 0.1], [0.6, 0.3]]).T.reshape(1, 2, 2, 2)
    assert nearest_codes(feats, codebook).tolist() == [[1, 2, 0, 1]]


def test_recipe_defaults_are_the_released_config():
    c = load_finetune_config("codeformer")
    assert isinstance(c, CodeFormerFinetuneConfig)
    assert (c.token_weight, c.feat_weight, c.lr, c.batch_size, c.iters) == (0.5, 1.0, 1e-4, 8, 40000)
    assert (c.milestones, c.gamma, c.ema_decay, c.fidelity_weight) == ((35000, 38000), 0.5, 0.995, 0.5)


def test_code_level_finetuning_trains_encoder_and_transformer_only(tmp_path):
    restorer = CodeFormerRestorer(tiny_codeformer())
    before = {k: v.clone() for k, v in restorer.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    target = torch.rand(4, 3, 64, 64, generator=g)
    pairs = Pairs(lq=(target + 0.1 * torch.randn(target.shape, generator=g)).clamp(0, 1), target=target)
    frozen = __import__("copy").deepcopy(restorer.net.encoder)
    start = code_losses(restorer, frozen, pairs.lq, pairs.target)[1].item()
    config = CodeFormerFinetuneConfig(iters=4, batch_size=2, lr=1e-3, ema_decay=0.0, checkpoint_every=4,
                                      validate_every=4, val_pairs=0)
    log = finetune_codeformer(restorer, pairs, Pairs(pairs.lq[:1], pairs.target[:1]), config, str(tmp_path))
    assert {"feat", "token", "token_acc", "val_psnr"} <= set(log.columns) and log["step"].max() == 4
    after = restorer.state_dict()
    changed = {k.split(".")[1] for k in after if not torch.equal(after[k], before[k])}
    assert changed <= {"encoder", "position_emb", "feat_emb", "ft_layers", "idx_pred_layer"} and "encoder" in changed
    assert "ft_layers" in changed
    assert code_losses(restorer, frozen, pairs.lq, pairs.target)[1].item() < start  # the token loss fell


def test_codeformer_checkpoint_loads_through_spandrel_as_our_restorer(tmp_path):
    path = tmp_path / "codeformer_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_codeformer().state_dict().items()}, str(path))
    r = load_restorer(str(path))
    assert r.arch == "CodeFormer" and isinstance(r.model, CodeFormerRestorer) and r.model.fidelity_weight == 0.5
    out = r(torch.rand(1, 3, 60, 60))  # padded to a multiple of 32 and cropped back
    assert out.shape == (1, 3, 60, 60) and 0 <= out.min() and out.max() <= 1


def test_image_recipe_refuses_a_codeformer(tmp_path):
    from bfr_models.training.finetune import FinetuneError
    from flows.finetune import finetune_config

    with pytest.raises(FinetuneError, match="not a CodeFormer"):
        finetune_config("codeformer", torch.nn.Conv2d(3, 3, 1))
    assert isinstance(finetune_config("auto", CodeFormerRestorer(tiny_codeformer())), CodeFormerFinetuneConfig)
