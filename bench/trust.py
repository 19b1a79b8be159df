"""Predictions to trust, measured on what users bring: calibration, "none of these" and explanations of the exported
model, each set through `tlops run` with the default params.yaml in a fresh clone of the project.

    python bench/trust.py [--sets digits,fashion,wordnet,patch,patch224,planted] [--work DIR]

digits    the embedded default; far-out: 200 Fashion-MNIST images
fashion   Fashion-MNIST, 500 of each of the 10 classes (Debian's dataset-fashion-mnist); far-out: auto (digits)
wordnet   WordNet noun glosses, 8 lexicographer classes (bench/wordnet.py, Debian's wordnet-base); far-out: auto
          (sentences of Python's standard-library docstrings: texts about code, not about nouns of the world)
patch     noise images whose class is only a coloured square (1/16 of the image) at a random place: does the map of
          the exported model peak on the square? (at the default model.image_size, 96 px: a 3x3 map)
patch224  the same images at model.image_size 224 (a 7x7 map)
planted   sentences of neutral words where one planted word decides the class: is it the token with the largest share?

Per set: ECE (15 bins) of the exported model on the test split before and after its temperature, the accuracy of both
(identical: T never changes the argmax), the served probabilities of one test image against softmax(PyTorch logits /
T), the OOD AUROC of the Mahalanobis score kept and of the energy score, the share of test and far-out inputs flagged.
Then, for digits, fashion and wordnet, the kept score against the other embedding scores it was chosen over, each
fitted on the same training embeddings and thresholded on the same validation split: the distance to the k-th
nearest training embedding (Sun et al. 2022), Mahalanobis with one covariance per class, and the relative
Mahalanobis distance (Ren et al. 2021: less the distance to one Gaussian of all the training data).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import projects  # noqa: E402  (after the path: run as a script)

PATCH_CLASSES = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230)}
PLANTED = {"music": "piano", "water": "river", "animal": "tiger"}
NEUTRAL = ("the a this that some one another every each with without on under over near after before then and or "
           "but very quite rather small large old new long short first last other same next thing place time day "
           "way part side end kind sort matter case point group number area fact").split()


def write_patches(out: Path, per_class: int = 150, size: int = 96, seed: int = 0) -> dict[str, list[int]]:
    """out/<colour>/<n>.png: grey noise with a size/4 square of the class colour; {relative path: [top, left, side]}."""
    from PIL import Image

    rng, side, where = np.random.default_rng(seed), size // 4, {}
    for name, colour in PATCH_CLASSES.items():
        (out / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            # grey: no colour but the square
            img = rng.integers(30, 226, (size, size, 1), dtype=np.uint8).repeat(3, axis=2)
            top, left = (int(v) for v in rng.integers(size // 12, size - side - size // 12, 2))  # inside the crop
            img[top:top + side, left:left + side] = colour
            Image.fromarray(img).save(out / name / f"{i:03d}.png")
            where[f"{name}/{i:03d}.png"] = [top, left, side]
    return where


def write_planted(out: Path, per_class: int = 80, seed: int = 0) -> dict[str, str]:
    """out/<class>/<n>.txt: 6-14 neutral words with the class's word planted at a random place; {path: word}."""
    rng, planted = np.random.default_rng(seed), {}
    for name, word in PLANTED.items():
        (out / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            words = [str(w) for w in rng.choice(NEUTRAL, int(rng.integers(6, 15)))]
            words.insert(int(rng.integers(0, len(words) + 1)), word)
            (out / name / f"{i:03d}.txt").write_text(" ".join(words) + ".\n", encoding="utf-8")
            planted[f"{name}/{i:03d}.txt"] = word
    return planted


def prepare(name: str, work: Path) -> tuple[dict, object]:
    """The params overrides for a set (and what its explanation check needs)."""
    from bench.datasets import FASHION_CLASSES, fashion, wordnet

    if name == "digits":
        far = work / "far-fashion"
        if not far.exists():
            fashion(far, per_class=20)
            for c in FASHION_CLASSES:  # one flat folder: far-out inputs have no class
                for f in (far / c).iterdir():
                    f.rename(far / f"{c}_{f.name}")
                (far / c).rmdir()
        return {"evaluate": {"far_out": str(far)}}, None
    folder = work / f"data-{name}"
    extra = None
    if name == "fashion" and not folder.exists():
        fashion(folder, per_class=500)
    elif name == "wordnet" and not folder.exists():
        wordnet(folder)
    elif name in ("patch", "patch224"):
        folder = work / "data-patch"
        extra = write_patches(folder) if not folder.exists() else json.loads((work / "patch.json").read_text())
        (work / "patch.json").write_text(json.dumps(extra))
        if name == "patch224":
            return {"data": {"source": "imagefolder", "path": str(folder)}, "model": {"image_size": 224}}, extra
    elif name == "planted":
        extra = write_planted(folder) if not folder.exists() else json.loads((work / "planted.json").read_text())
        (work / "planted.json").write_text(json.dumps(extra))
    source = "textfolder" if name in ("wordnet", "planted") else "imagefolder"
    return {"data": {"source": source, "path": str(folder)}}, extra


def run_set(name: str, work: Path) -> dict:
    overrides, extra = prepare(name, work)
    overrides["export"] = {"registered_model": f"tlops-trust-{name}"}
    project = projects.clone(work / f"project-{name}", overrides, reuse=True)
    seconds = projects.run(project, "tlops", "run")
    checks = subprocess.run([sys.executable, __file__, "--check", name, "--extra", json.dumps(extra)], cwd=project,
                            env=projects.env(), capture_output=True, text=True)
    if checks.returncode != 0:
        sys.exit(f"{name}: checks failed\n{checks.stderr[-3000:]}")
    return {"name": name, "seconds": seconds, "metrics": json.loads((project / "reports/metrics.json").read_text()),
            "export": json.loads((project / "reports/export.json").read_text()), **json.loads(checks.stdout)}


def alternatives(served_model: object, manifest: object, spec: object, max_pixels: int, far: str) -> dict:
    """{score: {test_flagged, auroc, worst_class}} of the kept OOD score and of the alternatives measured for it. Each
    score is computed per part (the embedding, and the stride-16 stage of an image backbone) and the parts combined
    as the kept score combines them: scaled by their validation median and 95th percentile, the larger counting."""
    from sklearn.covariance import LedoitWolf

    from tlops.data.manifest import split_items
    from tlops.evaluate.far_out import far_out_batches
    from tlops.evaluate.ood import auroc, combine, fit_mahalanobis, mahalanobis_score, normalised, scale, threshold
    from tlops.export.served import served_parts
    from tlops.inputs.model_input import preprocess_batches

    def parts(batches: object) -> list[np.ndarray]:
        out = served_parts(served_model, batches)
        return [out[k] for k in sorted(out) if k.startswith("part_")]

    items = {s: split_items(manifest, s) for s in ("train", "val", "test")}
    feats = {s: parts(preprocess_batches([p for p, _ in its], spec, max_pixels)) for s, its in items.items()}
    feats["far"] = parts(far_out_batches(far, spec, max_pixels))
    y = {s: np.array([c for _, c in its]) for s, its in items.items()}
    classes = int(y["train"].max()) + 1

    def shared(train: np.ndarray) -> object:
        fit = fit_mahalanobis(train, y["train"], classes)
        return lambda e: mahalanobis_score(e, fit["means"], fit["precision"])

    def knn(k: int) -> object:
        def make(train: np.ndarray) -> object:
            bank = normalised(train).astype(np.float32)
            return lambda e: 1 - -np.partition(-(normalised(e).astype(np.float32) @ bank.T), k - 1, axis=1)[:, k - 1]
        return make

    def per_class(train: np.ndarray) -> object:
        e, fits = normalised(train), []
        for c in range(classes):
            mean = e[y["train"] == c].mean(axis=0)
            fits.append((mean[None], LedoitWolf(assume_centered=True).fit(e[y["train"] == c] - mean).precision_))
        return lambda x: np.min([mahalanobis_score(x, m, p) for m, p in fits], axis=0)

    def relative(train: np.ndarray) -> object:
        fit, background = shared(train), fit_mahalanobis(train, np.zeros(len(train), int), 1)
        return lambda e: fit(e) - mahalanobis_score(e, background["means"], background["precision"])

    out = {}
    for score, make in (("mahalanobis (kept)", shared), ("knn k=1", knn(1)), ("knn k=10", knn(10)),
                        ("per-class covariance", per_class), ("relative mahalanobis", relative)):
        per_part = [make(train) for train in feats["train"]]
        raw = {s: [f(p) for f, p in zip(per_part, feats[s], strict=True)] for s in ("val", "test", "far")}
        scales = [scale(v) for v in raw["val"]]
        combined = {s: combine(raw[s], *zip(*scales, strict=True)) for s in raw}
        cut = threshold(combined["val"])
        flagged = combined["test"] > cut
        out[score] = {"test_flagged": float(flagged.mean()), "auroc": auroc(combined["test"], combined["far"]),
                      "worst_class": float(max(flagged[y["test"] == c].mean() for c in np.unique(y["test"])))}
    return out


def check(name: str, extra: object) -> dict:
    """In the project folder: the served probabilities of one test image against PyTorch, the exported accuracy
    before and after T, and the explanation checks of patch and planted."""
    import torch

    from serving.served_model import load_model
    from tlops.core import paths
    from tlops.data.manifest import load_manifest, split_items
    from tlops.evaluate.evaluation import exported_classifier
    from tlops.inputs.model_input import preprocess_batches
    from tlops.onnx.runtime import softmax

    served, (model, _) = load_model(paths.ONNX), exported_classifier()
    t = float(served.metadata["tlops.temperature"])
    manifest = load_manifest(paths.MANIFEST)
    items = split_items(manifest, "test")
    files, y = [p for p, _ in items], np.array([c for _, c in items])
    logits, explanations, ids = [], [], []
    for x in preprocess_batches(files, served.spec, 10**8, batch=32):
        out = served.run(x, explain=extra is not None)
        logits.append(out.logits)
        if extra is not None:
            explanations += list(out.explanation)
            ids += list(x)
    logits = np.concatenate(logits)
    x0 = next(preprocess_batches(files[:1], served.spec, 10**8))
    with torch.inference_mode():
        reference = softmax(model(torch.from_numpy(x0)).numpy() / t)
    result = {"temperature": t, "probability_gap": float(np.abs(softmax(served.run(x0).logits) - reference).max()),
              "accuracy_calibrated": float((logits.argmax(1) == y).mean()),
              "accuracy_uncalibrated": float(((logits * t).argmax(1) == y).mean())}
    if name.startswith("patch"):
        spec, hits = served.spec, 0
        for f, e, logit in zip(files, explanations, logits, strict=True):
            top, left, side = extra[str(Path(f).relative_to(Path(f).parents[1]))]
            size = 96
            scale = spec.resize_size / size
            offset, visible = (spec.resize_size - spec.input_size) / 2 / scale, spec.input_size / scale
            m = e[int(logit.argmax())]
            r, c = divmod(int(m.argmax()), m.shape[1])
            cell_h, cell_w = visible / m.shape[0], visible / m.shape[1]
            y0, x0_ = offset + r * cell_h, offset + c * cell_w
            hits += y0 < top + side and y0 + cell_h > top and x0_ < left + side and x0_ + cell_w > left
        result["explanation_hits"] = hits / len(files)
    elif name == "planted":
        spec, hits = served.spec, 0
        for f, e, logit, row in zip(files, explanations, logits, ids, strict=True):
            word = extra[str(Path(f).relative_to(Path(f).parents[1]))]
            real = row[row != spec.pad_id]
            tokens = spec.tokens(real)
            share = e[int(logit.argmax())][: len(row)][row != spec.pad_id]
            hits += tokens[int(np.argmax(share))] == word
        result["explanation_hits"] = hits / len(files)
    if name in ("digits", "fashion", "wordnet"):
        from tlops.core.config import load_params
        from tlops.core.io import read_json
        from tlops.export.served import Served

        far = read_json(paths.CALIBRATION)["ood"]["far"]["set"]
        result["alternatives"] = alternatives(Served(model), manifest, served.spec, load_params().data.max_pixels, far)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="digits,fashion,wordnet,patch,patch224,planted")
    ap.add_argument("--work", type=Path, default=None, help="keep the clones and data here (default: a temp dir)")
    ap.add_argument("--check", default=None, help=argparse.SUPPRESS)  # run inside a project folder
    ap.add_argument("--extra", default="null", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.check:
        sys.path.insert(0, os.getcwd())
        print(json.dumps(check(args.check, json.loads(args.extra))))
        return
    with tempfile.TemporaryDirectory(prefix="tlops-bench-trust-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = []
        for name in args.sets.split(","):
            rows.append(run_set(name, work))
            print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("metrics", "export")}), flush=True)
    print("\n| set | test items | T | ECE before -> after (class-wise) | accuracy uncalibrated / calibrated | "
          "max \\|p - softmax(z/T)\\| | OOD far-out set | AUROC Mahalanobis / energy | flagged: test / far-out | "
          "explanation | `tlops run` |")
    print("|---|---:|---:|---|---|---:|---|---|---|---|---:|")
    for r in rows:
        m = r["metrics"]
        cal, ood = m["calibration"], m["ood"]
        before, after = cal["test"]["before"], cal["test"]["after"]
        maha, energy = ood["mahalanobis"], ood["energy"]
        explained = f"{r['explanation_hits']:.0%} peak on the deciding part" if "explanation_hits" in r else (
            m["explanation"]["kind"] or "none")
        print(f"| {r['name']} | {m['test_images']} | {cal['temperature']:.3f} | {before['ece']:.4f} -> "
              f"{after['ece']:.4f} ({before['classwise_ece']:.4f} -> {after['classwise_ece']:.4f}) | "
              f"{r['accuracy_uncalibrated']:.4f} / {r['accuracy_calibrated']:.4f} | {r['probability_gap']:.1e} | "
              f"{Path(ood['far']['set']).name} ({ood['far']['items']}) | "
              f"{maha.get('auroc', float('nan')):.4f} / {energy.get('auroc', float('nan')):.4f} | "
              f"{maha['test_flagged']:.1%} / {maha.get('far_flagged', float('nan')):.1%} | {explained} | "
              f"{r['seconds']:.0f} s |")
    compared = [r for r in rows if "alternatives" in r]
    if compared:
        print("\nOOD scores on the same embeddings, each thresholded at the validation split's 95th percentile: test "
              "flagged / AUROC against the far-out set / the most-flagged test class\n")
        print("| score | " + " | ".join(r["name"] for r in compared) + " |")
        print("|---|" + "---|" * len(compared))
        for score in compared[0]["alternatives"]:
            cells = [r["alternatives"][score] for r in compared]
            print(f"| {score} | " + " | ".join(f"{c['test_flagged']:.1%} / {c['auroc']:.4f} / {c['worst_class']:.0%}"
                                               for c in cells) + " |")


if __name__ == "__main__":
    main()
