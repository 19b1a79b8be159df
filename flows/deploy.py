"""Scheduled runs of the pipeline flow: a deployment on a `process` work pool (`tlops deploy`), or the same
schedule served from this process without a worker (`tlops serve-schedule`). prefect.yaml declares the same
deployment for `prefect deploy`.

A scheduled run re-reads the data source first (`refresh`): on unchanged data every stage is skipped and the run
reports "no change"; on new data the stages that depend on it run and the promotion gate decides.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from flows.pipeline import pipeline_flow
from tlops.core.config import Params, ScheduleParams
from tlops.core.errors import ConfigError

ENTRYPOINT = "flows/pipeline.py:pipeline_flow"
SCHEDULED_PARAMETERS = {"refresh": True}
SCHEDULE_SLUG = "tlops-cron"  # a stable name, so redeploying replaces the schedule instead of adding one
# The library's own log lines (tlops.*) go to the Prefect UI beside the stage task's prints.
RUN_ENV = {"PREFECT_LOGGING_EXTRA_LOGGERS": "tlops"}
DESCRIPTION = "tlops pipeline on its schedule: re-read the data source, then bring every DVC stage up to date"


def deploy(params: Params, root: Path | None = None) -> dict[str, Any]:
    """Create or update the pipeline's deployment: schedule.cron in schedule.timezone, on the `process` work pool
    schedule.work_pool (created if missing), running in `root` (default: the working directory)."""
    s = params.schedule
    schedule = cron_schedule(s)
    _require_server("tlops deploy")
    root = (root or Path.cwd()).resolve()
    pool_type = ensure_process_pool(s.work_pool)
    variables = job_variables(s, root)
    # to_deployment + apply is what Flow.deploy does for an image-less pool, minus its warning about a pool with no
    # worker online yet (the README starts the worker in its own step, before or after this one).
    deployment = pipeline_flow.from_source(source=str(root), entrypoint=ENTRYPOINT).to_deployment(
        name=s.deployment, work_pool_name=s.work_pool, schedules=[schedule], parameters=SCHEDULED_PARAMETERS,
        job_variables=variables, concurrency_limit=1, description=DESCRIPTION, tags=["tlops"])
    deployment_id = deployment.apply()
    return {"deployment_id": str(deployment_id), "name": f"{pipeline_flow.name}/{s.deployment}",
            "work_pool": s.work_pool, "work_pool_type": pool_type, "cron": s.cron, "timezone": s.timezone,
            "parameters": SCHEDULED_PARAMETERS, "job_variables": variables}


def serve_schedule(params: Params) -> None:
    """Run the pipeline on its schedule from this process, with no worker; blocks until interrupted."""
    s = params.schedule
    schedule = cron_schedule(s)
    _require_server("tlops serve-schedule")
    os.environ.update({**RUN_ENV, **s.env})  # served runs are child processes of this one: they inherit it
    pipeline_flow.serve(name=s.deployment, schedules=[schedule], parameters=SCHEDULED_PARAMETERS, limit=1,
                        global_limit=1, description=DESCRIPTION, tags=["tlops"])


def cron_schedule(s: ScheduleParams) -> Any:
    """The Prefect cron schedule of params' schedule section; ConfigError naming the bad key."""
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.schedules import Cron

    try:
        ZoneInfo(s.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"schedule.timezone: {s.timezone!r} is not an IANA time zone (e.g. UTC, Europe/Berlin)"
                          ) from None
    try:
        CronSchedule(cron=s.cron, timezone=s.timezone)
    except ValueError as e:
        raise ConfigError(f"schedule.cron: {s.cron!r} is not a valid cron expression ({_first_error(e)})") from None
    return Cron(s.cron, timezone=s.timezone, slug=SCHEDULE_SLUG)


def job_variables(s: ScheduleParams, root: Path) -> dict[str, Any]:
    """What the process worker sets up for each run: the environment (e.g. CUDA_VISIBLE_DEVICES) and the folder."""
    return {"env": {**RUN_ENV, **s.env}, "working_dir": str(root)}


def ensure_process_pool(name: str) -> str:
    """The type of work pool `name`, created as a `process` pool when missing; ConfigError for another type."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            pool = client.create_work_pool(WorkPoolCreate(
                name=name, type=ProcessWorker.type, base_job_template=ProcessWorker.get_default_base_job_template()))
    if pool.type != ProcessWorker.type:
        raise ConfigError(f"schedule.work_pool: pool {name!r} is of type {pool.type!r}; the pipeline runs in the "
                          "project folder on the worker's machine and needs a `process` pool (choose another name)")
    return pool.type


def _require_server(command: str) -> None:
    """Deployments live on a Prefect server: a temporary one would vanish with this process."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL

    hint = ("start one with `prefect server start`, then `export PREFECT_API_URL=http://127.0.0.1:4200/api` "
            "(or `prefect config set PREFECT_API_URL=...`)")
    url = PREFECT_API_URL.value()
    if not url:
        raise ConfigError(f"{command} needs a Prefect server and PREFECT_API_URL is not set: {hint}")
    with get_client(sync_client=True) as client:
        error = client.api_healthcheck()
    if error is not None:
        raise ConfigError(f"{command}: the Prefect server at {url} does not answer ({error}); {hint}")


def _first_error(e: ValueError) -> str:
    errors = getattr(e, "errors", None)
    return errors()[0]["msg"] if callable(errors) else str(e).splitlines()[0]
