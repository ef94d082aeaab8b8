"""ADM -> diffusers conversion, checked against outputs of guided-diffusion's own UNet.

tests/data/adm_tiny*.pt were written by `scripts/verify_adm_conversion.py --arch tiny|tiny_conv
--write-fixture ...` from openai/guided-diffusion's UNetModel with random weights: its config, its
state dict, an input, timesteps, and guided-diffusion's output on them.
"""

import hashlib
from pathlib import Path

import pytest
import torch
import yaml

from bfr_models.diffusion.adm import ADMUNet2DModel, ConversionError, adm_unet_config, convert_adm_state_dict
from bfr_models.diffusion.prior import load_prior, save_prior
from flows.cli import main

DATA = Path(__file__).parent / "data"


def fixture(name):
    return torch.load(DATA / f"adm_{name}.pt", weights_only=True)  # plain tensors, dicts and tuples: no code runs


@pytest.mark.parametrize("name", ["tiny", "tiny_conv"])  # resblock up/down; conv up/down with 2 blocks per level
def test_converted_model_reproduces_guided_diffusion(name):
    f = fixture(name)
    unet = convert_adm_state_dict(f["state_dict"], f["config"])
    with torch.no_grad():
        out = unet(f["x"], f["t"]).sample
    assert out.shape == f["out"].shape
    assert torch.allclose(out, f["out"], atol=1e-5), (out - f["out"]).abs().max()


def test_every_tensor_is_checked():
    f = fixture("tiny")
    sd = dict(f["state_dict"])
    wrong = dict(sd)
    wrong["input_blocks.1.0.in_layers.2.weight"] = torch.zeros(32, 16, 3, 3)
    with pytest.raises(ConversionError, match=r"input_blocks\.1\.0\.in_layers\.2\.weight gives .* shape \(32, 16, 3, 3\), "
                                              r"expected \(32, 32, 3, 3\)"):
        convert_adm_state_dict(wrong, f["config"])
    missing = {k: v for k, v in sd.items() if k != "middle_block.1.qkv.weight"}
    with pytest.raises(ConversionError, match="tensors missing"):
        convert_adm_state_dict(missing, f["config"])
    extra = {**sd, "label_emb.weight": torch.zeros(10, 128)}
    with pytest.raises(ConversionError, match=r"unexpected tensors, first label_emb\.weight"):
        convert_adm_state_dict(extra, f["config"])
    with pytest.raises(ConversionError, match="does not match ffhq256"):
        convert_adm_state_dict(sd, "ffhq256")
    wrapped = {"state_dict": {f"module.{k}": v for k, v in sd.items()}}
    convert_adm_state_dict(wrapped, f["config"])  # DataParallel prefixes and a wrapping dict are accepted


def test_published_architectures_parameter_counts():
    with torch.device("meta"):
        adm256 = ADMUNet2DModel(**adm_unet_config("ffhq256"))
        iddpm512 = ADMUNet2DModel(**adm_unet_config("ffhq512"))
    # 93,563,910: guided-diffusion's UNetModel built with ADM_ARCHS["ffhq256"] (scripts/verify_adm_conversion.py)
    assert sum(p.numel() for p in adm256.parameters()) == 93_563_910
    # 159.79M; the unsupervised-BFR paper's Table 27 prints 159.59M for this checkpoint (see README)
    assert sum(p.numel() for p in iddpm512.parameters()) == 159_788_454
    assert [len(b.resnets) for b in iddpm512.down_blocks] == [1, 2, 2, 2, 2, 3, 4]
    assert [len(b.resnets) for b in iddpm512.up_blocks] == [5, 4, 3, 3, 3, 3, 2]


def test_per_level_blocks_round_trip_through_a_prior_folder(tmp_path):
    arch = {**fixture("tiny_conv")["config"], "num_res_blocks": (1, 2)}
    torch.manual_seed(0)
    unet = ADMUNet2DModel(**adm_unet_config(arch))
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.05)
    uri = save_prior(unet.eval(), str(tmp_path / "p"), variance_type="learned_range")
    loaded = load_prior(uri)
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([500])
    with torch.no_grad():
        assert torch.equal(loaded.unet(x, t).sample, unet(x, t).sample)
    assert list(loaded.unet.config.layers_per_block) == [1, 2]


def test_cli_convert_and_inspect(tmp_path, capsys):
    f = fixture("tiny")
    ckpt = tmp_path / "adm.pt"
    torch.save(f["state_dict"], ckpt)
    # a named architecture is required on the command line; the tiny one only exists in tests
    assert main(["prior", "convert", "--from", "adm", str(ckpt), "--arch", "ffhq256", "--out", str(tmp_path / "p")]) == 2
    assert "checkpoint does not match ffhq256" in capsys.readouterr().err
    assert main(["prior", "convert", str(tmp_path / "none.pt"), "--arch", "ffhq256", "--out", str(tmp_path / "p")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_model_card_prior_is_hash_checked_and_converted(tmp_path, monkeypatch):
    f = fixture("tiny")
    ckpt_bytes = (DATA / "adm_tiny.pt").read_bytes()
    cache, catalog = tmp_path / "cache", tmp_path / "catalogs" / "models"
    cache.mkdir()
    catalog.mkdir(parents=True)
    torch.save(f["state_dict"], cache / "tiny_adm.pt")
    card = {"name": "tiny_adm", "filename": "tiny_adm.pt", "url": "file:///nowhere/tiny_adm.pt",
            "sha256": hashlib.sha256((cache / "tiny_adm.pt").read_bytes()).hexdigest(), "license": "test",
            "used_by": ["tests"], "description": "a tiny ADM", "extra": {"prior": {"from": "adm", "arch": f["config"]}}}
    (catalog / "tiny_adm.yaml").write_text(yaml.safe_dump(card))
    monkeypatch.setenv("BFR_CURATE_MODEL_CACHE", str(cache))
    monkeypatch.setenv("BFR_CURATE_CATALOGS", str(tmp_path / "catalogs"))
    prior = load_prior("tiny_adm")
    assert prior.resolution == 16 and prior.variance_type == "learned_range" and prior.uri == "card:tiny_adm"
    with torch.no_grad():
        assert torch.allclose(prior.unet(f["x"], f["t"]).sample, f["out"], atol=1e-5)
    (cache / "tiny_adm.pt").write_bytes(ckpt_bytes)  # another file under the card's name
    for record in cache.glob(".*verified*"):
        record.unlink()
    from bfr_models.models import ModelHashError

    with pytest.raises(ModelHashError, match="of model 'tiny_adm' has the wrong content"):
        load_prior("tiny_adm")
    (cache / "tiny_adm.pt").unlink()
    with pytest.raises(FileNotFoundError, match="models pull tiny_adm"):
        load_prior("tiny_adm")


def test_converted_prior_folder_inspects_and_samples_like_the_original(tmp_path, capsys):
    from flows.prior import convert_adm

    f = fixture("tiny")
    ckpt = tmp_path / "adm.pt"
    torch.save(f["state_dict"], ckpt)
    uri = convert_adm(str(ckpt), f["config"], str(tmp_path / "prior"))
    assert main(["prior", "inspect", uri]) == 0
    text = capsys.readouterr().out
    assert "resolution: 16" in text and "variance:   learned_range" in text and "ADMUNet2DModel" in text
    prior = load_prior(uri)
    assert prior.meta["source"]["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    with torch.no_grad():
        assert torch.allclose(prior.unet(f["x"], f["t"]).sample, f["out"], atol=1e-5)
