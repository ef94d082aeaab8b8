"""``bfr-curate schedule``: serve a recipe as a Prefect deployment on a cron or interval schedule.

The deployment runs :func:`flows.recipe.recipe_flow` with the recipe's content, the output root and the
device as parameters. With no ``PREFECT_API_URL`` Prefect's embedded API serves it from this process;
with one, the deployment and its runs appear on that server. Every stage of the recipe is cached, and the
clean stage is incremental, so a nightly run processes only images added since the last one.
"""

from __future__ import annotations

from datetime import timedelta

from bfr_models import storage


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


def recipe_deployment(recipe_path: str, cron: str | None = None, interval: float | None = None,
                      out: str | None = None, device: str = "auto", name: str | None = None):
    """The deployment ``schedule`` serves (validated recipe, schedule and parameters; nothing runs)."""
    from flows.recipe import load_recipe, recipe_flow

    schedule = make_schedule(cron, interval)
    recipe = load_recipe(recipe_path)
    out = storage.normalize(out or f"./runs/{recipe['name']}")
    return recipe_flow.to_deployment(name=name or recipe["name"], schedules=[schedule],
                                     parameters={"recipe": recipe, "out": out, "device": device},
                                     description=f"bfr-curate recipe {recipe['path']} -> {out}",
                                     tags=["bfr-curate", recipe["name"]])


def serve_recipe(recipe_path: str, cron: str | None = None, interval: float | None = None, out: str | None = None,
                 device: str = "auto", name: str | None = None, limit: int | None = None) -> None:
    """Serve the recipe's deployment until interrupted (Ctrl-C)."""
    from prefect import serve

    deployment = recipe_deployment(recipe_path, cron, interval, out, device, name)
    serve(deployment, limit=limit)
