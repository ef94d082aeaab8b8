"""The identity check of the clean stage: FaceNet embeddings' cosine similarity, weights from a card file."""

from __future__ import annotations

import pytest
import torch

from bfr_models.idm import AcceptanceConfig, SetCalibration, judge
from bfr_models.metrics.identity import FaceIdentity
from tests.conftest import face_like


@pytest.fixture(scope="module")
def facenet_file(tmp_path_factory):
    from facenet_pytorch import InceptionResnetV1

    torch.manual_seed(0)
    net = InceptionResnetV1(pretrained=None, classify=False)
    # random weights with BatchNorm statistics of the defaults (mean 0, var 1) map every face to nearly one
    # embedding: calibrate them on a few batches, as training would, so different faces differ
    for m in net.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.momentum = None
    with torch.no_grad():
        for _ in range(3):
            net.train()((torch.rand(8, 3, 160, 160) * 255 - 127.5) / 128)
    state = net.state_dict()
    state["logits.weight"] = torch.zeros(8631, 512)  # the published file holds the classifier too: ignored
    path = tmp_path_factory.mktemp("facenet") / "20180402-114759-vggface2.pt"
    torch.save(state, path)
    return str(path)


def test_identity_is_one_for_the_same_face_and_lower_for_another(facenet_file):
    ident = FaceIdentity(facenet_file)
    a = torch.stack([torch.from_numpy(face_like(i, 96).copy()).permute(2, 0, 1).float() / 255 for i in range(2)])
    same = ident(a, a)
    assert torch.allclose(same, torch.ones(2), atol=1e-5)
    assert (ident(a, a.flip(0)) < 0.999).all() and (ident(a, 1 - a) < 0.999).all()


def test_acceptance_rejects_below_the_identity_limit(facenet_file):
    ident = FaceIdentity(facenet_file)
    x = torch.rand(2, 3, 192, 192, generator=torch.Generator().manual_seed(1))
    recs = judge(x, x.clone(), AcceptanceConfig(min_identity=1.5), SetCalibration(min_identity=1.5),
                 niqe=lambda b: torch.tensor([5.0, 5.0]), identity=ident)
    assert all("identity similarity" in r["reasons"] for r in recs)
    assert all(abs(r["identity_cos"] - 1.0) < 1e-4 for r in recs)


def test_a_file_that_is_not_facenet_is_one_line(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not a FaceNet") as e:
        FaceIdentity(str(path))
    assert "\n" not in str(e.value)
