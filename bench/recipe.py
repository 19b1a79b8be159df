"""The default recipe on public labelled image sets that are offline, next to a simple strong baseline on the same
split: the README's table.

    python bench/recipe.py [--datasets digits,fashion,clipart] [--work DIR]

Each dataset (bench/datasets.py; digits is the embedded default) runs through `tlops run` with the default
params.yaml in a fresh clone of the project. The baselines train on the manifest's training split and score its
test split: logistic regression on HOG features (64x64 grey, scikit-image) and on raw pixels (32x32 grey).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import projects  # noqa: E402  (after the path: run as a script)


def baseline(project: Path) -> dict[str, float]:
    """Test accuracy of logistic regression on HOG and on raw pixels, trained on the manifest's training split."""
    from PIL import Image
    from skimage.feature import hog
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from tlops.data.manifest import load_manifest
    from tlops.inputs.images import load_image

    manifest = load_manifest(project / "data/prepared/manifest.csv")

    def grey(path: str, side: int) -> np.ndarray:
        img = load_image(project / path, 10**9, side).convert("L").resize((side, side), Image.Resampling.BILINEAR)
        return np.asarray(img, np.float32) / 255

    out = {}
    for name, side, features in (("hog", 64, lambda a: hog(a, orientations=9, pixels_per_cell=(8, 8),
                                                           cells_per_block=(2, 2))),
                                 ("pixels", 32, lambda a: a.ravel())):
        X = {s: np.stack([features(grey(r.path, side)) for r in manifest.rows_in(s)]) for s in ("train", "test")}
        y = {s: [r.label for r in manifest.rows_in(s)] for s in ("train", "test")}
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.1))
        clf.fit(X["train"], y["train"])
        out[name] = float(clf.score(X["test"], y["test"]))
    return out


def run_dataset(name: str, work: Path) -> dict:
    from bench.datasets import BUILDERS

    overrides = {}
    if name != "digits":
        folder = work / f"data-{name}"
        if not folder.exists():
            BUILDERS[name](folder)
        overrides = {"data": {"source": "imagefolder", "path": str(folder)},
                     "export": {"registered_model": f"tlops-{name}"}}
    project = projects.clone(work / f"project-{name}", overrides)
    seconds = projects.run(project, "tlops", "run")
    metrics = json.loads((project / "reports/metrics.json").read_text())
    data = json.loads((project / "reports/data.json").read_text())["totals"]
    exported = json.loads((project / "reports/export.json").read_text())
    return {"name": name, "seconds": seconds, "metrics": metrics, "data": data, "export": exported,
            "baseline": baseline(project)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="digits,fashion,clipart")
    ap.add_argument("--work", type=Path, default=None, help="keep the clones and data here (default: a temp dir)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="tlops-bench-recipe-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = [run_dataset(name, work) for name in args.datasets.split(",")]
    print("\n| dataset | images (train/val/test), classes | metric | head only | fine-tuned | exported | "
          "`tlops run` | baseline: HOG + LogReg | raw pixels + LogReg |")
    print("|---|---|---|---:|---:|---|---:|---:|---:|")
    for r in rows:
        m, d, b = r["metrics"], r["data"], r["baseline"]
        metric = m["metric"]
        shown = (lambda s: f"{m[s]['accuracy']:.4f}" + (f" ({metric} {m[s][metric]:.4f})"
                                                        if metric != "accuracy" else ""))
        print(f"| {r['name']} | {d['train']}/{d['val']}/{d['test']}, {d['classes']} | {metric} | {shown('head')} | "
              f"{shown('finetuned')} | {m['selected']} (ONNX {r['export']['test_accuracy']:.4f}) | "
              f"{r['seconds']:.0f} s | {b['hog']:.4f} | {b['pixels']:.4f} |")


if __name__ == "__main__":
    main()
