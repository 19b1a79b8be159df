"""`tlops tune` against the defaults on Fashion-MNIST (Debian's dataset-fashion-mnist, --per-class images a class).

    python bench/tune.py --budget 1200 [--per-class 500] [--concurrency 1] [--work /tmp/tlops-bench-tune]

A fresh clone of this checkout on the images (committed: trials clone it), a temporary Prefect server and
--concurrency process workers on one pool, then `tlops tune --budget B` as a user runs it. Prints, side by side: the
defaults' test accuracy (the study's first step, `tlops run` of params.yaml) and the best trial's, the trials,
pruned trials and fine-tuning epochs of each level, and the wall time against the budget.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from datasets import fashion  # noqa: E402
from projects import BIN, clone, env  # noqa: E402

POOL = "bench-tune"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=1200)
    ap.add_argument("--per-class", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path("/tmp/tlops-bench-tune"))
    a = ap.parse_args()
    images = a.work / f"fashion-{a.per_class}"
    if not images.exists():
        fashion(images, a.per_class)
    project = clone(a.work / "project", {"data": {"source": "imagefolder", "path": str(images)}})
    subprocess.run(["git", "commit", "-qam", "bench: fashion"], cwd=project, check=True)
    port = free_port()
    e = {**env(), "PREFECT_HOME": str(a.work / "prefect"), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
         "PREFECT_LOGGING_LEVEL": "WARNING", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    logs = open(a.work / "servers.log", "w")  # noqa: SIM115 - open for the servers' lifetime
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=e, stdout=logs, stderr=logs)
    workers: list[subprocess.Popen] = []
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        workers = [subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process",
                                     "--limit", "1", "--name", f"bench{i}"], cwd=project, env=e, stdout=logs,
                                    stderr=logs) for i in range(a.concurrency)]
        started = time.perf_counter()
        proc = subprocess.run([str(BIN / "tlops"), "tune", "--pool", POOL, "--budget", str(a.budget),
                               "--concurrency", str(a.concurrency), "--json"], cwd=project, env=e,
                              capture_output=True, text=True)
        seconds = time.perf_counter() - started
    finally:
        for p in [*workers, server]:
            p.send_signal(signal.SIGINT)
        for p in [*workers, server]:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
    if proc.returncode != 0:
        sys.exit(f"tlops tune failed:\n{proc.stderr[-3000:]}")
    s = json.loads(proc.stdout[proc.stdout.index("{"):])
    d, p, h = s["defaults"], s["pipeline"] or {}, s["head"] or {}
    best = p.get("best") or {}
    print(f"Fashion-MNIST {a.per_class}/class, budget {a.budget:g} s, concurrency {a.concurrency}: "
          f"tlops tune took {seconds:.0f} s ({seconds / a.budget:.0%} of the budget)")
    print(f"{'':24}{'validation':>12}{'test accuracy':>15}")
    print(f"{'defaults (params.yaml)':24}{d.get('val_metric', float('nan')):12.4f}{d.get('test_score', float('nan')):15.4f}")
    print(f"{'best tuned trial':24}{best.get('val_metric', float('nan')):12.4f}"
          f"{best.get('test_score', float('nan')):15.4f}  ({json.dumps(best.get('changes', {}))})")
    print(f"gain over the defaults: {best.get('test_score', float('nan')) - d.get('test_score', float('nan')):+.4f}")
    for name, level in (("head", h), ("pipeline", p)):
        print(f"{name} level: {level.get('trials', 0)} trials, {level.get('complete', 0)} complete, "
              f"{level.get('pruned', 0)} pruned, {level.get('fail', 0)} failed, {level.get('epochs', 0)} epochs reported")
    print(f"summary: {project / 'reports/tune/summary.json'}")


if __name__ == "__main__":
    main()
