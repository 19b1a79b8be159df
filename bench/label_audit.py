"""The label audit against labels flipped on purpose: does it find them, and does dropping them give back what the
noise cost? Each set runs in fresh clones of the project with the default params.yaml.

    python bench/label_audit.py [--sets digits,fashion,wordnet] [--flip 0.05] [--work DIR]

digits   scikit-learn's 1,797 digits as an image folder: `tlops run` on the clean labels, on 5% of the training labels
         flipped (report), and flipped with data.label_issues: drop; test accuracy of each (the test split is clean)
fashion  Fashion-MNIST, 500 of each of the 10 classes (Debian's dataset-fashion-mnist), 5% flipped: `dvc repro audit`
wordnet  WordNet noun glosses (bench/wordnet.py, Debian's wordnet-base), 5% flipped: `dvc repro audit`

A flip moves an item's file to another class's folder (seeded): its content, hence its split, is unchanged, so only
training items are flipped (their split is read from the clean run's manifest). Precision and recall are the
flagged training items against the flipped ones. Times are the MLflow runs' of the features and audit stages.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import projects  # noqa: E402  (after the path: run as a script)


def clean_folder(name: str, work: Path) -> Path:
    """The set's clean <class>/<item> folder (built once in work)."""
    from bench.datasets import digits, fashion, wordnet

    folder = work / f"clean-{name}"
    if folder.exists():
        return folder
    if name == "digits":
        digits(folder, dict.fromkeys(range(10), 10**6))
    elif name == "fashion":
        fashion(folder, per_class=500)
    elif name == "wordnet":
        wordnet(folder)
    return folder


def project(work: Path, tag: str, data: Path, text: bool) -> Path:
    return projects.clone(work / f"project-{tag}", {
        "data": {"source": "textfolder" if text else "imagefolder", "path": str(data)},
        "export": {"registered_model": f"tlops-audit-{tag}"}})


def stage_seconds(p: Path) -> dict[str, float]:
    """The last MLflow run of each stage in the project's store: its duration."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{p / 'mlflow.db'}")
    out = {}
    for exp in client.search_experiments():
        for r in client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"]):
            if r.info.run_name in ("features", "audit") and r.info.run_name not in out and r.info.end_time:
                out[r.info.run_name] = (r.info.end_time - r.info.start_time) / 1000
    return out


def flip(clean: Path, p_clean: Path, noisy: Path, share: float, seed: int = 0) -> set[str]:
    """A copy of `clean` with `share` of the clean run's training items moved to another class; their file names."""
    from tlops.data.manifest import load_manifest

    manifest = load_manifest(p_clean / "data/prepared/manifest.csv")
    train = sorted(r.path for r in manifest.rows_in("train"))
    rng = np.random.default_rng(seed)
    chosen = set(rng.choice(train, int(round(share * len(train))), replace=False).tolist())
    if noisy.exists():
        shutil.rmtree(noisy)
    shutil.copytree(clean, noisy)
    classes = sorted(d.name for d in noisy.iterdir() if d.is_dir())
    names = set()
    for path in sorted(chosen):
        label, name = Path(path).parent.name, Path(path).name
        other = classes[(classes.index(label) + int(rng.integers(1, len(classes)))) % len(classes)]
        (noisy / label / name).rename(noisy / other / name)
        names.add(name)
    return names


def flagged(p: Path) -> list[dict]:
    import csv

    with open(p / "reports/label_issues.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_accuracy(p: Path) -> float:
    m = json.loads((p / "reports/metrics.json").read_text())
    return float(m["exported"]["accuracy"] if "exported" in m else m[m.get("selected", "finetuned")]["accuracy"])


def run_set(name: str, work: Path, share: float) -> dict:
    text = name == "wordnet"
    clean = clean_folder(name, work)
    full = name == "digits"
    p_clean = project(work, f"{name}-clean", clean, text)
    projects.run(p_clean, "tlops", "run") if full else projects.run(p_clean, "dvc", "repro", "audit")
    flips = flip(clean, p_clean, work / f"noisy-{name}", share)
    p_noisy = project(work, f"{name}-noisy", work / f"noisy-{name}", text)
    projects.run(p_noisy, "tlops", "run") if full else projects.run(p_noisy, "dvc", "repro", "audit")
    rows = [r for r in flagged(p_noisy) if r["split"] == "train"]
    found = {Path(r["path"]).name for r in rows}
    hit = found & flips
    out = {"name": name, "train_items": json.loads((p_noisy / "reports/label_audit.json").read_text())["train_items"],
           "flipped": len(flips), "flagged": len(found), "precision": len(hit) / max(1, len(found)),
           "recall": len(hit) / max(1, len(flips)), "seconds": stage_seconds(p_noisy),
           "clean_flagged": [r for r in flagged(p_clean) if r["split"] == "train"],
           "false_flags": [r for r in rows if Path(r["path"]).name not in flips][:16]}
    if full:
        out["accuracy"] = {"clean": test_accuracy(p_clean), "noisy": test_accuracy(p_noisy)}
        projects.set_params(p_noisy, {"data": {"label_issues": "drop"}})
        projects.run(p_noisy, "tlops", "run")
        out["accuracy"]["noisy + drop"] = test_accuracy(p_noisy)
        out["dropped"] = json.loads((p_noisy / "reports/label_audit.json").read_text())["dropped"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="digits,fashion,wordnet")
    ap.add_argument("--flip", type=float, default=0.05)
    ap.add_argument("--work", type=Path, default=None, help="keep the clones and data here (default: a temp dir)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="tlops-bench-audit-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = []
        for name in args.sets.split(","):
            rows.append(run_set(name, work, args.flip))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| set | training items | flipped | flagged | precision | recall | audit / features stage | "
          "clean labels: flagged | test accuracy clean / noisy / noisy + drop |")
    print("|---|---:|---:|---:|---:|---:|---|---:|---|")
    for r in rows:
        s = r["seconds"]
        acc = r.get("accuracy")
        shown = (f"{acc['clean']:.4f} / {acc['noisy']:.4f} / {acc['noisy + drop']:.4f} ({r['dropped']} dropped)"
                 if acc else "-")
        print(f"| {r['name']} | {r['train_items']} | {r['flipped']} | {r['flagged']} | {r['precision']:.2f} | "
              f"{r['recall']:.2f} | {s.get('audit', float('nan')):.1f} s / {s.get('features', float('nan')):.1f} s "
              f"({s.get('audit', 0) / max(s.get('features', 1e-9), 1e-9):.0%}) | {len(r['clean_flagged'])} | "
              f"{shown} |")


if __name__ == "__main__":
    main()
