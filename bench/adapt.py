"""Domain adaptation on digits -> digits drawn over colour photographs (the MNIST -> MNIST-M construction, offline).

In a fresh clone of the project: `tlops run` with adapt.target set to the generated folder (class folders: labels
for scoring only) for each method, then an oracle trained with the target's own labels (its adapt split as the
labelled source data; scored on the very same target test split). Prints, per method, target and source test
accuracy, the share of the gap closed = (adapted - source-only) / (oracle - source-only), and the adapt stage's
wall time next to the finetune stage's.

    python bench/adapt.py [--workdir DIR] [--methods none,adabn,self_training,mcc,auto]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import make_project, timed_run  # noqa: E402
from target_domain import digits_over_photos  # noqa: E402


def set_params(project: Path, **sections: dict) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    for name, values in sections.items():
        params[name].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def stage_seconds(log: Path, stage: str) -> float | None:
    """A stage's seconds from the run's table (│ stage │ ran │ 12.3 │ ...)."""
    m = re.search(rf"│ {stage}\s+│ \w[\w ]*│\s+([\d.]+) │", log.read_text())
    return float(m[1]) if m else None


def oracle_data(target_project: Path, out: Path) -> None:
    """The target's adapt split with its labels, as an imagefolder: what a model trained on target labels sees."""
    rows = (target_project / "data/prepared/target.csv").read_text().splitlines()[1:]
    for line in rows:
        path, label, split = line.split(",")[:3]
        if split == "adapt" and label:
            (out / label).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(target_project / path, out / label / Path(path).name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--methods", default="none,adabn,self_training,mcc,auto")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="tlops-adapt-"))
    target = work / "digits_over_photos"
    if not target.exists():
        digits_over_photos(target)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    project = make_project(work / "project")
    rows = {}
    for method in args.methods.split(","):
        set_params(project, adapt={"method": method, "target": str(target)})
        wall = timed_run(project, env, f"adapt-{method}")
        log = work / f"adapt-{method}.log"
        report = json.loads((project / "reports/adapt.json").read_text())
        rows[method] = {"report": report, "wall": wall, "adapt_s": stage_seconds(log, "adapt"),
                        "finetune_s": stage_seconds(log, "finetune")}
        print(f"{method}: target {report['target']['adapted']['accuracy']:.4f} (source-only "
              f"{report['target']['source_only']['accuracy']:.4f}), chosen {report['chosen']}", flush=True)
    finetune_s = next((r["finetune_s"] for r in rows.values() if r["finetune_s"]), None)
    oracle_project = make_project(work / "oracle")
    oracle_data(project, work / "oracle_data")
    set_params(oracle_project, data={"source": "imagefolder", "path": str(work / "oracle_data")},
               adapt={"method": "none", "target": str(target)})
    timed_run(oracle_project, env, "adapt-oracle")
    oracle = json.loads((oracle_project / "reports/adapt.json").read_text())["target"]["source_only"]["accuracy"]
    first = next(iter(rows.values()))["report"]
    source_only = first["target"]["source_only"]["accuracy"]
    print(f"\nshift: domain AUC {first['shift']['domain_auc']:.3f}, proxy A-distance "
          f"{first['shift']['proxy_a_distance']:.2f}; target test {first['target']['n_test']} images; "
          f"finetune stage {finetune_s} s")
    print("| method | chosen | target accuracy | source accuracy | gap closed | adapt stage (s) |")
    print("|---|---|---:|---:|---:|---:|")
    for method, r in rows.items():
        rep = r["report"]
        acc = rep["target"]["adapted"]["accuracy"]
        gap = (acc - source_only) / (oracle - source_only) if oracle > source_only else float("nan")
        print(f"| {method} | {rep['chosen']} | {acc:.4f} | {rep['source']['adapted']['accuracy']:.4f} | "
              f"{gap:.0%} | {r['adapt_s']} |")
    print(f"| oracle (target labels) | - | {oracle:.4f} | - | 100% | - |")


if __name__ == "__main__":
    main()
