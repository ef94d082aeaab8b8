"""Nothing cached or read back is trusted unchecked: damaged shards are recomputed, a planted result record
never runs, a corrupt or escaping index is one line, and paths read from files stay inside their folder.

Real Prefect (cached shard tasks, result records on disk), real Parquet, the degrade stage on tiny images.
"""

import base64
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from bfr_models import manifest
from flows.cli import main
from flows.degrade import degrade_flow
from tests.conftest import face_like, task_states, write_png

N = 4  # inputs; shard_size=1 puts each in its own shard


@pytest.fixture
def faces(tmp_path) -> Path:
    folder = tmp_path / "faces"
    for i in range(N):
        write_png(folder / f"face_{i}.png", face_like(i, size=32))
    return folder


def _degrade(faces: Path, out: Path, shard_size: int = 1):
    state = degrade_flow(input=str(faces), out=str(out), preset="gfpgan", seed=3, shard_size=shard_size,
                         device="cpu", return_state=True)
    return state, state.result()


def _every_input_once(uri: str, faces: Path) -> None:
    df = manifest.read_manifest(uri, verify=True)  # every shard and every image checked
    assert sorted(Path(u).name for u in df["parent_uri"]) == sorted(p.name for p in faces.iterdir())
    assert (df["status"] == "ok").all()


def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


def _cli_error(capsys, *argv) -> str:
    capsys.readouterr()  # drop what earlier runs printed (progress bars)
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bfr-curate: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_deleted_truncated_and_image_less_shards_are_recomputed(faces, tmp_path):
    _, uri = _degrade(faces, tmp_path / "run")
    stage = Path(uri)
    shards = sorted((stage / "shards").iterdir())
    assert len(shards) == N
    shards[0].unlink()  # deleted
    shards[1].write_bytes(shards[1].read_bytes()[:100])  # truncated
    lost_image = manifest.read_manifest(str(stage / "shards" / shards[2].name))["uri"][0]
    Path(lost_image).unlink()  # an image a cached shard lists

    with pytest.raises(manifest.ManifestError) as e:  # the damaged stage is not readable as if whole
        manifest.read_manifest(uri)
    assert shards[0].stem in _one_line_error(e) and "missing" in str(e.value)

    state, again = _degrade(faces, tmp_path / "run")
    assert again == uri
    assert task_states(state) == ["Cached"] * (N - 3) + ["Completed"] * 3  # only the damaged three
    assert Path(lost_image).exists()
    _every_input_once(uri, faces)
    state, _ = _degrade(faces, tmp_path / "run")  # the recomputed results are trusted again
    assert task_states(state) == ["Cached"] * N


def test_an_incremental_stage_does_not_keep_a_damaged_shard(faces, tmp_path):
    from prefect import flow

    from flows.stage import INPUTS_NAME, run_stage
    from tasks.degrade import degrade_shard
    from tasks.shards import list_inputs

    @flow
    def incremental_degrade():  # as the clean stage runs: shards of earlier runs kept without a task
        items, _ = list_inputs(str(faces))
        return run_stage(degrade_shard, "degrade", {"preset": "gfpgan"}, items, str(faces), str(tmp_path / "run"),
                         1, incremental=True, preset="gfpgan", split=None, scale=None, seed=0, device="cpu",
                         batch_size=4)

    uri = incremental_degrade()
    shards = sorted((Path(uri) / "shards").iterdir())
    shards[0].write_bytes(shards[0].read_bytes()[:-1])
    state = incremental_degrade(return_state=True)
    assert task_states(state) == ["Completed"]  # only the damaged shard's items, recomputed
    _every_input_once(uri, faces)
    (Path(uri) / INPUTS_NAME).write_text("{not json")  # a corrupt record of the earlier runs: nothing reused
    state = incremental_degrade(return_state=True)
    assert task_states(state) == ["Cached"] * N
    _every_input_once(uri, faces)


class _Touch:
    """A pickle payload: unpickling it creates a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


def _pickle_record(record: dict, marker: Path) -> dict:
    from prefect.serializers import PickleSerializer

    serializer = PickleSerializer(picklelib="pickle")
    metadata = {**record["metadata"], "serializer": json.loads(serializer.model_dump_json())}
    return {"metadata": metadata, "result": base64.b64encode(pickle.dumps(_Touch(marker))).decode()}


def _escaping_record(record: dict, stage: Path) -> dict:
    """A JSON record whose (otherwise valid) shard lies outside the stage folder."""
    result = json.loads(record["result"])
    outside = stage.parent / "elsewhere.parquet"
    shutil.copy(stage / result["path"], outside)
    return {**record, "result": json.dumps({**result, "path": "../elsewhere.parquet"})}


@pytest.mark.parametrize("plant", ["pickle", "escaping path"])
def test_a_planted_result_record_is_never_used(plant, faces, tmp_path):
    from prefect._internal.result_records import ResultRecord

    _, uri = _degrade(faces, tmp_path / "run", shard_size=100)  # one shard
    stage = Path(uri)
    (record_file,) = (stage / "_prefect").iterdir()
    record = json.loads(record_file.read_text())
    marker = tmp_path / "payload-ran"
    if plant == "pickle":
        planted = _pickle_record(record, tmp_path / "prefect-runs-it")
        ResultRecord.deserialize(json.dumps(planted).encode())  # proof that Prefect alone would run it
        assert (tmp_path / "prefect-runs-it").exists()
        planted = _pickle_record(record, marker)
    else:
        planted = _escaping_record(record, stage)
    record_file.write_text(json.dumps(planted))

    state, again = _degrade(faces, tmp_path / "run", shard_size=100)
    assert task_states(state) == ["Completed"]  # recomputed, not read
    assert not marker.exists()
    index = manifest.read_index(again)
    assert [s["path"] for s in index["shards"]] == [f"shards/{index['shards'][0]['name']}.parquet"]
    _every_input_once(again, faces)


def test_corrupt_index_is_one_line_and_a_rerun_rewrites_it(faces, tmp_path, capsys):
    _, uri = _degrade(faces, tmp_path / "run")
    index = Path(uri) / manifest.INDEX_NAME
    for garbage in (b'{"shards": [', b"\xff\xfe\x00", b"[]", b'{"shards": [1]}'):
        index.write_bytes(garbage)
        with pytest.raises(manifest.ManifestError) as e:
            manifest.read_manifest(uri)
        assert "corrupt" in _one_line_error(e)
        assert "corrupt" in _cli_error(capsys, "manifest", "show", uri)

    state, again = _degrade(faces, tmp_path / "run")
    assert again == uri and task_states(state) == ["Cached"] * N  # the shards were fine: nothing recomputed
    _every_input_once(uri, faces)


def test_shard_paths_outside_the_stage_folder_are_refused(faces, tmp_path, capsys):
    _, uri = _degrade(faces, tmp_path / "run")
    stage = Path(uri)
    index_file = stage / manifest.INDEX_NAME
    original = json.loads(index_file.read_text())
    first = original["shards"][0]
    outside = tmp_path / "other" / "x.parquet"  # a valid shard (same bytes) where it must not be read from
    outside.parent.mkdir()
    shutil.copy(stage / first["path"], outside)
    for path in ("../../../other/x.parquet", str(outside), f"file://{outside}", "s3://bucket/x.parquet",
                 "shards/../../../other/x.parquet", ""):
        index_file.write_text(json.dumps({**original, "shards": [{**first, "path": path}]}))
        with pytest.raises(manifest.ManifestError) as e:
            manifest.read_manifest(uri)
        assert "is not a relative path inside" in _one_line_error(e) and first["name"] in str(e.value)
        assert "is not a relative path inside" in _cli_error(capsys, "manifest", "show", uri)

    _degrade(faces, tmp_path / "run")  # a rerun writes a clean index again
    _every_input_once(uri, faces)


def test_manifest_show_verify_reads_every_image(faces, tmp_path, capsys):
    _, uri = _degrade(faces, tmp_path / "run")
    capsys.readouterr()
    assert main(["manifest", "show", "--verify", uri]) == 0
    assert "verified:" in capsys.readouterr().out
    images = sorted((Path(uri) / "images").iterdir())
    images[0].write_bytes(images[1].read_bytes())  # same name and shard, other content
    assert main(["manifest", "show", uri]) == 0  # the cheap checks pass: shards are intact
    err = _cli_error(capsys, "manifest", "show", "--verify", uri)
    assert images[0].name in err and "sha256" in err

    shard = sorted((Path(uri) / "shards").iterdir())[0]
    shard.write_bytes(shard.read_bytes()[:-10])  # a changed size is caught without --verify
    assert shard.stem in _cli_error(capsys, "manifest", "show", uri)


ESCAPES = ["../elsewhere.safetensors", "/tmp/x.safetensors", "s3://bucket/x.safetensors", "unet/../../x", ""]


def _plant_weights(folder: Path, meta_name: str, weights: str) -> None:
    """Point the folder's metadata at ``weights``, with a real copy of the weights there when it is local."""
    meta = json.loads((folder / meta_name).read_text())
    if weights == ESCAPES[0]:
        shutil.copy(folder / meta["weights"], folder.parent / "elsewhere.safetensors")
    (folder / meta_name).write_text(json.dumps({**meta, "weights": weights}))


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory) -> dict[str, Path]:
    """A tiny prior folder and a tiny IDM model folder, as their writers make them."""
    from bfr_models.diffusion.prior import save_prior
    from bfr_models.diffusion.train import PriorTrainConfig, small_unet
    from bfr_models.idm import IDMConfig, idm_unet, save_idm

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    config = IDMConfig(crop=32, channels=(16, 32), layers_per_block=1, attention=(16,), norm_groups=8)
    return {"prior.json": Path(save_prior(small_unet(PriorTrainConfig(resolution=32, channels=(16, 32))),
                                          str(root / "prior"), variance_type="fixed_large")),
            "idm.json": Path(save_idm(idm_unet(config), config, str(root / "idm")))}


@pytest.mark.parametrize("meta_name", ["prior.json", "idm.json"])
@pytest.mark.parametrize("weights", ESCAPES)
def test_model_weights_outside_the_folder_are_refused(meta_name, weights, model_folders, tmp_path):
    from bfr_models.diffusion.prior import PriorError, load_prior
    from bfr_models.idm import IDMError, load_idm

    load, error = (load_prior, PriorError) if meta_name == "prior.json" else (load_idm, IDMError)
    folder = Path(shutil.copytree(model_folders[meta_name], tmp_path / "model"))
    load(str(folder))  # the folder as written loads
    _plant_weights(folder, meta_name, weights)
    with pytest.raises(error) as e:
        load(str(folder))
    assert f"{meta_name}: weights:" in _one_line_error(e) and "is not a relative path inside" in str(e.value)


@pytest.mark.parametrize("name", ["../../x", "/tmp/x", "s3://bucket/x", "a/../../x", ""])
def test_recipe_name_outside_runs_is_refused(name, faces, tmp_path, monkeypatch, capsys):
    from flows.recipe import RecipeError, load_recipe

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    recipe = work / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": name, "photos": str(faces), "degrade": {"preset": "gfpgan"}}))
    with pytest.raises(RecipeError) as e:
        load_recipe(str(recipe))
    assert "must be a plain name" in _one_line_error(e)
    assert "must be a plain name" in _cli_error(capsys, "run", str(recipe), "--device", "cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["faces", "work"]  # nothing written anywhere
    assert [p.name for p in work.iterdir()] == ["r.yaml"]


def test_a_planted_pickle_in_a_training_result_never_runs(faces, tmp_path):
    from flows.prior import prior_train_flow

    def train():
        state = prior_train_flow(input=str(faces), out=str(tmp_path / "run"), resolution=32, steps=2, batch_size=2,
                                 channels=(16, 32), device="cpu", return_state=True)
        return state, state.result()

    _, where = train()
    state, again = train()
    assert again == where and task_states(state) == ["Cached"]  # its plain-JSON record is trusted
    (record_file,) = (Path(where) / "_prefect").iterdir()
    marker = tmp_path / "payload-ran"
    record_file.write_text(json.dumps(_pickle_record(json.loads(record_file.read_text()), marker)))
    state, again = train()
    assert again == where and task_states(state) == ["Completed"] and not marker.exists()
