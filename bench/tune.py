"""`tlops tune` against the defaults on Fashion-MNIST (Debian's dataset-fashion-mnist, --per-class images a class)
or on WordNet noun glosses (--set wordnet: Debian's wordnet-base, bench/wordnet.py, 400 texts a class).

    python bench/tune.py --budget 1200 [--set fashion|wordnet] [--per-class 500] [--concurrency 1]
                         [--kill-after S] [--reuse] [--replay-pruned] [--work /tmp/tlops-bench-tune]

--kill-after S: `tlops tune` is killed (SIGKILL) S seconds in and the same command is run again; the study's trial
count at the kill and at the end, and the MLflow runs left RUNNING, are printed.

--replay-pruned (after a study, on the same --work): every pruned pipeline trial is run on to the end in its own
folder (`tlops run` there: fine-tuning resumes from the checkpoint the pruner left, without the pruner), so the same
trials are compared pruned and unpruned: fine-tuning epochs, and the best by validation with its test accuracy.

The text set's study searches the space a user declares for a text model in params.yaml (TEXT_SPACE: no image
augmentation, the encoder's 7 layer groups, a lower learning-rate range); the image set's, the default space.

With --concurrency 2 (two workers on one pool, one study), each worker's trials are drawn on a timeline.

A fresh clone of this checkout on the images (committed: trials clone it), a temporary Prefect server and
--concurrency process workers on one pool, then `tlops tune --budget B` as a user runs it. Prints, side by side: the
defaults' test accuracy (the study's first step, `tlops run` of params.yaml) and the best trial's, the trials,
pruned trials and fine-tuning epochs of each level, and the wall time against the budget.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench.wordnet, which datasets.wordnet imports
from datasets import fashion, wordnet  # noqa: E402
from projects import BIN, clone, env  # noqa: E402

POOL = "bench-tune"
TEXT_SPACE = {  # tune.space for a MiniLM text model: what applies to an encoder of 7 layer groups
    "head.lrs": {"low": 0.0003, "high": 0.03, "log": True},
    "head.weight_decays": {"low": 0.000001, "high": 0.01, "log": True},
    "finetune.lr": {"low": 0.0001, "high": 0.003, "log": True},
    "finetune.lr_decay": {"low": 0.3, "high": 0.95},
    "finetune.unfreeze_groups": {"low": 1, "high": 7},
    "finetune.label_smoothing": {"low": 0.0, "high": 0.2},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=1200)
    ap.add_argument("--set", choices=("fashion", "wordnet"), default="fashion")
    ap.add_argument("--per-class", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--kill-after", type=float, default=None, help="SIGKILL tlops tune this many seconds in, rerun it")
    ap.add_argument("--replay-pruned", action="store_true", help="run the last study's pruned trials to the end")
    ap.add_argument("--reuse", action="store_true", help="keep --work's project: its study continues")
    ap.add_argument("--work", type=Path, default=Path("/tmp/tlops-bench-tune"))
    a = ap.parse_args()
    if a.replay_pruned:
        replay_pruned(a.work / "project")
        return
    if a.set == "wordnet":
        data, name = a.work / "wordnet", "WordNet noun glosses, 400/class"
        if not data.exists():
            wordnet(data)
        overrides = {"data": {"source": "textfolder", "path": str(data)}, "tune": {"space": TEXT_SPACE}}
    else:
        data, name = a.work / f"fashion-{a.per_class}", f"Fashion-MNIST {a.per_class}/class"
        if not data.exists():
            fashion(data, a.per_class)
        overrides = {"data": {"source": "imagefolder", "path": str(data)}}
    fresh = not (a.reuse and (a.work / "project").exists())
    project = clone(a.work / "project", overrides if fresh else None, reuse=not fresh)
    if fresh:
        subprocess.run(["git", "commit", "-qam", f"bench: {a.set}"], cwd=project, check=True)
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
        worker_logs = [a.work / f"worker{i}.log" for i in range(a.concurrency)]
        workers = [subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process",
                                     "--limit", "1", "--name", f"bench{i}"], cwd=project,
                                    # its log names each run it takes; its trials share the cores with the others'
                                    env={**e, "PREFECT_LOGGING_LEVEL": "INFO",
                                         "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // a.concurrency))},
                                    stdout=open(log, "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
                   for i, log in enumerate(worker_logs)]
        started, wall_start = time.perf_counter(), time.time()
        command = [str(BIN / "tlops"), "tune", "--pool", POOL, "--budget", str(a.budget),
                   "--concurrency", str(a.concurrency), "--json"]
        if a.kill_after:
            killed = subprocess.Popen(command, cwd=project, env=e, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
            time.sleep(a.kill_after)
            killed.kill()
            killed.wait()
            at_kill = trial_counts(project)
            print(f"killed (SIGKILL) {a.kill_after:g} s in: trials in the studies {at_kill}", flush=True)
        proc = subprocess.run(command, cwd=project, env=e, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - started
        if a.kill_after:
            print(f"after the same command again: trials {trial_counts(project)}; MLflow runs left RUNNING: "
                  f"{running_runs(project)}")
        timeline = worker_timeline(e["PREFECT_API_URL"], worker_logs, wall_start)
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
    print(f"{name}, budget {a.budget:g} s, concurrency {a.concurrency}: "
          f"tlops tune took {seconds:.0f} s ({seconds / a.budget:.0%} of the budget)")
    print(f"{'':24}{'validation':>12}{'test accuracy':>15}")
    print(f"{'defaults (params.yaml)':24}{d.get('val_metric', float('nan')):12.4f}"
          f"{d.get('test_score', float('nan')):15.4f}")
    print(f"{'best tuned trial':24}{best.get('val_metric', float('nan')):12.4f}"
          f"{best.get('test_score', float('nan')):15.4f}  "
          f"({'the defaults: no trial beat them' if best.get('defaults') else json.dumps(best.get('changes', {}))})")
    print(f"gain over the defaults: {best.get('test_score', float('nan')) - d.get('test_score', float('nan')):+.4f}")
    if g := best.get("gain"):
        from flows.tune import gain_line

        print(f"{gain_line(g)}: --apply would {'write' if g['clear'] else 'not write'} it "
              f"(tune.min_gain_se {g['min_gain_se']:g})")
    for name, level in (("head", h), ("pipeline", p)):
        print(f"{name} level: {level.get('trials', 0)} trials, {level.get('complete', 0)} complete, "
              f"{level.get('pruned', 0)} pruned, {level.get('fail', 0)} failed, "
              f"{level.get('epochs', 0)} epochs reported")
    print(f"summary: {project / 'reports/tune/summary.json'}")
    print_timeline(timeline, seconds)


def replay_pruned(project: Path) -> None:
    """The pipeline study's pruned trials run on to the end; the same trials pruned against unpruned."""
    import optuna
    from optuna.trial import TrialState

    from flows.tune import _run_scores

    summary = json.loads((project / "reports/tune/summary.json").read_text())
    study = optuna.load_study(study_name=f"{summary['study']}.pipeline", storage=study_storage(project))
    rows = []
    for t in study.trials:
        folder = Path(t.user_attrs["folder"])
        row = {"trial": t.number, "state": t.state.name.lower(), "epochs_pruned": len(t.intermediate_values),
               "scores": _run_scores(folder) if t.state == TrialState.COMPLETE else {},
               "changes": {k: v for k, v in t.user_attrs.get("changes", {}).items() if k != "export.registered_model"}}
        if t.state == TrialState.PRUNED:
            started = time.perf_counter()
            proc = subprocess.run([str(BIN / "tlops"), "run"], cwd=folder, env=env(), capture_output=True, text=True,
                                  check=False)
            if proc.returncode != 0:
                sys.exit(f"trial {t.number} did not run on:\n{proc.stderr[-2000:]}")
            row["scores"] = _run_scores(folder)
            row["replay_s"] = round(time.perf_counter() - started)
        history = folder / "reports/finetune_history.csv"
        row["epochs_unpruned"] = (sum(1 for line in history.read_text().splitlines()[1:] if ",finetune," in line)
                                  if history.exists() else 0)
        if t.user_attrs.get("defaults"):
            row["epochs_pruned"] = row["epochs_unpruned"] = 0  # the defaults' run, not a trial the study ran
        rows.append(row)
        print(json.dumps(row), flush=True)
    done = [r for r in rows if r["state"] == "complete"]
    pruned_best = max(done, key=lambda r: r["scores"].get("val_metric", -1.0))
    unpruned_best = max(rows, key=lambda r: r["scores"].get("val_metric", -1.0))
    pruned_epochs, unpruned_epochs = sum(r["epochs_pruned"] for r in rows), sum(r["epochs_unpruned"] for r in rows)
    print(f"\n{len(rows)} pipeline trials ({sum(r['state'] == 'pruned' for r in rows)} pruned, run on here)")
    print(f"{'':28}{'fine-tuning epochs':>20}{'best: trial':>13}{'validation':>12}{'test accuracy':>15}")
    for name, epochs, best in (("with the pruner (the study)", pruned_epochs, pruned_best),
                               ("the same trials unpruned", unpruned_epochs, unpruned_best)):
        print(f"{name:28}{epochs:>20}{best['trial']:>13}{best['scores'].get('val_metric', float('nan')):12.4f}"
              f"{best['scores'].get('test_score', float('nan')):15.4f}")
    gap = pruned_best["scores"].get("test_score", math.nan) - unpruned_best["scores"].get("test_score", math.nan)
    print(f"the pruner saved {1 - pruned_epochs / max(1, unpruned_epochs):.0%} of the fine-tuning epochs; its best's "
          f"test accuracy {gap:+.4f} against the unpruned best's")


def study_storage(project: Path) -> str:
    """The project's default study storage (tune.storage null: SQLite in .tlops/tune.db)."""
    return f"sqlite:///{project / '.tlops/tune.db'}"


def trial_counts(project: Path) -> dict[str, int]:
    """{study name: trials} in the project's default study storage."""
    import optuna

    return {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(study_storage(project))}


def running_runs(project: Path) -> int:
    """MLflow runs in the project's store still RUNNING."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exps = [x.experiment_id for x in client.search_experiments()]
    return len(client.search_runs(exps, "attributes.status = 'RUNNING'", max_results=1000))


def worker_timeline(api: str, worker_logs: list[Path], t0: float) -> dict[str, list[tuple[float, float, str]]]:
    """Each worker's flow runs as (start s, end s, state) since the tune started: the runs from the Prefect API, each
    given to the worker whose log names its id."""
    from datetime import datetime

    req = urllib.request.Request(f"{api}/flow_runs/filter", data=json.dumps({"limit": 200}).encode(),
                                 headers={"Content-Type": "application/json"})
    runs = json.loads(urllib.request.urlopen(req, timeout=30).read())
    logs = {log.stem: log.read_text() for log in worker_logs}
    out: dict[str, list[tuple[float, float, str]]] = {name: [] for name in logs}
    for r in runs:
        owner = next((name for name, text in logs.items() if r["id"] in text), None)
        if owner and r.get("start_time"):
            start = datetime.fromisoformat(r["start_time"]).timestamp() - t0
            end = datetime.fromisoformat(r["end_time"]).timestamp() - t0 if r.get("end_time") else start
            out[owner].append((start, end, r["state_name"]))
    return out


def print_timeline(timeline: dict[str, list[tuple[float, float, str]]], seconds: float, width: int = 80) -> None:
    """One row per worker, a column per 1/width of the tune's wall time: # while a trial ran on it (p: pruned)."""
    print(f"worker timeline (0 .. {seconds:.0f} s, one column = {seconds / width:.0f} s):")
    busy = []
    for name, runs in timeline.items():
        row = [" "] * width
        for start, end, state in sorted(runs):
            for col in range(int(start / seconds * width), min(width, int(end / seconds * width) + 1)):
                row[col] = "p" if state == "Pruned" else "#"
        busy.append({c for c, ch in enumerate(row) if ch != " "})
        print(f"  {name:>8} |{''.join(row)}| {len(runs)} trials")
    if len(busy) > 1:
        both, any_ = set.intersection(*busy), set.union(*busy)
        print(f"  every worker busy in {len(both) / max(1, len(any_)):.0%} of the time any was")


if __name__ == "__main__":
    main()
