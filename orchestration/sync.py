"""A worker's own clone kept in step with the team's: git pull + dvc pull before a run, dvc push after.

Workers on several machines each keep a clone of the repository (their deployment's working_dir). With `sync`
(pipeline_flow(sync=True), `tlops run --sync`, or TLOPS_SYNC=1 in the deployment's env) a run first fast-forwards
the clone to its branch's upstream and pulls the data version that commit names from the DVC remote, and after a
successful run pushes what it produced (data, features, models) to the remote, so the next worker restores instead of
recomputing. The workspace lock stays per clone; the registry's promotion is serialised by the Prefect server
(tasks/export.py). Both steps are skipped, said once in the log, where there is no git upstream or DVC remote.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from tlops.core.errors import TlopsError

log = logging.getLogger(__name__)

SYNC_ENV = "TLOPS_SYNC"


def enabled(flag: bool | None) -> bool:
    return bool(flag) if flag is not None else os.environ.get(SYNC_ENV, "") not in ("", "0", "false")


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True)


def _dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def has_upstream(root: Path) -> bool:
    return _run(["git", "rev-parse", "--abbrev-ref", "--symbolic-full-name", "@{u}"], root).returncode == 0


def has_dvc_remote(root: Path) -> bool:
    out = _run(_dvc("remote", "default"), root)
    return out.returncode == 0 and bool(out.stdout.strip())


def pull(root: Path = Path(".")) -> list[str]:
    """git pull --ff-only, then dvc pull of the checked-out data version; what was done."""
    done = []
    if has_upstream(root):
        # --autostash: the clone's own dvc.lock and params.yaml edits (-S) ride over the pull
        out = _run(["git", "pull", "--ff-only", "--autostash", "-q"], root)
        if out.returncode != 0:
            raise TlopsError(f"git pull --ff-only failed in {root.resolve()} (local commits or changes?): "
                             f"{out.stderr.strip().splitlines()[-1:] or out.returncode}")
        done.append("git pull")
    else:
        log.info("sync: no git upstream for %s: not pulling code", root.resolve())
    if has_dvc_remote(root):
        out = _run(_dvc("pull", "--allow-missing", "--run-cache", "-q"), root)
        if out.returncode != 0:
            raise TlopsError(f"dvc pull failed: {out.stderr.strip().splitlines()[-1:] or out.returncode}")
        done.append("dvc pull")
    else:
        log.info("sync: no DVC remote: not pulling data")
    return done


def push(root: Path = Path(".")) -> list[str]:
    """dvc push of what the run produced, when there is a DVC remote."""
    if not has_dvc_remote(root):
        return []
    out = _run(_dvc("push", "--run-cache", "-q"), root)  # with the run cache: another clone restores the stages
    if out.returncode != 0:
        raise TlopsError(f"dvc push failed: {out.stderr.strip().splitlines()[-1:] or out.returncode}")
    return ["dvc push"]
