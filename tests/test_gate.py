"""The pseudo-target quality gate as a plain function, its thresholds file, --auto's choice, the finetune filter."""

import numpy as np
import pytest
import torch

from bfr_models.diffusion.lowpass import lowpass
from bfr_models.gate import GateConfig, judge, load_gate
from bfr_models.pseudo_targets import Candidate, choose
from tests.conftest import face_like


def batch(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1)[None].float() / 255.0


@pytest.fixture(scope="module")
def face():
    return batch(face_like(0, 64))


def verdict(target, inputs, **scorers):
    (rec,) = judge(target, inputs, 4, load_gate(), **scorers)
    return rec


def test_a_sharp_face_passes_as_the_target_of_its_blurred_self(face):
    rec = verdict(face, lowpass(face, 2).clamp(0, 1))
    assert rec["gate"] == "pass" and rec["gate_reason"] is None
    assert {"lowres_psnr", "chroma_shift", "noise_sigma", "input_noise_sigma"} <= set(rec)


def test_strong_noise_fails_as_noise(face):
    noisy = (face + torch.randn(face.shape, generator=torch.Generator().manual_seed(0)) * 25 / 255).clamp(0, 1)
    rec = verdict(noisy, lowpass(face, 2).clamp(0, 1))
    assert rec["gate"] == "fail" and rec["gate_reason"].startswith("noise:")
    assert "fidelity" not in rec["gate_reason"]  # the x1/N copies average the noise away: only the noise check sees it


def test_a_flat_field_fails_fidelity(face):
    rec = verdict(torch.full_like(face, 0.5), face)
    assert rec["gate"] == "fail" and "fidelity: x1/N PSNR" in rec["gate_reason"]


def test_a_desaturated_face_fails_colour_only(face):
    gray = face.mean(1, keepdim=True)
    rec = verdict(gray + 0.4 * (face - gray), face)
    assert rec["gate"] == "fail" and rec["gate_reason"].startswith("colour: chroma shift")
    assert "fidelity" not in rec["gate_reason"]


def test_quality_and_identity_checks_when_their_scorers_are_given(face):
    ones = lambda a, b=None: torch.ones(a.shape[0])  # noqa: E731 -- stand-in scores: the same before and after
    rec = verdict(face, face, niqe=ones, identity=lambda a, b: torch.full((a.shape[0],), 0.2))
    assert rec["gate"] == "fail"
    assert "identity: cosine 0.20 < 0.5" in rec["gate_reason"] and "quality: NIQE not improved" in rec["gate_reason"]


def test_the_shipped_thresholds_are_the_documented_defaults(tmp_path):
    assert load_gate() == GateConfig()
    bad = tmp_path / "gate.yaml"
    bad.write_text("max_noise: 3\n")
    with pytest.raises(ValueError, match="unknown field"):
        load_gate(bad)


def test_auto_prefers_passing_then_less_noisy_candidates():
    cands = [Candidate({"tau": 100}, quality=5.07, fidelity=30, noise=7.1, pass_rate=1.0),
             Candidate({"tau": 250}, quality=5.00, fidelity=30, noise=12.5, pass_rate=1.0),
             Candidate({"tau": 300}, quality=3.00, fidelity=30, noise=3.0, pass_rate=0.25)]
    best, reason = choose(cands, 20, min_pass_rate=0.75, tolerance=0.5)
    assert best == 0 and "least noise" in reason  # tau=300 fails the gate; 0.07 NIQE does not buy 5 noise levels
    assert choose(cands, 20, min_pass_rate=0.75, tolerance=0.0)[0] == 1
    best, reason = choose(cands, 20, min_pass_rate=1.01)
    assert best == 0 and "no candidate reached a gate pass rate" in reason


def test_finetune_pairs_leave_gate_failed_targets_out(tmp_path):
    from flows.finetune import load_pairs
    from tests.test_finetune_flow import pairs_manifest

    pairs, _ = pairs_manifest(tmp_path, n=4, gate_failed=1)
    plan = load_pairs(pairs)
    assert len(plan) == 3 and plan.skipped == 2  # the error row and the failed target
    assert len(load_pairs(pairs, include_failed=True)) == 4
