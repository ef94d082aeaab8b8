"""A planted pickle never runs: every place a resume or a model load reads refuses it in one line.

The planted file is what an attacker with write access to a shared output prefix or model cache
would leave: a PyTorch file whose unpickling calls ``exec`` to write a marker file. Each test
asserts the marker never appears and the refusal is one line that does not suggest turning the
safety off (torch's own message suggests ``weights_only=False``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bfr_models import models, storage
from bfr_models.diffusion.prior import PriorError, load_prior, save_prior
from bfr_models.diffusion.train import PriorTrainConfig, small_unet, train_prior
from bfr_models.idm import IDMError, IDMTrainConfig, load_idm, save_idm, train_idm
from bfr_models.idm.model import idm_unet
from bfr_models.restorers import RestorerError, SmallRestorer, load_restorer
from bfr_models.restorers.codeformer import CodeFormerRestorer
from bfr_models.training.codeformer import CodeFormerFinetuneConfig, finetune_codeformer
from bfr_models.training.finetune import FinetuneConfig, FinetuneError, Pairs, finetune
from bfr_models.training.state import STATE_FILE
from flows.cli import main
from tests.test_codeformer import tiny_codeformer
from tests.test_finetune import synthetic_pairs
from tests.test_idm import TINY as TINY_IDM


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('payload ran')",)


@pytest.fixture
def plant(tmp_path):
    """``plant(path)`` writes the malicious file there (creating folders); ``plant.ran()`` says whether it ran."""
    marker = tmp_path / "PAYLOAD_RAN"

    def write(path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"step": 1, "model": _Payload(marker)}, path)
        return path

    write.ran = marker.exists
    return write


def _one_safe_line(e: BaseException | str) -> str:
    text = str(e.value if hasattr(e, "value") else e).strip()
    assert text and "\n" not in text, text
    assert "weights_only" not in text and "trust" not in text.lower(), text
    return text


def test_the_planted_file_is_live(plant, tmp_path):
    """The plant is real: an unsafe load does run it (so the tests below could fail)."""
    path = plant(tmp_path / "x.pt")
    torch.load(path, weights_only=False)
    assert plant.ran()


def test_prior_train_resume(plant, tmp_path):
    out = tmp_path / "prior"
    plant(out / STATE_FILE)
    config = PriorTrainConfig(resolution=16, channels=(8, 16), steps=1, batch_size=1)
    with pytest.raises(ValueError) as e:
        train_prior(torch.zeros(2, 3, 16, 16), config, str(out))
    assert _one_safe_line(e).startswith(f"prior train: {storage.normalize(str(out / STATE_FILE))} is not a training state")
    assert not plant.ran()


def test_idm_train_resume(plant, tmp_path):
    out = tmp_path / "idm"
    plant(out / STATE_FILE)
    with pytest.raises(IDMError) as e:
        train_idm(torch.rand(2, 3, 32, 32), TINY_IDM, IDMTrainConfig(iters=1, batch_size=1, warmup=0), str(out))
    assert _one_safe_line(e).startswith("idm train: ")
    assert not plant.ran()


def test_finetune_resume(plant, tmp_path):
    plant(tmp_path / STATE_FILE)
    pairs = synthetic_pairs(4)
    config = FinetuneConfig(iters=1, batch_size=2, micro_batch=2, lpips_weight=0.0)
    with pytest.raises(FinetuneError) as e:
        finetune(SmallRestorer(8, 1), pairs, None, pairs.target, config, str(tmp_path))
    assert _one_safe_line(e).startswith("finetune: ")
    assert not plant.ran()


def test_codeformer_recipe_resume(plant, tmp_path):
    plant(tmp_path / STATE_FILE)
    target = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    config = CodeFormerFinetuneConfig(iters=1, batch_size=2, checkpoint_every=1, validate_every=1, val_pairs=0)
    with pytest.raises(FinetuneError) as e:
        finetune_codeformer(CodeFormerRestorer(tiny_codeformer()), Pairs(lq=target, target=target), None, config,
                            str(tmp_path))
    assert _one_safe_line(e).startswith("finetune: ")
    assert not plant.ran()


def _swap_weights(folder: Path, meta_name: str, weights: str, plant) -> None:
    """Replace a model folder's weights with the plant and make its JSON's sha256 agree, so the loader
    gets past the hash check and reaches the file itself."""
    path = plant(folder / weights)
    meta = json.loads((folder / meta_name).read_text())
    meta["weights_sha256"] = models.file_sha256(path)
    (folder / meta_name).write_text(json.dumps(meta))


def test_prior_folder_weights_and_prior_inspect(plant, tmp_path, capsys):
    folder = Path(save_prior(small_unet(PriorTrainConfig(resolution=16, channels=(8, 16))), str(tmp_path / "p"),
                             variance_type="fixed_large"))
    _swap_weights(folder, "prior.json", "unet/diffusion_pytorch_model.safetensors", plant)
    with pytest.raises(PriorError) as e:
        load_prior(str(folder))
    assert "was refused: not a safetensors file" in _one_safe_line(e)
    assert main(["prior", "inspect", str(folder)]) == 2
    assert _one_safe_line(capsys.readouterr().err).startswith("bfr-curate: error: prior weights")
    assert not plant.ran()


def test_idm_model_folder_weights(plant, tmp_path):
    folder = Path(save_idm(idm_unet(TINY_IDM), TINY_IDM, str(tmp_path / "m")))
    _swap_weights(folder, "idm.json", "unet/diffusion_pytorch_model.safetensors", plant)
    with pytest.raises(IDMError) as e:
        load_idm(str(folder))
    assert "was refused: not a safetensors file" in _one_safe_line(e)
    assert not plant.ran()


def test_restorer_checkpoint(plant, tmp_path):
    path = plant(tmp_path / "restorer.pth")
    with pytest.raises(RestorerError) as e:
        load_restorer(str(path))
    text = _one_safe_line(e)
    assert text.startswith(f"restorer checkpoint {storage.normalize(str(path))} was refused: not a PyTorch file of "
                           f"plain tensors (it holds Python objects besides tensors")
    assert not plant.ran()


def test_model_card_file_added_then_loaded_and_adm_conversion(plant, tmp_path, monkeypatch, capsys):
    """An unpinned card accepts any file (it has no hash to check): adding the plant stores it, and every
    load of it (prior inspect of the card; prior convert of the same file) refuses it."""
    monkeypatch.setenv("BFR_CURATE_MODEL_CACHE", str(tmp_path / "cache"))
    card = models.get_card("ffhq256_adm_p2")
    assert not card.pinned
    path = plant(tmp_path / "downloads" / card.filename)
    assert main(["models", "add", card.name, "--from", str(path), "--quiet"]) == 0
    assert f"(sha256 not pinned: {models.file_sha256(path)})" in capsys.readouterr().out
    assert main(["prior", "inspect", card.name]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "sha256 not pinned" in err[0] and len(err) == 2  # the unpinned warning, then the refusal
    assert _one_safe_line(err[1]).startswith(f"bfr-curate: error: prior {card.name} ")
    assert main(["prior", "convert", "--from", "adm", str(path), "--arch", "ffhq256", "--out", str(tmp_path / "p")]) == 2
    assert "ADM checkpoint" in _one_safe_line(capsys.readouterr().err)
    assert not (tmp_path / "p").exists()
    assert not plant.ran()
