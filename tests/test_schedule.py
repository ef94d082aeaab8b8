"""`bfr-curate schedule`: a served deployment runs the recipe on its schedule, and later runs are incremental."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from bfr_models import manifest
from bfr_models.idm import IDMConfig, idm_unet, save_idm
from flows.schedule import ScheduleError, make_schedule, recipe_deployment
from tests.conftest import BIN, face_like, write_png

TINY = IDMConfig(crop=32, channels=(16, 32, 32), layers_per_block=1, attention=(8,), norm_groups=8)


def test_deployment_carries_the_recipe_and_the_schedule(tmp_path):
    d = recipe_deployment("clean_nightly", cron="0 3 * * *", out=str(tmp_path / "run"), device="cpu")
    assert d.name == "clean_nightly" and d.schedules[0].schedule.cron == "0 3 * * *"
    assert d.parameters["recipe"]["clean"]["rounds"] == 1 and d.parameters["out"] == str(tmp_path / "run")
    assert os.path.isabs(d.parameters["recipe"]["photos"])
    assert make_schedule(None, 3600).interval.total_seconds() == 3600


@pytest.mark.parametrize("cron, interval, match", [
    ("0 3 * *", None, "not a valid cron string"), ("* * * * *", 60, "exactly one"), (None, None, "exactly one"),
    (None, -1, "must be > 0")])
def test_bad_schedules_are_one_line(cron, interval, match):
    with pytest.raises(ScheduleError, match=match) as e:
        make_schedule(cron, interval)
    assert "\n" not in str(e.value)


def _clean_rows(run) -> int:
    folders = list((run / "clean").glob("*/index.json")) if (run / "clean").exists() else []
    return manifest.read_index(str(folders[0].parent))["rows"] if folders else 0


def _server_pid(parent: int) -> int:
    """The `prefect server start` process `schedule` started (a child of ``parent``)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == parent and b"server" in (stat.parent / "cmdline").read_bytes():
                return int(stat.parent.name)
        except (OSError, IndexError, ValueError):
            continue  # a process that ended meanwhile
    raise AssertionError(f"no Prefect server process under {parent}")


def test_template_recipe_with_missing_paths_fails_before_serving(tmp_path, capsys):
    from flows.cli import main

    assert main(["schedule", "clean_nightly", "--cron", "0 3 * * *", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bfr-curate: error: recipe ") and "photos" in err and "not found" in err
    assert "\n" not in err and not (tmp_path / "run" / "prefect-server.log").exists()  # no server was started


def test_served_recipe_runs_on_schedule_and_only_new_images_are_cleaned(tmp_path, page):
    faces = tmp_path / "faces"
    faces.mkdir()
    for i in range(12):
        write_png(faces / f"f{i:02d}.png", face_like(i, 32))
    save_idm(idm_unet(TINY), TINY, str(tmp_path / "model"))
    recipe = tmp_path / "nightly.yaml"
    recipe.write_text(yaml.safe_dump({"name": "nightly", "photos": str(faces), "idm": {"uri": str(tmp_path / "model")},
                                      "clean": {"steps": 2}, "score": {"metrics": "niqe"}, "report": {}}))
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # the command starts its own server
    env["TMPDIR"] = str(tmp_path / "tmp")  # to see what the command leaves there
    (tmp_path / "tmp").mkdir()
    log = open(tmp_path / "serve.log", "wb")  # a file, not a pipe: progress bars would fill a pipe and block
    proc = subprocess.Popen([str(BIN / "bfr-curate"), "schedule", str(recipe), "--interval", "15", "--out", str(run),
                             "--device", "cpu"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (run / "report.html").exists():
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(1)
        assert (run / "report.html").exists(), (tmp_path / "serve.log").read_text()[-3000:]
        assert _clean_rows(run) == 12
        # the printed UI address shows the deployment (the UI is a JS app talking to the server's API)
        ui = re.search(r"Prefect UI: (http://127\.0\.0\.1:\d+/)", (tmp_path / "serve.log").read_text()).group(1)
        page.goto(ui)
        page.get_by_role("link", name="Deployments").first.click()
        page.wait_for_selector("text=nightly", timeout=60_000)
        assert "Can't connect to Server API" not in page.inner_text("body")
        candidates = {p.name for p in run.glob("clean/*/images/*.png")}
        for i in range(12, 15):  # new images arrive; the next scheduled run cleans only them
            write_png(faces / f"f{i:02d}.png", face_like(i, 32))
        while time.time() < deadline and _clean_rows(run) != 15:
            time.sleep(1)
        assert _clean_rows(run) == 15
        index = manifest.read_index(str(next((run / "clean").glob("*/index.json")).parent))
        assert len(index["shards"]) >= 2  # the earlier shard(s) kept, the new images in new ones
        assert candidates <= {p.name for p in run.glob("clean/*/images/*.png")}
        # the server dies: the command ends with one line naming the server's log
        os.kill(_server_pid(proc.pid), signal.SIGKILL)
        assert proc.wait(60) == 1
        log_line = (tmp_path / "serve.log").read_text().strip().splitlines()[-1]
        assert log_line == (f"bfr-curate: error: the local Prefect server stopped (exit code -9); "
                            f"its log: {run / 'prefect-server.log'}")
        assert f"dashboard at {ui.rstrip('/')}" in (run / "prefect-server.log").read_text()  # the server's own output
        assert not list((tmp_path / "tmp").glob("bfr-curate-api-*"))  # its clients' CA file went with it
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
