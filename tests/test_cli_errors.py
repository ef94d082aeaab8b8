"""Every user-facing failure is one line on stderr (exit 2: the user can fix it, 1: the run failed), and every
file of an input folder is a row (dotfiles and --exclude matches are skipped, and counted)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bfr_models import manifest
from bfr_models.manifest import ManifestWriter
from flows.cli import main
from flows.errors import explain
from tests.conftest import BIN, REPO, face_like, write_png


def run_cli(capfd, *argv: str) -> tuple[int, list[str], str]:
    """(exit code, stderr lines that are not progress bars, stdout) of an in-process `bfr-curate` run."""
    code = main(list(argv))
    out, err = capfd.readouterr()
    return code, [line for line in err.replace("\r", "\n").splitlines() if line.strip()], out


def assert_one_line(lines: list[str], *contains: str) -> None:
    assert len(lines) == 1, lines
    assert lines[0].startswith("bfr-curate: error: ") and "Traceback" not in lines[0]
    for text in contains:
        assert text in lines[0]


@pytest.fixture
def scored_manifest(tmp_path) -> str:
    writer = ManifestWriter(str(tmp_path / "scored"))
    png = (tmp_path / "face.png")
    write_png(png, face_like(0, 32))
    uri = writer.write_image("a", png.read_bytes())
    rows = [{"image_id": "a", "uri": uri, "stage": "degrade", "status": "ok", "width": 32, "height": 32, "niqe": 5.0}]
    writer.write_index("score", "k", {}, [writer.write_shard("s", rows)])
    return writer.stage_uri


def test_report_of_a_folder_is_one_line(capfd, image_folder, tmp_path):
    code, lines, _ = run_cli(capfd, "report", "--input", str(image_folder), "--out", str(tmp_path / "r.html"))
    assert code == 2
    assert_one_line(lines, "not a manifest", str(image_folder))


def test_report_into_an_existing_folder_writes_report_html_there(capfd, scored_manifest, tmp_path):
    folder = tmp_path / "reports"
    folder.mkdir()
    code, lines, out = run_cli(capfd, "report", "--input", scored_manifest, "--out", str(folder))
    assert code == 0, lines
    assert (folder / "report.html").read_text().lstrip().lower().startswith("<!doctype html")
    assert not list(tmp_path.rglob("*.tmp")) and str(folder / "report.html") in out


def test_a_file_that_is_not_weights_is_one_line(capfd, tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    code, lines, _ = run_cli(capfd, "prior", "convert", str(path), "--arch", "ffhq256", "--out", str(tmp_path / "p"))
    assert code == 2
    assert_one_line(lines)
    assert "weights_only" not in lines[0]  # never suggests turning safety off


def test_an_error_inside_a_flow_is_one_line_without_prefects_traceback(capfd, scored_manifest, tmp_path):
    code, lines, _ = run_cli(capfd, "degrade", "--input", scored_manifest, "--preset", "gfpgan", "--exclude", "*.txt",
                             "--out", str(tmp_path / "run"), "--device", "cpu")
    assert code == 2
    assert_one_line(lines, "--exclude applies to folder inputs")


def test_debug_prints_the_traceback(capfd, image_folder, tmp_path):
    code = main(["--debug", "report", "--input", str(image_folder), "--out", str(tmp_path / "r.html")])
    err = capfd.readouterr().err
    assert code == 2 and "Traceback" in err and err.rstrip().splitlines()[-1].startswith("bfr-curate: error: ")


def run_console(*argv: str, env: dict, unset: tuple[str, ...] = ()) -> tuple[int, list[str]]:
    """(exit code, stderr lines) of the `bfr-curate` console script, as a user runs it."""
    env = {**{k: v for k, v in os.environ.items() if k not in unset}, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           **env}
    proc = subprocess.run([str(BIN / "bfr-curate"), *argv], capture_output=True, text=True, env=env, timeout=600)
    return proc.returncode, [line for line in proc.stderr.replace("\r", "\n").splitlines() if line.strip()]


@pytest.mark.parametrize("case", ["out-is-a-file", "s3-without-credentials"])
def test_store_failures_are_explained_in_one_line(tmp_path, case):
    folder = tmp_path / "in"
    write_png(folder / "a.png", face_like(0, 16))
    env, unset = {}, ()
    if case == "out-is-a-file":
        out = tmp_path / "out"
        out.write_text("a file, not a folder")
        out, expected = str(out), str(out)
    else:
        unset = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
        env = dict(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
                   AWS_EC2_METADATA_DISABLED="true",
                   AWS_ENDPOINT_URL="http://127.0.0.1:9")  # nothing listens there: nothing leaves this machine
        out, expected = "s3://no-such-bucket/run", "credentials"
    code, lines = run_console("degrade", "--input", str(folder), "--preset", "gfpgan", "--out", out,
                              "--device", "cpu", env=env, unset=unset)
    assert code == 2  # found by the write probe, before any work
    assert_one_line(lines, expected)


def test_exit_codes_say_whose_fault_it_is():
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError

    from flows.stage import StageError

    assert explain(NoCredentialsError())[0] == 2 and "credentials" in explain(NoCredentialsError())[1]
    assert explain(PermissionError(13, "Permission denied", "/proc/x")) == (2, "/proc/x: Permission denied")
    assert explain(ValueError("bad\nconfig")) == (2, "bad config")  # one line, whatever the message holds
    assert explain(StageError("1 of 2 shards failed"))[0] == 1
    assert explain(EndpointConnectionError(endpoint_url="http://x"))[0] == 1
    assert explain(TimeoutError(110, "Connection timed out"))[0] == 1
    assert explain(KeyError(7)) == (1, "KeyError: 7 (bfr-curate --debug ... prints the traceback)")
    assert explain(pickle.UnpicklingError("Weights only load failed ... weights_only=False"))[0] == 2
    assert "weights_only" not in explain(pickle.UnpicklingError("weights_only=False"))[1]


@pytest.fixture
def mixed_folder(tmp_path):
    """Everything a user's folder may hold besides plain images."""
    folder = tmp_path / "mixed"
    write_png(folder / "a.png", face_like(0, 32))
    (folder / "sub").mkdir()
    shutil.copy(folder / "a.png", folder / "sub" / "b.png")  # a byte-identical copy
    frames = [Image.fromarray(np.full((32, 32, 3), 60 * k, np.uint8)) for k in range(3)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    (folder / "notes.txt").write_text("not an image\n")
    (folder / "sub" / "notes.txt").write_text("not an image\n")  # an identical bad file: its own row too
    (folder / ".DS_Store").write_bytes(b"\0\1")
    write_png(folder / ".cache" / "c.png", face_like(1, 32))
    write_png(folder / "draft_1.png", face_like(2, 32))
    return folder


def test_every_file_of_a_folder_is_a_row(capfd, mixed_folder, tmp_path):
    code, lines, out = run_cli(capfd, "restore", "--input", str(mixed_folder), "--restorer", "none",
                               "--exclude", "draft_*", "--out", str(tmp_path / "run"), "--device", "cpu")
    assert code == 0, lines
    assert "skipped:  3 input files" in out  # .DS_Store, .cache/c.png, draft_1.png
    uri = out.split("manifest: ")[1].split()[0].rsplit("/", 1)[0]
    index = manifest.read_index(uri)
    assert index["config"]["skipped_inputs"] == 3 and index["config"]["exclude"] == ["draft_*"]
    df = manifest.read_manifest(uri).set_index("parent_uri")
    rows = {name: df.loc[str(mixed_folder / name)] for name in ("a.png", "sub/b.png", "anim.gif", "notes.txt",
                                                              "sub/notes.txt")}
    assert len(df) == 5 and df["image_id"].is_unique
    assert rows["notes.txt"].status == "error" and rows["notes.txt"].error == "not an image: .txt"
    assert rows["sub/notes.txt"].duplicate_of == rows["notes.txt"].image_id
    assert json.loads(rows["anim.gif"].params)["frames"] == 3 and rows["anim.gif"].status == "ok"
    a, b = rows["a.png"], rows["sub/b.png"]
    # identical inputs, identical (identity-restored) outputs: still two rows, two ids, two files
    assert a.sha256 == b.sha256 and a.uri != b.uri and a.parent_id != b.parent_id
    assert b.duplicate_of == a.parent_id and pd.isna(a.duplicate_of)
    assert a.uri.endswith(f"/images/{a.image_id}.png") and b.uri.endswith(f"/images/{b.image_id}.png")
