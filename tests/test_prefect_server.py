"""orchestration.prefect_server: the Prefect API server of a run without a configured one, and its end."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's parent-death signal is Linux's")
def test_a_killed_run_leaves_no_prefect_server_behind(tmp_path: Path):
    code = ("import time\nfrom orchestration.prefect_server import TemporaryServer\n"
            "s = TemporaryServer()\ns.wait_ready(120)\nprint(s.url, flush=True)\ntime.sleep(300)")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    run = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        url = run.stdout.readline().strip()
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
    finally:
        run.kill()  # SIGKILL: no atexit, no finally in the run
        run.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{url}/health", timeout=1)
        except httpx.TransportError:
            return  # the server went with its parent
        time.sleep(0.2)
    pytest.fail(f"the Prefect server at {url} outlived the killed run")
