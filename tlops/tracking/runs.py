"""MLflow tracking runs, grouped as a tree; with tlops.tracking.registry, the only modules that talk to MLflow.

One pipeline execution is one parent run; each stage is a child run under it (tag `mlflow.parentRunId`).
`tlops run` opens the parent with `pipeline_run` and passes its id to stages in $TLOPS_PARENT_RUN_ID. Under plain
`dvc repro` every stage is its own process, so the parent is keyed by the `dvc` ancestor process and shared through
`.tlops/parent_run.json`. A run left RUNNING by a process that died (kill -9) is found by its owner tags (pid and
process start time, read with psutil) and marked KILLED. mlflow is imported inside functions: importing this module
costs nothing.
"""

from __future__ import annotations

import fcntl
import getpass
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from tlops.core import paths
from tlops.core.config import Params, flatten
from tlops.core.errors import ConfigError, TrialPruned
from tlops.core.io import read_json, sha256_bytes, write_json

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

EXPERIMENT_ENV = "TLOPS_EXPERIMENT"
DEFAULT_EXPERIMENT = "tlops"
PARENT_ENV = "TLOPS_PARENT_RUN_ID"
PARENT_STATE = paths.STATE_DIR / "parent_run.json"

# Tags that identify who owns a run, so a later process can tell a live run from one whose process died.
TAG_KIND, TAG_WORKSPACE, TAG_HOST, TAG_PID, TAG_PID_START = (
    "tlops.kind", "workspace", "tlops.host", "tlops.pid", "tlops.pid_start")


class Terminated(SystemExit):
    """Raised in the main thread on SIGTERM so runs end KILLED; exits 143 like the default handler."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


# ---------------------------------------------------------------- store


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else the workspace's sqlite store ./mlflow.db."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / paths.MLFLOW_DB}"


def registry_uri() -> str:
    """$MLFLOW_REGISTRY_URI, else the tracking store."""
    return os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri()


def artifact_root() -> Path:
    """Where a local store keeps artifacts: ./mlartifacts."""
    return Path.cwd() / paths.MLFLOW_ARTIFACTS


def experiment_name() -> str:
    return os.environ.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT


def ui_command(port: int = 5000, host: str = "127.0.0.1") -> list[str]:
    """argv of `mlflow ui` on this workspace's store."""
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri(),
            "--default-artifact-root", artifact_root().as_uri(), "--host", host, "--port", str(port),
            "--workers", "1"]  # one local user; several workers on one sqlite file only contend for its lock


def _quiet_mlflow() -> None:
    # Run links are printed per run against a server, and alembic logs every migration step on a new store.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("alembic", "mlflow.store.db.utils", "mlflow.store.db.utils.alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def client() -> MlflowClient:
    """An MlflowClient on tracking_uri() (tracking and registry)."""
    _quiet_mlflow()
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri(), registry_uri=registry_uri())


def _is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def experiment_id(c: MlflowClient) -> str:
    """Id of the tlops experiment, created on first use (artifacts under ./mlartifacts for a local store)."""
    from mlflow.exceptions import MlflowException

    name = experiment_name()
    exp = c.get_experiment_by_name(name)
    if exp is not None and exp.lifecycle_stage == "deleted":
        raise ConfigError(f"MLflow experiment {name!r} is deleted in the tracking store: restore it in the MLflow UI, "
                          f"or set ${EXPERIMENT_ENV} to another name")
    if exp is not None:
        return exp.experiment_id
    # A tracking server chooses its own artifact store; only a local store gets ./mlartifacts.
    location = artifact_root().as_uri() if _is_local_store(c.tracking_uri) else None
    try:
        return c.create_experiment(name, artifact_location=location)
    except MlflowException:  # another stage process created it first
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


# ---------------------------------------------------------------- processes


def _proc_start(pid: int) -> str | None:
    """When a live process started (psutil's create time, as a tag string), else None (gone or a zombie)."""
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:  # it has exited already
            return None
        return f"{p.create_time():.3f}"
    except psutil.Error:
        return None


def _is_dvc(cmdline: list[str]) -> bool:
    """True for `dvc ...`, `python .venv/bin/dvc ...` and `python -m dvc ...`."""
    head = [os.path.basename(a) for a in cmdline[:3]]
    return "dvc" in head[:2] or (head[1:3] == ["-m", "dvc"])


def _dvc_ancestor() -> int | None:
    """Pid of the nearest ancestor process that is dvc, if any."""
    try:
        for p in psutil.Process().parents():
            try:
                if _is_dvc(p.cmdline()):
                    return p.pid
            except psutil.Error:  # an ancestor we may not inspect, or one that just exited
                continue
    except psutil.Error:
        return None
    return None


def _alive(pid: int, start: str) -> bool:
    return _proc_start(pid) == start


def _owner_tags(pid: int) -> dict[str, str]:
    return {TAG_PID: str(pid), TAG_PID_START: str(_proc_start(pid)), TAG_HOST: socket.gethostname()}


def owned_by_this_process() -> dict[str, str]:
    """Tags that let reap_stale_runs end a run this process leaves RUNNING when it dies (runs it creates itself)."""
    return {TAG_WORKSPACE: str(Path.cwd()), **_owner_tags(os.getpid())}


# ---------------------------------------------------------------- context tags


def git_commit() -> str | None:
    """HEAD of the workspace's git repo, if it is one."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def _device(params: Params) -> str:
    """The compute device a stage most likely uses; stages that know better override the tag."""
    if params.finetune.device != "auto":
        return params.finetune.device
    torch = sys.modules.get("torch")  # never import torch just for a tag
    if torch is not None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return "cuda" if Path("/dev/nvidia0").exists() and visible not in ("", "-1") else "cpu"


def _user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no name for this uid, e.g. in some containers
        return str(os.getuid())


def _context_tags(params: Params) -> dict[str, str]:
    tags = {TAG_WORKSPACE: str(Path.cwd()), "device": _device(params), "mlflow.user": _user()}
    if commit := git_commit():
        tags["git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit  # shown by the MLflow UI
    from tlops.data.version import known_data_version

    if version := known_data_version():  # hashed only at the run's end, once ingest has made it
        tags["data_version"] = version
    return tags


def stringify(d: dict[str, Any]) -> dict[str, str]:
    return {str(k): "" if v is None else str(v) for k, v in d.items()}


# ---------------------------------------------------------------- runs


class StageRun:
    """Handle on one MLflow run: what a stage may log."""

    def __init__(self, mlflow_client: MlflowClient, run_id: str, parent_run_id: str | None = None) -> None:
        self._client = mlflow_client
        self.run_id = run_id
        self.parent_run_id = parent_run_id

    def log_params(self, d: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        # Long values (e.g. a list of class labels) are cut rather than failing the stage.
        params = [Param(k, v[:MAX_PARAM_VAL_LENGTH]) for k, v in stringify(d).items()]
        self._client.log_batch(self.run_id, params=params)

    def set_tags(self, d: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in stringify(d).items()])

    def log_metrics(self, d: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(str(k), float(v), now, int(step or 0)) for k, v in d.items()]
        self._client.log_batch(self.run_id, metrics=metrics)

    def log_series(self, key: str, values: dict[int, float]) -> None:
        """{step: value} of one metric, in one write (a tune trial's validation metric per epoch)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(v), now, int(step)) for step, v in sorted(values.items())]
        if metrics:
            self._client.log_batch(self.run_id, metrics=metrics)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a file (or a folder's content); a missing path is skipped with a warning."""
        p = Path(path)
        if not p.exists():
            log.warning("not logging artifact %s: it does not exist", p)
        elif p.is_dir():
            self._client.log_artifacts(self.run_id, str(p), artifact_path or p.name)
        else:
            self._client.log_artifact(self.run_id, str(p), artifact_path)

    def log_artifacts(self, directory: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload the files under a folder; a missing folder is skipped with a warning."""
        p = Path(directory)
        if not p.is_dir():
            log.warning("not logging artifacts of %s: it is not a folder", p)
            return
        self._client.log_artifacts(self.run_id, str(p), artifact_path)


def _status_of(exc: BaseException | None) -> str:
    if exc is None or (isinstance(exc, SystemExit) and not isinstance(exc, Terminated) and exc.code in (0, None)):
        return "FINISHED"
    # Prefect's flow engine turns SIGTERM into its own TerminationSignal; matched by name to keep Prefect out.
    if isinstance(exc, (KeyboardInterrupt, Terminated, TrialPruned)) or type(exc).__name__ == "TerminationSignal":
        return "KILLED"  # a pruned tune trial (tag tlops.outcome: pruned) ends as a stopped run, not a failed one
    return "FAILED"


def _end(c: MlflowClient, run_id: str, status: str, outcome: str | None = None) -> None:
    # Never let bookkeeping hide the stage's own error; a run left RUNNING is reaped later.
    try:
        if outcome:
            c.set_tag(run_id, "tlops.outcome", outcome)
        c.set_terminated(run_id, status)
    except Exception as e:
        log.warning("could not mark MLflow run %s %s: %s", run_id, status, e)


@contextmanager
def _sigterm_raises() -> Iterator[Any]:
    """In the main thread, SIGTERM raises Terminated for the block; yields `hold()`, after which it is deferred.

    Holding keeps a late SIGTERM from interrupting the recording of a run's final status; the deferred
    signal is raised when the block exits. A Python handler already in place (Prefect's flow engine installs one
    that raises TerminationSignal, and an enclosing pipeline_run installs ours) is left alone: it already ends the
    block with an exception, and replacing Prefect's would turn a cancellation into a crash.
    """
    state = {"hold": False, "pending": False}

    def hold() -> None:
        state["hold"] = True

    if threading.current_thread() is not threading.main_thread() or callable(signal.getsignal(signal.SIGTERM)):
        yield hold
        return

    def handler(signum: int, frame: Any) -> None:
        if state["hold"]:
            state["pending"] = True
            return
        state["hold"] = True
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield hold
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        if state["pending"]:
            raise Terminated()


@contextmanager
def _tracked(c: MlflowClient, run_id: str, parent_id: str | None, hold: Any, also_end: str | None = None
             ) -> Iterator[StageRun]:
    """Yield a StageRun; end the run (and `also_end`) FINISHED, FAILED or KILLED by how the block exits."""
    status, outcome = "FAILED", None
    try:
        yield StageRun(c, run_id, parent_id)
        status = "FINISHED"
    except BaseException as e:
        status = _status_of(e)
        outcome = "pruned" if isinstance(e, TrialPruned) else None
        raise
    finally:
        hold()
        _record_data_version(c, run_id, parent_id)
        _end(c, run_id, status, outcome)
        if also_end:
            _end(c, also_end, status, outcome)


def _record_data_version(c: MlflowClient, run_id: str, parent_id: str | None) -> None:
    """Tag the run with the data version it ended on (this run's, hashed at most once per process), and give the
    parent the version its stage saw last (ingest makes a new one)."""
    from tlops.data.version import current_data_version

    try:
        version = c.get_run(run_id).data.tags.get("data_version")
        if not version and paths.RAW.is_dir():
            version = current_data_version()
            c.set_tag(run_id, "data_version", version)
        if version and parent_id:
            c.set_tag(parent_id, "data_version", version)
    except Exception as e:  # a tag is not worth failing (or masking the failure of) a stage
        log.warning("could not record the data version of MLflow run %s: %s", run_id, e)


@contextmanager
def pipeline_run(params: Params, name: str | None = None) -> Iterator[StageRun]:
    """The parent run of one pipeline execution; stage runs started inside (or in child processes) nest under it."""
    c = client()
    exp = experiment_id(c)
    reap_stale_runs(c)
    with _sigterm_raises() as hold:
        tags = {TAG_KIND: "pipeline", "tlops.launcher": "prefect", **_owner_tags(os.getpid()),
                **_context_tags(params)}
        run_id = c.create_run(exp, run_name=name or "pipeline", tags=tags).info.run_id
        previous = os.environ.get(PARENT_ENV)
        os.environ[PARENT_ENV] = run_id
        try:
            with _tracked(c, run_id, None, hold) as run:
                run.log_params(flatten(params))
                yield run
        finally:
            if previous is None:
                os.environ.pop(PARENT_ENV, None)
            else:
                os.environ[PARENT_ENV] = previous


@contextmanager
def stage_run(stage: str, params: Params) -> Iterator[StageRun]:
    """A child run named `stage` under the pipeline's parent run (see the module docstring for which parent)."""
    c = client()
    exp = experiment_id(c)
    with _sigterm_raises() as hold:
        context = _context_tags(params)
        parent_id, shared = _parent_for_stage(c, exp, params, context)
        tags = {TAG_KIND: "stage", "stage": stage, "mlflow.parentRunId": parent_id, **_owner_tags(os.getpid()),
                **context}
        try:
            run_id = c.create_run(exp, run_name=stage, tags=tags).info.run_id
        except BaseException:
            if shared:
                _end(c, parent_id, "FAILED")
            raise
        with _tracked(c, run_id, parent_id, hold, also_end=parent_id if shared else None) as run:
            run.log_params(flatten(params))
            yield run


def _parent_for_stage(c: MlflowClient, exp: str, params: Params, context: dict[str, str]) -> tuple[str, bool]:
    """(parent run id, whether this stage reopened a shared parent that it must end again)."""
    from mlflow.exceptions import MlflowException

    env_parent = os.environ.get(PARENT_ENV)
    if env_parent:
        try:
            status = c.get_run(env_parent).info.status
        except MlflowException:
            status = "missing"
        if status == "RUNNING":
            return env_parent, False
        # A leftover export in a shell, not a live pipeline: do not hang new stages under an ended run.
        log.warning("%s=%s is %s in %s, not a running pipeline; grouping stages by process instead",
                    PARENT_ENV, env_parent, status, "the tracking store")
    return _open_shared_parent(c, exp, params, context), True


@contextmanager
def _state_lock() -> Iterator[None]:
    # Guards find-or-create of the shared parent should two stage processes of one repro start together.
    paths.STATE_DIR.mkdir(parents=True, exist_ok=True)
    with open(paths.STATE_DIR / "parent_run.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _open_shared_parent(c: MlflowClient, exp: str, params: Params, context: dict[str, str]) -> str:
    """Find (and set RUNNING) or create the parent run shared by the stages of one `dvc repro`.

    It is keyed by the dvc ancestor process (pid + start time); a stage with no dvc ancestor keys it by its own
    process. Each stage sets it FINISHED (or FAILED/KILLED) when it ends, so it is never left RUNNING between
    stages or after the last one.
    """
    from mlflow.exceptions import MlflowException

    dvc_pid = _dvc_ancestor()
    owner = dvc_pid or os.getpid()
    key = {"pid": owner, "start": _proc_start(owner), "host": socket.gethostname(),
           "store": sha256_bytes(tracking_uri().encode())[:16], "experiment": exp}  # no credential on disk
    with _state_lock():
        state = _read_state()
        if state.get("owner") == key:
            try:
                c.update_run(state["run_id"], status="RUNNING")
                return state["run_id"]
            except MlflowException as e:
                log.warning("parent run %s cannot be reopened (%s); starting a new one", state["run_id"], e)
        reap_stale_runs(c)
        launcher = "dvc" if dvc_pid else "process"
        tags = {TAG_KIND: "pipeline", "tlops.launcher": launcher, **_owner_tags(owner), **context}
        run_id = c.create_run(exp, run_name="dvc repro" if dvc_pid else "pipeline", tags=tags).info.run_id
        StageRun(c, run_id).log_params(flatten(params))
        write_json(PARENT_STATE, {"owner": key, "run_id": run_id})
        return run_id


def _read_state() -> dict[str, Any]:
    try:
        state = read_json(PARENT_STATE)
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def reap_stale_runs(c: MlflowClient | None = None) -> int:
    """Mark KILLED the RUNNING runs of this workspace whose owning process is gone (e.g. after `kill -9`)."""
    c = c or client()
    exp = c.get_experiment_by_name(experiment_name())
    if exp is None:
        return 0
    workspace, host = str(Path.cwd()), socket.gethostname()
    reaped = 0
    for run in _running_runs(c, exp.experiment_id):
        tags = run.data.tags
        if tags.get(TAG_WORKSPACE) != workspace or tags.get(TAG_HOST) != host or TAG_PID not in tags:
            continue
        try:
            alive = _alive(int(tags[TAG_PID]), tags[TAG_PID_START])
        except (KeyError, ValueError):
            continue
        if not alive:
            _end(c, run.info.run_id, "KILLED")
            reaped += 1
    if reaped:
        log.info("marked %d stale MLflow run(s) KILLED", reaped)
    return reaped


def _running_runs(c: MlflowClient, exp: str) -> Iterator[Any]:
    token = None
    while True:
        page = c.search_runs([exp], filter_string="attributes.status = 'RUNNING'", max_results=500,
                             page_token=token)
        yield from page
        token = page.token
        if not token:
            return

def set_run_tags(run_id: str, tags: dict[str, Any]) -> None:
    StageRun(client(), run_id).set_tags(tags)
