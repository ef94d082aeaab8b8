"""``bfr-curate schedule``: serve a recipe as a Prefect deployment on a cron or interval schedule.

The deployment runs :func:`flows.recipe.recipe_flow` with the recipe's content, the output root and the
device as parameters. Before anything starts, the recipe, the schedule, the paths the recipe names and
the output root are checked (one line on error). With ``PREFECT_API_URL`` set, the deployment and its
runs live on that server. Without it, the command starts a local Prefect server of its own (``prefect
server start`` on 127.0.0.1, a free port, the same SQLite database as the embedded API, its UI pointed
at that port) for as long as it serves, its output in ``<out>/prefect-server.log``: Prefect's
in-process embedded API runs no scheduler service, so nothing would ever be scheduled on it. If that
server dies, the command stops with one line naming its log. Every stage of the recipe is cached and
the clean stage is incremental, so a nightly run processes only images added since the last one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from bfr_models import storage
from flows.api_server import end_process, free_port, use_api, wait_healthy
from flows.api_server import startup_timeout as api_startup_timeout


class ScheduleError(ValueError):
    """A schedule that cannot be served: a cron string that does not parse, no schedule or two. One line."""


def make_schedule(cron: str | None, interval: float | None, timezone: str = "UTC"):
    """A Prefect schedule from ``--cron`` or ``--interval`` seconds, checked before anything is served."""
    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule

    if (cron is None) == (interval is None):
        raise ScheduleError("give exactly one of --cron (e.g. '0 3 * * *') or --interval SECONDS")
    if interval is not None:
        if interval <= 0:
            raise ScheduleError(f"--interval must be > 0 seconds, got {interval}")
        return IntervalSchedule(interval=timedelta(seconds=interval))
    try:
        return CronSchedule(cron=cron, timezone=timezone)
    except Exception:  # pydantic's multi-line ValidationError
        raise ScheduleError(f"--cron {cron!r} is not a valid cron string (five fields: minute hour day-of-month "
                            f"month day-of-week, e.g. '0 3 * * *')") from None


def _absolute(recipe: dict) -> dict:
    """Relative paths made absolute here: flow runs start later, in other processes."""
    if recipe["photos"] != "demo":
        recipe["photos"] = storage.normalize(recipe["photos"])
    for stage in ("idm", "prior"):
        if "uri" in recipe.get(stage, {}) and storage.exists(recipe[stage]["uri"]):
            recipe[stage]["uri"] = storage.normalize(recipe[stage]["uri"])
    return recipe


def recipe_deployment(recipe_path: str, cron: str | None = None, interval: float | None = None,
                      out: str | None = None, device: str = "auto", name: str | None = None):
    """The deployment ``schedule`` serves (validated recipe, schedule and parameters; nothing runs)."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    from flows.recipe import load_recipe, recipe_flow

    schedule = make_schedule(cron, interval)
    recipe = _absolute(load_recipe(recipe_path))
    out = storage.normalize(out or f"./runs/{recipe['name']}")
    # one run at a time: a run still going when the next is due makes that one cancel (it would redo the same work)
    once = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)
    return recipe_flow.to_deployment(name=name or recipe["name"], schedules=[schedule], concurrency_limit=once,
                                     parameters={"recipe": recipe, "out": out, "device": device},
                                     description=f"bfr-curate recipe {recipe['path']} -> {out}",
                                     tags=["bfr-curate", recipe["name"]])


SERVER_LOG = "prefect-server.log"  # the local server's output, in the run's folder


class ServerStopped(RuntimeError):
    """The local Prefect server did not start: one line naming its log, exit code 1."""

    exit_code = 1


def check_recipe_inputs(recipe: dict) -> None:
    """Every path the recipe names exists (a prior may also be a model card name): checked once before
    serving, instead of a FileNotFoundError traceback at every scheduled run."""
    from bfr_models.models import ModelCardError, get_card
    from flows.recipe import RecipeError

    paths = [("photos", recipe["photos"] if recipe["photos"] != "demo" else None),
             ("idm.uri", recipe.get("idm", {}).get("uri")), ("prior.uri", recipe.get("prior", {}).get("uri")),
             ("clean.model", recipe.get("clean", {}).get("model")),
             ("pseudo_targets.prior", recipe.get("pseudo_targets", {}).get("prior"))]
    for name, uri in paths:
        if uri is None or storage.exists(str(uri)):
            continue
        if name.endswith("prior") or name == "prior.uri":
            try:
                get_card(str(uri))
                continue
            except ModelCardError:
                pass
        raise RecipeError(f"recipe {recipe['path']}: {name} {uri} not found (edit the recipe before serving it)")


def server_log_path(out: str, recipe_name: str) -> Path:
    """Where the local server's output goes: the run's folder, or ./runs/<name>/ when the run is not local."""
    folder = Path(storage.normalize(out)) if storage.is_local(out) else Path("runs", recipe_name).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    return folder / SERVER_LOG


@dataclass
class PrefectApi:
    """The API ``schedule`` serves on: its URL, its UI's URL, and for a server started here its log and an
    event set when this command stops it."""

    url: str
    ui: str
    log: Path | None = None
    stopping: threading.Event = field(default_factory=threading.Event)


def local_server_env(port: int) -> dict:
    """The server's environment: its API and its UI's API URL on the port it serves (the UI otherwise
    calls 127.0.0.1:4200, where nothing answers)."""
    url = f"http://127.0.0.1:{port}/api"
    return {**os.environ, "PREFECT_API_URL": url, "PREFECT_UI_API_URL": url, "PREFECT_UI_URL": url.removesuffix("/api"),
            "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port)}


def _watch(server: subprocess.Popen, api: PrefectApi) -> None:
    """End the command with one line when the server process exits (serving on would only print
    connection errors)."""
    code = server.wait()
    if not api.stopping.is_set():
        from flows.stop import exit_now

        _stop_served_runs()
        # a served run's progress bar may have left its line open: the error starts on a line of its own
        exit_now(f"\nbfr-curate: error: the local Prefect server stopped (exit code {code}); its log: {api.log}")


def _stop_served_runs(wait: float = 3.0) -> None:
    """Stop the flow runs Prefect's runner started (this process's children): they cannot report to a dead
    server, and would go on writing to this command's output after its last line."""
    import psutil

    runs = psutil.Process().children(recursive=True)
    for run in runs:
        try:
            run.terminate()
        except psutil.NoSuchProcess:
            pass
    for run in psutil.wait_procs(runs, timeout=wait)[1]:
        try:
            run.kill()
        except psutil.NoSuchProcess:
            pass


@contextmanager
def prefect_api(log: Path, startup_timeout: float | None = None):
    """The Prefect API to serve on: ``PREFECT_API_URL`` when set, else a local server started here (output to
    ``log``; stopped on exit) whose URL is exported to this process and the flow-run processes it starts."""
    if os.environ.get("PREFECT_API_URL"):
        from prefect.settings import PREFECT_UI_URL

        url = os.environ["PREFECT_API_URL"]
        yield PrefectApi(url=url, ui=(PREFECT_UI_URL.value() or url.removesuffix("/api")).rstrip("/"))
        return
    port = free_port()
    env = local_server_env(port)
    api = PrefectApi(url=env["PREFECT_API_URL"], ui=env["PREFECT_UI_URL"], log=log)
    cmd = [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
           "--analytics-off"]
    with open(log, "ab") as out:
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                  start_new_session=True)  # Ctrl-C reaches this process only; it stops the server
    from flows.stop import stop_on_exit

    stop_on_exit(server)
    try:
        if not wait_healthy(api.url, server, startup_timeout or api_startup_timeout()):
            raise ServerStopped(f"the local Prefect server did not start on {api.url.removesuffix('/api')} "
                                f"(its log: {log}; or set PREFECT_API_URL to a running server)")
        threading.Thread(target=_watch, args=(server, api), daemon=True, name="prefect-server-watch").start()
        with use_api(api.url):
            yield api
    finally:
        api.stopping.set()  # from here on its exit is no death to report
        end_process(server, 30)


def _when(deployment) -> str:
    schedule = deployment.schedules[0].schedule
    if getattr(schedule, "cron", None):
        return f"cron '{schedule.cron}' {schedule.timezone}"
    return f"every {schedule.interval.total_seconds():g} s"


def serve_recipe(recipe_path: str, cron: str | None = None, interval: float | None = None, out: str | None = None,
                 device: str = "auto", name: str | None = None, limit: int = 1) -> None:
    """Check the recipe, schedule and input paths, start (or use) the API, serve until Ctrl-C or until the
    local server dies (one line naming its log)."""
    from prefect import serve

    deployment = recipe_deployment(recipe_path, cron, interval, out, device, name)
    recipe = deployment.parameters["recipe"]
    check_recipe_inputs(recipe)
    storage.check_writable(deployment.parameters["out"])
    with prefect_api(server_log_path(deployment.parameters["out"], recipe["name"])) as api:
        print(f"Prefect UI: {api.ui}/  (Deployments -> {deployment.name}; API {api.url}"
              + (f"; server log {api.log})" if api.log else ")"), flush=True)
        print(f"serving deployment {deployment.name!r} of flow 'recipe' ({_when(deployment)}); Ctrl-C stops",
              flush=True)
        serve(deployment, limit=limit, print_starting_message=False)
