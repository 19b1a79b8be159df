"""The pipeline flow: the stages of dvc.yaml in dependency order, each one Prefect task run named by its stage.

dvc.yaml is the only list of stages. DVC decides what runs (orchestration/dvc_stages.py): a stage unchanged since
dvc.lock
is skipped and shows as a Completed task run named "Skipped"; one whose outputs DVC restores from its run cache
shows as "Cached"; a changed stage runs here, in this process (the `stage_task` of the module its cmd runs), and is
recorded in dvc.lock and .dvc/cache as `dvc repro` records it. So `tlops run` and `dvc repro` never redo each
other's work. One run at a time per workspace; the whole run is one MLflow parent run.
"""

from __future__ import annotations

import importlib
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import Task, flow, task
from prefect.states import Completed, State
from prefect.tasks import exponential_backoff

from orchestration import dvc_stages
from orchestration import report as pipeline_report
from orchestration.prefect_server import TemporaryServer, prefect_api
from orchestration.report import StageRecord
from orchestration.workspace import workspace_lock
from tlops.core import paths
from tlops.core.config import Params, ScheduleParams, load_params
from tlops.core.config import params_path as resolve_params_path
from tlops.core.config import set_params as write_params
from tlops.core.errors import ConfigError, TlopsError, is_permanent
from tlops.tracking import runs

if TYPE_CHECKING:
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

log = logging.getLogger(__name__)

REFRESH_STAGES = ("ingest", "ingest_target")  # the stages that read the data sources; `refresh` re-runs them
LOCK_FILE = paths.STATE_DIR / "pipeline.lock"


@flow(name="pipeline")
def pipeline_flow(params_path: str | None = None, refresh: bool = False, force: bool = False,
                  set_params: dict[str, Any] | None = None, sync: bool | None = None,
                  until: str | None = None) -> dict[str, Any]:
    """Bring every stage of dvc.yaml up to date: `refresh` re-reads the data source first, `force` re-runs all;
    `until` names the last stage: only it and the stages it depends on (as `dvc repro <until>`).

    `set_params` ({"adapt.target": "/logs", ...}) is written into the params file first, under the workspace lock,
    as `dvc exp run --set-param` does: the run, dvc.lock and MLflow all see the new values (tlops drift-check
    starts runs this way). `sync` (default: $TLOPS_SYNC) pulls code and data first and pushes the outputs after
    (orchestration/sync.py): a worker's own clone kept in step with the team's.
    """
    from orchestration import sync as syncing

    params = load_params(params_path)
    _check_params_file(params_path)
    from tlops.data.version import forget_data_version

    forget_data_version()  # learnt anew once the ingest stage is up to date
    started = time.perf_counter()
    records: list[StageRecord] = []
    with workspace_lock(LOCK_FILE, params.schedule.lock_timeout_s):
        if syncing.enabled(sync):  # under the lock: never under a run still going in this clone
            log.info("sync: %s", ", ".join(syncing.pull()) or "nothing to pull")
            params = load_params(params_path)
        if set_params:
            params = write_params(set_params, params_path)
            log.info("params set for this run: %s", ", ".join(f"{k}={v!r}" for k, v in set_params.items()))
        with runs.pipeline_run(params) as parent:
            try:
                with dvc_stages.open_repo() as repo:
                    _run_stages(repo, params, params_path, refresh, force, records, until)
            finally:
                summary = _finish(records, time.perf_counter() - started, parent)
        if syncing.enabled(sync):
            log.info("sync: %s", ", ".join(syncing.push()) or "nothing to push (no DVC remote)")
    return summary


def run_pipeline(params_path: str | None = None, refresh: bool = False, force: bool = False,
                 server: TemporaryServer | None = None, set_params: dict[str, Any] | None = None,
                 sync: bool | None = None, until: str | None = None) -> dict[str, Any]:
    """What `tlops run` does: the pipeline flow in this process. Returns its summary; raises what failed it.

    Without a configured Prefect API the flow talks to a temporary server: `server` when the caller spawned one
    early (tlops.cli does, before importing anything heavy), else one spawned here.
    """
    # _preload while a temporary server starts; with a running server there is nothing to overlap, and each stage
    # imports what it needs when it runs (nothing, when every stage is cached).
    with prefect_api(server, while_starting=_preload):
        return pipeline_flow(params_path=params_path, refresh=refresh, force=force, set_params=set_params, sync=sync,
                             until=until)


def _run_stages(repo: Repo, params: Params, params_path: str | None, refresh: bool, force: bool,
                records: list[StageRecord], until: str | None = None) -> None:
    """Each stage in order (up to `until`); on a failure record it (and the stages left) and re-raise."""
    from tlops.data.version import remember_data_version

    stages = dvc_stages.pipeline_stages(repo, until)
    for stage in stages:  # a stage that cannot run in-process fails the run before any stage runs
        dvc_stages.stage_module(stage)
    for i, stage in enumerate(stages):
        started = time.perf_counter()
        try:
            records.append(_bring_up_to_date(repo, stage, params, params_path,
                                             force=force or (refresh and stage.name in REFRESH_STAGES)))
            if version := dvc_stages.output_hash(stage, paths.RAW):  # DVC has just hashed the data: pass it on
                remember_data_version(version)
        except BaseException as exc:
            records.append(StageRecord(stage.name, "failed", time.perf_counter() - started, _one_line(exc)))
            records.extend(StageRecord(s.name, "not run", 0.0, f"{stage.name} failed") for s in stages[i + 1:])
            raise


def _bring_up_to_date(repo: Repo, stage: PipelineStage, params: Params, params_path: str | None,
                      force: bool) -> StageRecord:
    """Run, restore or skip one stage as DVC decides; every stage shows as one task run named by the stage."""
    started = time.perf_counter()
    timing = {"task": 0.0}

    def execute() -> Any:
        stage_task = _configured(_stage_task(stage), stage.name, params.schedule)
        t0 = time.perf_counter()
        try:
            return stage_task(params_path)
        finally:
            timing["task"] = time.perf_counter() - t0

    try:
        done = dvc_stages.reproduce(repo, stage, execute, force=force)
    except TimeoutError as exc:
        raise TlopsError(f"stage {stage.name} ran longer than schedule.stage_timeout_s="
                         f"{params.schedule.stage_timeout_s:g} s ({exc})") from exc
    if done.outcome != "ran":
        name = "Skipped" if done.outcome == "skipped" else "Cached"
        _stand_in.with_options(name=stage.name, task_run_name=stage.name)(name, done.reason)
    return StageRecord(stage.name, done.outcome, time.perf_counter() - started, done.reason,
                       done.outputs_changed, timing["task"])


@task
def _stand_in(state_name: str, message: str) -> State:
    """The task run of a stage that DVC did not need to run: Completed, named Skipped or Cached."""
    return Completed(name=state_name, message=message)


def _stage_task(stage: PipelineStage) -> Task:
    """The `stage_task` of the module that the stage's cmd runs, imported as `python -m` would from the root."""
    module_name = dvc_stages.stage_module(stage)
    root = str(Path(stage.repo.root_dir).resolve())
    sys.path.insert(0, root)  # `python -m` puts the working directory first
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ConfigError(f"dvc.yaml: stage {stage.name} runs `{stage.cmd}` but {e.name} cannot be imported") from None
    finally:
        sys.path.remove(root)
    stage_task = getattr(module, "stage_task", None)
    if not isinstance(stage_task, Task):
        raise ConfigError(f"{module_name} has no Prefect task `stage_task`: the pipeline calls it for stage "
                          f"{stage.name}")
    return stage_task


def _configured(stage_task: Task, name: str, schedule: ScheduleParams) -> Task:
    """The stage task with the run's failure policy: retries with backoff, a timeout, prints in the Prefect logs."""
    return stage_task.with_options(
        name=name, task_run_name=name,
        retries=schedule.retries,
        retry_delay_seconds=exponential_backoff(schedule.retry_delay_s)(schedule.retries),
        retry_condition_fn=_is_transient,
        timeout_seconds=schedule.stage_timeout_s,
        log_prints=True,
    )


def _is_transient(task: Task, task_run: Any, state: State) -> bool:
    """Prefect retry condition: retry a failed stage unless its error is one a retry cannot fix."""
    exc = state.data
    return not (isinstance(exc, BaseException) and is_permanent(exc))


def _finish(records: list[StageRecord], seconds: float, parent: runs.StageRun) -> dict[str, Any]:
    """Summarise the run; tag the MLflow parent; publish the Prefect artifacts; print the table.

    Runs after a failure too, so nothing here may raise: a stage's error must reach the caller unmasked.
    """
    from prefect.context import FlowRunContext
    from rich.console import Console

    ctx = FlowRunContext.get()
    summary = pipeline_report.summarise(records, seconds, _data_version(), parent.run_id, _mlflow_url(parent.run_id),
                                        str(ctx.flow_run.id) if ctx and ctx.flow_run else None)
    tags = {"tlops.outcome": summary["status"], "prefect.flow_run_id": summary["flow_run_id"] or ""}
    if summary["data_version"]:
        tags["data_version"] = summary["data_version"]  # the parent was opened before ingest could change it
    try:
        parent.set_tags(tags)
        parent.log_metrics({f"seconds_{r.stage}": r.seconds for r in records} | {"seconds_total": seconds})
    except Exception as e:  # noqa: BLE001
        log.warning("could not tag MLflow run %s: %s", parent.run_id, e)
    pipeline_report.publish(summary)
    Console().print(pipeline_report.console_table(summary))
    return summary


def _mlflow_url(run_id: str) -> str | None:
    """The MLflow UI page of the parent run."""
    try:
        experiment = runs.client().get_run(run_id).info.experiment_id
    except Exception as e:  # noqa: BLE001
        log.warning("no MLflow link for run %s: %s", run_id, e)
        return None
    return pipeline_report.mlflow_run_url(runs.tracking_uri(), experiment, run_id)


def _data_version() -> str | None:
    """This run's data version, when data/raw exists (known since the ingest stage: not hashed again)."""
    if not paths.RAW.is_dir():
        return None
    from tlops.data.version import current_data_version

    try:
        return current_data_version()
    except Exception as e:  # noqa: BLE001 - a summary line is not worth failing a finished run for
        log.warning("data version unavailable: %s", e)
        return None


def _check_params_file(params_path: str | None) -> None:
    """DVC tracks params.yaml: stages reading another file would make dvc.lock record the wrong values."""
    path = resolve_params_path(params_path)
    if path.resolve() != Path("params.yaml").resolve():
        log.warning("stages read %s but DVC tracks params.yaml: dvc.lock will not see changes to %s", path, path)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


def _preload() -> None:
    """Import DVC and the stage modules (torch, timm, ...) and open the MLflow store now: done while a temporary
    Prefect server starts, on the other core, it costs no wall time."""
    runs.client()  # MLflow keeps the store (engine, schema check) for the process: the run reuses it
    try:
        with dvc_stages.open_repo() as repo:
            for stage in dvc_stages.pipeline_stages(repo):
                _stage_task(stage)
    except Exception as e:  # noqa: BLE001 - the flow meets the same error and reports it properly
        log.debug("preload stopped early: %s", e)
