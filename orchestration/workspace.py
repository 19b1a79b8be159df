"""One pipeline run per workspace: an exclusive lock on .tlops/pipeline.lock, held for the whole run.

DVC fails when two reproductions write one workspace at once, so a second run waits up to
`schedule.lock_timeout_s` for the first to finish and is then rejected, naming the run that holds the lock.
The lock is flock(2): the kernel releases it when its holder exits, even after `kill -9`.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

from tlops.core.errors import WorkspaceBusyError


@contextmanager
def workspace_lock(path: Path, timeout_s: float = 0.0, poll_s: float = 0.2) -> Iterator[None]:
    """Hold an exclusive lock on `path`; wait up to `timeout_s` for its holder, then raise WorkspaceBusyError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Opened without truncating: the holder's note must survive until we own the lock.
    with open(path, "a+", encoding="utf-8") as f:
        deadline = time.monotonic() + timeout_s
        while not _try_lock(f):
            if time.monotonic() >= deadline:
                raise WorkspaceBusyError(_busy_message(path, timeout_s))
            time.sleep(poll_s)
        try:
            _write_holder(f)
            yield
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)


def _try_lock(f: IO[str]) -> bool:
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _write_holder(f: IO[str]) -> None:
    # Written in place, not by rename: the lock lives on this inode.
    note = {"pid": os.getpid(), "host": socket.gethostname(), "cmd": " ".join(sys.argv)[:200],
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    f.truncate(0)
    f.write(json.dumps(note))
    f.flush()


def holder(path: Path) -> dict:
    """The note the current holder wrote into the lock file ({} when unreadable)."""
    try:
        note = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return note if isinstance(note, dict) else {}


def _busy_message(path: Path, timeout_s: float) -> str:
    note = holder(path)
    who = (f"pid {note.get('pid')} on {note.get('host')}, running since {note.get('since')}: {note.get('cmd')}"
           if note else "a process that left no note")
    waited = f" after waiting {timeout_s:g} s" if timeout_s else ""
    return (f"workspace {Path.cwd()} is busy{waited}: another pipeline run holds {path} ({who}). "
            "Wait for it to finish, or set schedule.lock_timeout_s to queue behind it.")
