"""``bfr-curate schedule``: serve a recipe as a Prefect deployment on a cron or interval schedule.

The deployment runs :func:`flows.recipe.recipe_flow` with the recipe's content, the output root and the
device as parameters. With ``PREFECT_API_URL`` set, the deployment and its runs live on that server.
Without it, the command starts a local Prefect server of its own (127.0.0.1, the same SQLite database
as the embedded API, its UI included) for as long as it serves: Prefect's in-process embedded API runs
no scheduler service, so nothing would ever be scheduled on it. Every stage of the recipe is cached and
the clean stage is incremental, so a nightly run processes only images added since the last one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

from bfr_models import storage
from flows.api_server import free_port, use_api, wait_healthy
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


@contextmanager
def prefect_api(startup_timeout: float | None = None):
    """The Prefect API to serve on: ``PREFECT_API_URL`` when set, else a local server started here (and stopped
    on exit) whose URL is exported to this process and the flow-run processes it starts."""
    if os.environ.get("PREFECT_API_URL"):
        yield os.environ["PREFECT_API_URL"]
        return
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    cmd = [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
           "--analytics-off"]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if not wait_healthy(url, server, startup_timeout or api_startup_timeout()):
            raise ScheduleError(f"the local Prefect server did not start on 127.0.0.1:{port} "
                                f"(run `prefect server start` to see why, or set PREFECT_API_URL)")
        with use_api(url):
            yield url
    finally:
        server.terminate()
        server.wait(30)


def serve_recipe(recipe_path: str, cron: str | None = None, interval: float | None = None, out: str | None = None,
                 device: str = "auto", name: str | None = None, limit: int = 1) -> None:
    """Serve the recipe's deployment until interrupted (Ctrl-C)."""
    from prefect import serve

    with prefect_api() as url:
        print(f"Prefect API: {url} (its UI at {url.removesuffix('/api')})", flush=True)
        deployment = recipe_deployment(recipe_path, cron, interval, out, device, name)
        serve(deployment, limit=limit)
