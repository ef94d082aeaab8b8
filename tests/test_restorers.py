"""The restorer registry: SmallRestorer, our checkpoint format, built-ins and spandrel models. CPU, offline."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import torch.nn.functional as F

from bfr_models import storage
from bfr_models.restorers import (FORMAT, Restorer, RestorerError, SmallRestorer, list_restorers, load_restorer,
                                  load_restorer_module, save_restorer, spandrel_architectures)
from bfr_models.restorers.checkpoint import safetensors_metadata


def _images(b=2, h=32, w=32, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _trained_like(channels=8, blocks=2, seed=0) -> SmallRestorer:
    """A SmallRestorer that is not the identity (its last conv given random weights)."""
    torch.manual_seed(seed)
    net = SmallRestorer(channels=channels, blocks=blocks)
    with torch.no_grad():
        net.conv_out.weight.normal_(0, 0.05)
        net.conv_out.bias.normal_(0, 0.01)
    return net.eval()


def _compact_state(num_in_ch=3, num_out_ch=3, upscale=2, seed=0) -> dict:
    from spandrel.architectures.Compact import Compact

    torch.manual_seed(seed)
    net = Compact(num_in_ch=num_in_ch, num_out_ch=num_out_ch, num_feat=8, num_conv=2, upscale=upscale)
    return net.state_dict()


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# ------------------------------------------------------------------------------------------ SmallRestorer


def test_untrained_small_restorer_is_exactly_identity():
    net = SmallRestorer()
    x = _images(3, 64, 48)
    with torch.no_grad():
        assert torch.equal(net(x), x)
    assert net.config == {"channels": 32, "blocks": 4}


def test_small_restorer_rejects_odd_sizes_and_bad_config():
    with pytest.raises(ValueError, match="divisible by 2"):
        SmallRestorer()(torch.rand(1, 3, 33, 32))
    with pytest.raises(ValueError, match="channels must be a positive integer"):
        SmallRestorer(channels=0)


def test_small_restorer_trains_on_cpu():
    """The zero-initialised last conv does not block learning: 100 steps at 64 px reduce a denoising loss.

    Run single-threaded: on a small box busy with other work, torch's default OpenMP threads can be an
    order of magnitude slower than one thread (seen here: 1.3 s vs 0.08 s per step on 2 loaded cores).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        net = SmallRestorer()
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        clean = F.interpolate(torch.rand(4, 3, 8, 8), size=(64, 64), mode="bilinear", align_corners=False)
        noisy = (clean + 0.1 * torch.randn_like(clean)).clamp(0, 1)
        first = F.l1_loss(net(noisy), clean).item()
        for _ in range(100):
            loss = F.l1_loss(net(noisy), clean)
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert loss.item() < 0.7 * first
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------ our checkpoints


def test_save_load_round_trip_same_outputs_and_sha256(tmp_path):
    net = _trained_like()
    path = tmp_path / "sub" / "small.safetensors"
    uri = save_restorer(net, str(path))
    assert uri == str(path) and path.is_file()
    meta = safetensors_metadata(path.read_bytes())
    assert meta["format"] == FORMAT == "bfr-curate-restorer" and meta["arch"] == "small"
    assert json.loads(meta["config"]) == {"channels": 8, "blocks": 2}

    x = _images(2, 32, 32)
    restorer = load_restorer(str(path))
    with torch.no_grad():
        expected = net(x).clamp(0, 1)
    assert torch.equal(restorer(x), expected)
    assert not torch.equal(expected, x)  # the test model really changes the images
    assert torch.equal(load_restorer_module(str(path))(x), net(x))

    d = restorer.describe()
    assert d == {"name": "small.safetensors", "arch": "small", "sha256": _sha(path), "scale": 1, "uri": str(path),
                 "resize_back": None, "config": {"channels": 8, "blocks": 2}, "resolution": None}
    assert restorer.sha256 == _sha(path) and restorer.name == "small.safetensors" and restorer.scale == 1
    json.dumps(d)


def test_a_restorer_trained_at_one_size_runs_at_that_size(tmp_path):
    """finetune records the training resolution in the file; the restorer then works at that size: a 32-px image
    goes through a 16-px restorer resized in and back (the identity network then blurs it), a 16-px one as is."""
    from bfr_models.resize import matlab_resize

    path = tmp_path / "at16.safetensors"
    save_restorer(SmallRestorer(channels=8, blocks=2), str(path), resolution=16)  # untrained: the identity
    restorer = load_restorer(str(path))
    assert restorer.resolution == 16 and restorer.describe()["resolution"] == 16
    x, small = _images(2, 32, 32), _images(2, 16, 16)
    expected = matlab_resize(matlab_resize(x, (16, 16)).clamp(0, 1), (32, 32)).clamp(0, 1)
    assert restorer(x).shape == x.shape and torch.allclose(restorer(x), expected, atol=1e-5)
    assert not torch.allclose(restorer(x), x, atol=1e-2)  # it really went through 16 px
    assert torch.equal(restorer(small), small)


def test_round_trip_through_fsspec_uri():
    net = _trained_like(seed=1)
    uri = save_restorer(net, "memory://restorers/r1.safetensors")
    assert uri == storage.normalize("memory://restorers/r1.safetensors")
    restorer = load_restorer(uri)
    x = _images(1, 16, 16)
    assert torch.equal(restorer(x), net(x).clamp(0, 1))
    assert restorer.sha256 == hashlib.sha256(storage.read_bytes(uri)).hexdigest()


def test_small_restorer_model_handles_odd_sizes():
    """The Restorer pads odd sizes (replicate) and crops back; an untrained model stays the identity."""
    save_restorer(SmallRestorer(channels=4, blocks=1), "memory://restorers/id.safetensors")
    restorer = load_restorer("memory://restorers/id.safetensors")
    x = _images(2, 31, 17)
    assert torch.equal(restorer(x), x)


def test_corrupt_own_checkpoint(tmp_path):
    path = tmp_path / "bad.safetensors"
    data = bytearray(open(save_restorer(_trained_like(), str(tmp_path / "ok.safetensors")), "rb").read())
    path.write_bytes(bytes(data[: len(data) - 100]))  # truncated weights, header intact
    with pytest.raises(RestorerError, match="weights are unreadable") as e:
        load_restorer(str(path))
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------ built-ins


def test_builtins_are_identity_at_the_same_size():
    assert list_restorers() == ["none", "bicubic"]
    x = _images(2, 24, 40)
    for spec in ("none", "bicubic", "NONE"):
        r = load_restorer(spec)
        assert isinstance(r, Restorer)
        out = r(x)
        assert torch.equal(out, x) and out.dtype == torch.float32 and out is not x
        d = r.describe()
        assert d["arch"] == "identity" and d["sha256"] is None and d["scale"] == 1 and d["name"] == spec.lower()
    # float32 output and clamping whatever the input float type
    half = load_restorer("none")((x * 1.2).to(torch.bfloat16))
    assert half.dtype == torch.float32 and half.max() <= 1


def test_bad_batches_raise():
    r = load_restorer("none")
    with pytest.raises(RestorerError, match=r"\(B, 3, H, W\)"):
        r(torch.rand(3, 8, 8))
    with pytest.raises(RestorerError, match="float images"):
        r(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


# ------------------------------------------------------------------------------------------ spandrel


def test_spandrel_model_from_a_pth_file(tmp_path):
    path = tmp_path / "compact_x2.pth"
    torch.save(_compact_state(upscale=2), path)
    r = load_restorer(str(path))
    x = _images(2, 20, 28)
    out = r(x)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 1 and not out.is_inference()
    d = r.describe()
    assert d["arch"] == "Compact" and d["scale"] == 2 and d["resize_back"] == "bicubic-antialias"
    assert d["sha256"] == _sha(path) and d["name"] == "compact_x2.pth" and d["uri"] == str(path)
    assert d["config"]["arch_name"] == "RealESRGAN Compact" and d["config"]["purpose"] == "SR"
    json.dumps(d)

    # the same as running the network by hand, then the antialiased bicubic back to the input size
    from spandrel.architectures.Compact import Compact

    net = Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=2).eval()
    net.load_state_dict(_compact_state(upscale=2))
    with torch.no_grad():
        by_hand = F.interpolate(net(x).clamp(0, 1), size=(20, 28), mode="bicubic", antialias=True,
                                align_corners=False).clamp(0, 1)
    assert torch.allclose(out, by_hand, atol=1e-6)


def test_spandrel_scale_1_from_safetensors_uri():
    from safetensors.torch import save

    uri = "memory://restorers/compact_x1.safetensors"
    storage.write_bytes_atomic(uri, save(_compact_state(upscale=1)))
    r = load_restorer(uri)
    x = _images(1, 16, 16)
    assert r(x).shape == x.shape
    d = r.describe()
    assert d["arch"] == "Compact" and d["scale"] == 1 and d["resize_back"] is None and d["config"]["purpose"] == "Restoration"


def test_batch_and_single_give_the_same_images(tmp_path):
    save_restorer(_trained_like(), str(tmp_path / "s.safetensors"))
    torch.save(_compact_state(upscale=2), tmp_path / "c.pth")
    batch = _images(4, 32, 32, seed=3)
    for spec in (str(tmp_path / "s.safetensors"), str(tmp_path / "c.pth"), "none"):
        r = load_restorer(spec)
        together = r(batch)
        for i in range(4):
            alone = r(batch[i:i + 1])
            assert torch.allclose(alone[0], together[i], atol=1e-6, rtol=0), spec


# ------------------------------------------------------------------------------------------ errors


def _one_line(e) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


def test_unknown_name():
    with pytest.raises(RestorerError) as e:
        load_restorer("realesrgan")
    assert _one_line(e) == ("unknown restorer 'realesrgan': built-ins are none, bicubic; "
                            "anything else must be a checkpoint path or URI")


def test_missing_file_says_where_it_looked(tmp_path):
    path = tmp_path / "nope" / "model.pth"
    with pytest.raises(RestorerError) as e:
        load_restorer(str(path))
    assert _one_line(e) == f"restorer checkpoint not found: looked for {path}"
    absent = "memory://restorers/absent.safetensors"
    with pytest.raises(RestorerError) as e:
        load_restorer(absent)
    assert _one_line(e) == f"restorer checkpoint not found: looked for {storage.normalize(absent)}"


def test_garbage_file_lists_spandrel_architectures(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"this is not a checkpoint at all" * 10)
    with pytest.raises(RestorerError) as e:
        load_restorer(str(path))
    text = _one_line(e)
    assert text.startswith(f"restorer checkpoint {path} was refused: not a PyTorch file of plain tensors")
    archs = spandrel_architectures()
    assert len(archs) > 20 and "RealESRGAN Compact" in archs and "SwinIR" in archs
    assert text.endswith("spandrel can load: " + ", ".join(archs))


def test_state_dict_of_no_known_architecture(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(4, 4)}, path)
    with pytest.raises(RestorerError) as e:
        load_restorer(str(path))
    text = _one_line(e)
    assert "spandrel recognises no architecture in its state dict (1 entries: encoder.weight, ...)" in text
    assert text.endswith("spandrel can load: " + ", ".join(spandrel_architectures()))


def test_model_that_is_not_an_rgb_restorer(tmp_path):
    path = tmp_path / "gray.pth"
    torch.save(_compact_state(num_in_ch=1, num_out_ch=1, upscale=1), path)
    with pytest.raises(RestorerError) as e:
        load_restorer(str(path))
    assert _one_line(e) == (f"restorer checkpoint {path} is a RealESRGAN Compact model with 1 input and 1 output "
                            f"channels; a restorer maps RGB to RGB (3 -> 3)")


def test_inpainting_model_is_refused(tmp_path):
    """LaMa (spandrel: MaskedImageModelDescriptor, purpose Inpainting) is not an image-to-image restorer."""
    from spandrel.architectures.LaMa import LaMa

    path = tmp_path / "lama.pth"
    torch.save(LaMa().state_dict(), path)
    with pytest.raises(RestorerError) as e:
        load_restorer(str(path))
    assert _one_line(e) == (f"restorer checkpoint {path} is a LaMa model for Inpainting, "
                            f"not an image-to-image restorer (it needs a mask)")


def test_folder_and_empty_file(tmp_path):
    with pytest.raises(RestorerError, match="is a folder"):
        load_restorer(str(tmp_path))
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(RestorerError, match="is empty"):
        load_restorer(str(tmp_path / "empty.pth"))
