"""DVC in-process: dvc.yaml's stages in dependency order, and bringing one up to date the way `dvc repro` does.

For each stage `dvc repro` (dvc/repo/reproduce.py, dvc/stage/__init__.py) skips it when it is unchanged since
dvc.lock; otherwise it removes the stage's non-persist outputs, restores them from the run cache when this exact
run was seen before, or else runs the cmd with the repo lock released; then it hashes deps and outputs, copies the
outputs into .dvc/cache and writes the stage's dvc.lock entry. `reproduce` does the same steps through the same DVC
calls with the cmd replaced by an in-process call, so dvc.lock, .dvc/cache and the run cache end up exactly as
`dvc repro` leaves them and neither ever redoes the other's work. Nothing is recorded for a call that raises.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tlops.core.errors import ConfigError

if TYPE_CHECKING:
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

# The only cmd form a stage may have for the pipeline to call it in-process: `python -m <module>`.
_CMD = re.compile(r"^python3?\s+-m\s+([A-Za-z_][\w.]*)$")

Outcome = Literal["ran", "cached", "skipped"]


@dataclass(frozen=True)
class Reproduced:
    """What `reproduce` did to one stage: ran it, restored it from DVC's run cache, or skipped it as unchanged."""

    outcome: Outcome
    reason: str
    outputs_changed: bool
    result: Any = None


def open_repo(root: str | Path = ".") -> Repo:
    """The DVC repo at `root`; ConfigError when there is none."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    # DVC's INFO lines (lock file updates, git hints) would drown the pipeline's own report; warnings still show.
    logging.getLogger("dvc").setLevel(logging.WARNING)
    try:
        return Repo(str(root))
    except NotDvcRepoError:
        raise ConfigError(f"{Path(root).resolve()}: not a DVC repo (run from the project root, or `dvc init`)"
                          ) from None


def pipeline_stages(repo: Repo, until: str | None = None) -> list[PipelineStage]:
    """The stages of dvc.yaml in the order `dvc repro` runs them: every stage after the stages it depends on; with
    `until`, only that stage and those it depends on, as `dvc repro <until>` (ConfigError for a name not in
    dvc.yaml)."""
    from dvc.dvcfile import PROJECT_FILE
    from dvc.repo import lock_repo
    from dvc.repo.reproduce import get_active_graph, plan_repro

    with lock_repo(repo):
        targets = repo.stage.collect(PROJECT_FILE)
        if until is not None:
            named = [s for s in targets if s.name == until]
            if not named:
                known = ", ".join(s.name for s in targets if s.cmd)
                raise ConfigError(f"until: dvc.yaml has no stage {until!r} (its stages: {known})")
            targets = named
        planned = plan_repro(get_active_graph(repo.index.graph), targets)
    return [s for s in planned if s.cmd]  # `.dvc` data sources have no cmd: nothing to run


def stage_module(stage: PipelineStage) -> str:
    """The module that the stage's cmd runs: `python -m tasks.prepare` -> "tasks.prepare"."""
    match = _CMD.match(stage.cmd.strip()) if isinstance(stage.cmd, str) else None
    if match is None:
        raise ConfigError(f"dvc.yaml: stage {stage.addressing} has cmd {stage.cmd!r}; the pipeline runs stages "
                          "in-process and needs `python -m <module>` (e.g. python -m tasks.prepare)")
    return match.group(1)


def reproduce(repo: Repo, stage: PipelineStage, execute: Callable[[], Any], force: bool = False) -> Reproduced:
    """Bring `stage` up to date as `dvc repro` would, with `execute()` in place of its cmd; `force` always runs it."""
    from dvc.repo import lock_repo

    with lock_repo(repo), repo.scm_context(quiet=True), _rwlocked(repo, stage):
        if not force and not stage.changed():
            return Reproduced("skipped", "unchanged since dvc.lock", outputs_changed=False)
        reason = "forced" if force else _why_changed(stage)
        before = _output_hashes(stage)
        stage.remove_outs(ignore_remove=False, force=False)  # persist outputs are kept, as DVC does
        result, outcome = None, "cached"
        if force or not _restore_from_run_cache(repo, stage):
            with _repo_unlocked(repo):
                result = execute()
            outcome = "ran"
        _record(stage)
        return Reproduced(outcome, reason, _output_hashes(stage) != before, result)


def _why_changed(stage: PipelineStage, most: int = 4) -> str:
    """A short reason why DVC would reproduce the stage, as `dvc status` would put it (at most `most` paths each)."""
    if not _locked(stage):
        return "not in dvc.lock yet"
    deps, outs, stage_msg = stage.changed_entries()

    def listed(kind: str, items: list[str]) -> list[str]:
        if not items:
            return []
        more = f", +{len(items) - most} more" if len(items) > most else ""
        return [f"changed {kind}: {', '.join(items[:most])}{more}"]

    return "; ".join(listed("deps", deps) + listed("outs", outs)) or ("changed command" if stage_msg else "changed")


def _locked(stage: PipelineStage) -> bool:
    """Whether dvc.lock has an entry for the stage."""
    lockfile = stage.dvcfile._lockfile  # DVC's own reader of dvc.lock; no public accessor
    if not lockfile.exists():
        return False
    return stage.name in (lockfile.load().get("stages") or {})


def output_hash(stage: PipelineStage, path: str | Path) -> str | None:
    """The hash DVC recorded for the stage's output at `path` (relative to the repo root), if it has one."""
    for out in stage.outs:
        if Path(out.def_path) == Path(path) and out.hash_info:
            return out.hash_info.value
    return None


def _output_hashes(stage: PipelineStage) -> list[str | None]:
    return [o.hash_info.value if o.hash_info else None for o in stage.outs]


def _restore_from_run_cache(repo: Repo, stage: PipelineStage) -> bool:
    """Check the outputs out of DVC's run cache when these exact deps and params ran before (what repro does)."""
    from dvc.stage.cache import RunCacheNotFoundError

    try:
        repo.stage_cache.restore(stage)
    except RunCacheNotFoundError:
        stage.save_deps()
        return False
    return True


def _record(stage: PipelineStage) -> None:
    """Hash deps and outputs, cache the outputs, write the dvc.lock entry (Stage.run's tail + repro's dump)."""
    # DVC keeps a stage out of the run cache when a plain output (not a metric or plot) is uncached.
    uncached = any(not o.use_cache for o in stage.outs if not (o.is_metric or o.is_plot))
    stage.save(run_cache=not uncached)
    stage.commit()
    stage.dump(update_pipeline=False)


@contextmanager
def _rwlocked(repo: Repo, stage: PipelineStage) -> Iterator[None]:
    """DVC's per-path lock on the stage's deps (read) and outputs (write), held like `dvc repro` holds it.

    A `dvc repro` started meanwhile in this workspace then fails on these paths instead of writing them too.
    """
    from dvc.dependency.db import AbstractDependency
    from dvc.dependency.repo import RepoDependency
    from dvc.rwlock import rwlock

    def local(items: list) -> list[str]:  # the same paths DVC's @rwlocked picks
        return [i.fs_path for i in items if not isinstance(i, (RepoDependency, AbstractDependency))]

    with rwlock(repo.tmp_dir, repo.fs, " ".join(sys.argv), local(stage.deps), local(stage.outs),
                repo.config["core"].get("hardlink_lock", False)):
        yield


@contextmanager
def _repo_unlocked(repo: Repo) -> Iterator[None]:
    """Release DVC's repo lock while a stage runs, as repro does around the cmd (dvc.stage.decorators.unlocked_repo)."""
    repo.lock.unlock()
    repo._reset()  # drop state read under the lock: the stage is about to change files
    try:
        yield
    finally:
        repo.lock.lock()
