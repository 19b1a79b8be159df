"""Domain adaptation on digits -> digits drawn over colour photographs (the MNIST -> MNIST-M construction, offline).

In a fresh clone of the project: `tlops run` without adaptation (the source-only model and the finetune stage's
time), then with `adapt.method: auto` (which runs every method from the same start and reports each one's target
test accuracy, label-free scores and time), then an oracle trained with the target's own labels (its adapt split as
the labelled source data; scored on the very same target test split). Prints per method the target test accuracy,
the share of the gap closed = (adapted - source-only) / (oracle - source-only), the source validation metric and the
method's wall time, next to the finetune stage's. With --race, auto is also run without its race
(adapt.race_min_epochs: 0, every method to the end, as before the race) and the chosen method alone, each from no
checkpoint: the adapt stage's seconds, choice and target accuracy of the three side by side.

With --fashion, the source is Fashion-MNIST (--per-class images a class, bench/datasets.fashion) and the target
--target-images of Fashion-MNIST's test images over photographs (bench/target_domain.fashion_over_photos).

    python bench/adapt.py [--workdir DIR] [--race] [--no-oracle] [--fashion [--per-class 500] [--target-images 3000]]
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
from datasets import fashion  # noqa: E402
from pipeline import make_project, timed_run  # noqa: E402
from target_domain import digits_over_photos, fashion_over_photos  # noqa: E402


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


def race_table(project: Path, env: dict[str, str], raced: dict, work: Path, finetune_s: float | None) -> None:
    """The adapt stage of auto raced (already run), auto unraced and the chosen method alone, each from scratch."""
    rows = [("auto, raced", raced, stage_seconds(work / "adapt-auto.log", "adapt"))]
    for label, adapt in (("auto, unraced", {"method": "auto", "race_min_epochs": 0}),
                         (f"{raced['chosen']} alone", {"method": raced["chosen"], "race_min_epochs": 1})):
        shutil.rmtree(project / "checkpoints" / "adapt", ignore_errors=True)  # no resuming the previous run's methods
        set_params(project, adapt=adapt)
        timed_run(project, env, label.replace(" ", "-").replace(",", ""))
        rows.append((label, json.loads((project / "reports/adapt.json").read_text()),
                     stage_seconds(work / f"{label.replace(' ', '-').replace(',', '')}.log", "adapt")))
    print(f"finetune stage {finetune_s} s")
    print("| adapt.method | chosen | target test accuracy | epochs trained per method | adapt stage s |")
    print("|---|---|---:|---|---:|")
    for label, rep, seconds in rows:
        epochs = ", ".join(f"{m} {row.get('epochs', '-')}" for m, row in rep["candidates"].items() if m != "none")
        print(f"| {label} | {rep['chosen']} | {rep['target']['adapted']['accuracy']:.4f} | {epochs} | {seconds} |")
    set_params(project, adapt={"method": "auto", "race_min_epochs": 1})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--race", action="store_true", help="auto raced, auto unraced, the chosen method alone")
    ap.add_argument("--no-oracle", action="store_true")
    ap.add_argument("--fashion", action="store_true", help="Fashion-MNIST over photographs instead of digits")
    ap.add_argument("--per-class", type=int, default=500)
    ap.add_argument("--target-images", type=int, default=3000)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="tlops-adapt-"))
    target = work / ("fashion_over_photos" if args.fashion else "digits_over_photos")
    if not target.exists():
        fashion_over_photos(target, args.target_images) if args.fashion else digits_over_photos(target)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    project = make_project(work / "project")
    if args.fashion:
        if not (work / "fashion").exists():
            fashion(work / "fashion", args.per_class)
        set_params(project, data={"source": "imagefolder", "path": str(work / "fashion")})
    timed_run(project, env, "adapt-none")
    finetune_s = stage_seconds(work / "adapt-none.log", "finetune")
    set_params(project, adapt={"method": "auto", "target": str(target)})
    wall = timed_run(project, env, "adapt-auto")
    report = json.loads((project / "reports/adapt.json").read_text())
    if args.race:
        race_table(project, env, report, work, finetune_s)
    oracle = float("nan")  # --no-oracle: no gap closed
    if not args.no_oracle:
        oracle_project = make_project(work / "oracle")
        oracle_data(project, work / "oracle_data")
        set_params(oracle_project, data={"source": "imagefolder", "path": str(work / "oracle_data")},
                   adapt={"method": "none", "target": str(target)})
        timed_run(oracle_project, env, "adapt-oracle")
        oracle = json.loads((oracle_project / "reports/adapt.json").read_text())["target"]["source_only"]["accuracy"]
    t, shift = report["target"], report["shift"]
    source_only = t["source_only"]["accuracy"]
    print(f"shift: domain AUC {shift['domain_auc']:.3f}, proxy A-distance {shift['proxy_a_distance']:.2f}, mean "
          f"confidence target {shift['target_mean_confidence']:.2f} / source {shift['source_mean_confidence']:.2f}; "
          f"target test {t['n_test']} images; finetune stage {finetune_s} s; auto run {wall:.0f} s, its adapt stage "
          f"{stage_seconds(work / 'adapt-auto.log', 'adapt')} s")
    print("| model | target test accuracy | gap closed | source val | ensemble agreement | IM score | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, row in report["candidates"].items():
        acc = row["target_accuracy"]
        gap = (acc - source_only) / (oracle - source_only) if oracle > source_only else float("nan")
        agree = "-" if row["agreement"] is None else f"{row['agreement']:.4f}"
        label = f"**{name}** (auto's choice)" if name == report["chosen"] else name
        print(f"| {label} | {acc:.4f} | {gap:.0%} | {row['source_val']:.4f} | {agree} | {row['im']:.3f} | "
              f"{row['seconds']:.0f} |")
    print(f"| oracle (target labels) | {oracle:.4f} | 100% | - | - | - | - |")
    print(f"auto: source test accuracy {report['source']['source_only']['accuracy']:.4f} -> "
          f"{report['source']['adapted']['accuracy']:.4f}; target {source_only:.4f} -> {t['adapted']['accuracy']:.4f}")


if __name__ == "__main__":
    main()
