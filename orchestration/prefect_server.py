"""A Prefect API for this process: a temporary server for `tlops run` (and each stage process) when no server is
configured, and a stage run under it (`python -m tasks.<stage>`, what dvc.yaml runs, and `tlops stage`).

Prefect starts such a server itself on first use, but only after importing `prefect.server` in this process
(about 3 s here), and then waits for it. Spawned first thing, before Prefect is even imported, its start-up
overlaps the pipeline's own imports on the other core. It is the same server Prefect would start (uvicorn on
Prefect's app factory, UI off, ephemeral mode), on a free loopback port, stopped when the run ends.
"""

from __future__ import annotations

import atexit
import gc
import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tlops.core.config import load_params
from tlops.core.errors import ConfigError, TlopsError

# What Prefect's own temporary server sets, plus no telemetry (offline it only logs errors) and no
# re-registration of block types on every start (a second or so; the pipeline uses none).
SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
              "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_API_BLOCKS_REGISTER_ON_START": "false"}
PORT_IN_USE = 3  # uvicorn's exit code when another process took the port first
STARTUP_TIMEOUT_S = 120  # Prefect's own default (20 s) is missed on a busy 2-core machine


class TemporaryServer:
    """A Prefect API server in a child process; `url` is its API address."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.url = ""
        self._spawn()
        atexit.register(self.stop)  # also on an exception that never reaches `stop`

    def _spawn(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/api"
        spec = importlib.util.find_spec("prefect")  # finds the package without importing it
        app_dir = str(Path(spec.origin).parent.parent) if spec and spec.origin else "."
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", app_dir, "--factory", "prefect.server.api.server:create_app",
             "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"],
            env={**os.environ, **SERVER_ENV}, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent())

    def wait_ready(self, timeout_s: float) -> None:
        """Block until the API answers /health; TlopsError if the server exits or is not up within timeout_s."""
        import httpx

        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                code = self.process.poll() if self.process else -1
                if code == PORT_IN_USE:
                    self._spawn()
                elif code is not None:
                    raise TlopsError(f"the temporary Prefect server exited with code {code}; start one with "
                                     "`prefect server start` and set PREFECT_API_URL")
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        self.stop()
        raise TlopsError(f"the temporary Prefect server did not answer within {timeout_s:g} s; start one with "
                         "`prefect server start` and set PREFECT_API_URL")

    def stop(self) -> None:
        """Terminate the server and reap it (it shuts down gracefully on SIGTERM)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _die_with_parent() -> Callable[[], object] | None:
    """On Linux, have the kernel send the server SIGTERM when the thread that spawned it dies, even by SIGKILL:
    no Prefect server is left running after a killed run. (Spawned from the main thread, that is the process.)"""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)  # loaded here: the child must not import between fork and exec
    pr_set_pdeathsig = 1
    return lambda: libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def spawn_unless_configured() -> TemporaryServer | None:
    """A temporary server when the environment names no Prefect API (a profile may still name one: prefect_api
    checks once Prefect is imported, and stops this one then)."""
    if os.environ.get("PREFECT_API_URL"):
        return None
    return TemporaryServer()


@contextmanager
def prefect_api(server: TemporaryServer | None = None,
                while_starting: Callable[[], object] | None = None) -> Iterator[None]:
    """The Prefect API for flow runs in the body: the configured server if the environment or the Prefect profile
    names one, else a temporary server (`server`, when spawned early; else one spawned here), up before the body
    starts. `while_starting` runs while a temporary server starts (it overlaps on the other core); with a
    configured server it does not run: nothing would overlap it. On leaving, the body's logs and events are sent
    before the temporary server stops.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        if server is not None:
            server.stop()
        yield
        return
    server = server or TemporaryServer()
    try:
        if while_starting is not None:
            while_starting()
        server.wait_ready(STARTUP_TIMEOUT_S)
        with temporary_settings(updates={PREFECT_API_URL: server.url}):
            try:
                yield
            finally:
                _drain_prefect_workers()
    finally:
        server.stop()


def _drain_prefect_workers(timeout_s: float = 10.0) -> None:
    """Send what Prefect's background log and event workers still hold, and stop them."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=timeout_s)
    EventsWorker.drain_all(timeout=timeout_s)


# ---------------------------------------------------------------- a stage run


def stage_flow(task: Any) -> Any:
    """A Prefect flow named after the stage's task that runs it: so that `dvc repro` records each stage in Prefect."""
    from prefect import flow

    @flow(name=task.name)
    def stage(params_path: str | None = None) -> Any:
        return task(params_path)

    return stage


def publish_markdown(markdown: str, key: str, description: str) -> None:
    """A stage's report as a Prefect markdown artifact of the run it is in; nothing when it is called as a plain
    function (no run to attach to). Never fails the stage: an artifact is for people."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return
    try:
        create_markdown_artifact(markdown=markdown, key=key, description=description)
    except Exception as e:  # noqa: BLE001
        print(f"could not create the Prefect artifact {key}: {e}")


def run_stage(task: Any) -> None:
    """Entry point of `python -m tasks.<stage>`: validate params first, then run the stage's flow.

    A config error exits 2 and any other tlops error exits 1, each with one line naming the problem,
    before Prefect or any model is started.
    """
    try:
        load_params()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        with prefect_api():  # under plain `dvc repro` each stage process needs a Prefect API of its own
            stage_flow(task)()
    except TlopsError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        gc.freeze()  # the interpreter's last collection over torch & co. would add 1.5 s to the stage's exit
