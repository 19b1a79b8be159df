"""fastai's recipe against tlops on the same Fashion-MNIST split, backbone weights and input size, side by side.

    python bench/peers.py [--per-class 500] [--epochs E] [--tuned PARAMS_JSON] [--skip-fastai-2x]
                          [--work /tmp/tlops-bench-peers] [--out /tmp/tlops-bench-peers/peers.json]

fastai is installed for this benchmark only (`pip install fastai`, or the `bench` extra), never a tlops dependency.
tlops: `tlops run` of the default params.yaml in a fresh clone on the images (bench/datasets.fashion); its wall time is
the whole run (every stage: data, features, head, fine-tuning, evaluation, export), its score the exported model's test
accuracy. With --tuned (reports/tune/summary.json of `tlops tune`: its best trial's changes; or a flat
{"section.key": value} file) a second clone with those changes set runs the same way.
fastai: trained on the default run's manifest (data/prepared/manifest.csv): train split to learn, val to validate,
scored on its test split. EfficientNet-Lite0 with tlops' own weights (tlops.models.backbones) at tlops' input size and
normalisation, fastai's head (create_head) and body|head split, aug_transforms(), the lr_find() valley as base lr,
then fine_tune(E) and fine_tune(2E), E = finetune.epochs (tlops' epoch cap; fine_tune adds one frozen epoch). Its wall
time: DataLoaders + lr_find + fine_tune + predicting the test split; on the machine's threads (torch and its loaders).
lr_find's 100 steps are a fixed cost (fastai trains BatchNorm in the frozen body, so every step runs backward through
it): on small data it is most of fastai's time.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import projects  # after the path: run as a script
from bench.datasets import fashion


def tlops_accuracy(project: Path) -> float:
    m = json.loads((project / "reports/metrics.json").read_text())
    return float(m["exported"]["accuracy"] if "exported" in m else m[m.get("selected", "finetuned")]["accuracy"])


def tuned_changes(path: Path) -> dict:
    """{"section.key": value} from a tune summary (the best pipeline trial's, else the best head trial's) or a flat
    changes file; the registered model name a trial gets is not a setting."""
    s = json.loads(path.read_text())
    if "defaults" in s:
        best = (s.get("pipeline") or {}).get("best") or {}
        if best.get("defaults"):  # no trial beat the defaults: the tuned run is the default one
            return {}
        s = best.get("changes") or (s.get("head") or {}).get("best_changes")
        if not s:
            sys.exit(f"{path}: the study has no complete trial")
    return {k: v for k, v in s.items() if k != "export.registered_model"}


def as_overrides(changes: dict, params: dict) -> dict:
    """Dotted changes as projects.set_params' {section: {key: value}}; a deeper key keeps its siblings."""
    out: dict = {}
    for key, value in changes.items():
        section, *path, leaf = key.split(".")
        node, current = out.setdefault(section, {}), params[section]
        for part in path:
            current = current[part]
            node = node.setdefault(part, copy.deepcopy(current))
        node[leaf] = value
    return out


def tlops_row(name: str, project: Path) -> dict:
    seconds = projects.run(project, "tlops", "run")
    return {"recipe": name, "test_accuracy": tlops_accuracy(project), "seconds": seconds}


def fastai_row(project: Path, epochs: int, seed: int = 42) -> dict:
    """fastai's recipe on the project's manifest split; its lr_find suggestion with it."""
    import pandas as pd
    import torch
    from fastai.vision.all import (
        ImageDataLoaders,
        Learner,
        Normalize,
        Resize,
        TimmBody,
        accuracy,
        add_head,
        aug_transforms,
        default_split,
        set_seed,
    )

    from tlops.data.manifest import load_manifest
    from tlops.models.backbones import create_backbone

    params = yaml.safe_load((project / "params.yaml").read_text())
    size = params["model"]["image_size"]
    rows = load_manifest(project / "data/prepared/manifest.csv").rows
    df = pd.DataFrame([(r.path, r.label, r.split) for r in rows], columns=["path", "label", "split"])
    test = df[df.split == "test"]
    fit = df[df.split != "test"].assign(is_valid=lambda d: d.split == "val")
    torch.set_num_threads(os.cpu_count() or 1)
    set_seed(seed)
    started = time.perf_counter()
    backbone = create_backbone("efficientnet_lite0", image_size=size)  # the same tensors tlops fine-tunes
    spec = backbone.spec
    dls = ImageDataLoaders.from_df(fit, path=project, fn_col="path", label_col="label", valid_col="is_valid",
                                   item_tfms=Resize(size),
                                   batch_tfms=[*aug_transforms(), Normalize.from_stats(spec.mean, spec.std)])
    # What vision_learner builds for a timm arch name (create_timm_model), around tlops' loaded model instead of a
    # download: TimmBody + fastai's create_head, default_split (body | head) for its discriminative LRs, frozen body.
    body = TimmBody(backbone.model)
    model = add_head(body, backbone.num_features, dls.c, pool=body.needs_pool)
    learn = Learner(dls, model, splitter=default_split, metrics=accuracy)
    learn.freeze()
    learn.logger = lambda x: print(x, file=sys.stderr)  # epoch lines to stderr: stdout is the table's
    with learn.no_bar():
        lr = float(learn.lr_find(show_plot=False).valley)
        learn.fine_tune(epochs, base_lr=lr)
        preds, targets = learn.get_preds(dl=dls.test_dl(test, with_labels=True))
    seconds = time.perf_counter() - started
    acc = float((preds.argmax(1) == targets).float().mean())
    return {"recipe": f"fastai fine_tune({epochs})", "test_accuracy": acc, "seconds": seconds, "lr_find_valley": lr,
            "images": {s: int((df.split == s).sum()) for s in ("train", "val", "test")}}


def table(rows: list[dict]) -> None:
    fastai = [r for r in rows if r["recipe"].startswith("fastai")]
    ref = max(fastai, key=lambda r: (r["test_accuracy"], -r["seconds"]))["seconds"] if fastai else None
    print(f"{'recipe':30}{'test accuracy':>15}{'wall time (s)':>15}{'x best fastai':>15}")
    for r in rows:
        r["relative_time"] = r["seconds"] / ref if ref else None
        rel = f"{r['relative_time']:.2f}" if ref else "-"
        print(f"{r['recipe']:30}{r['test_accuracy']:15.4f}{r['seconds']:15.0f}{rel:>15}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=500)
    ap.add_argument("--work", type=Path, default=Path("/tmp/tlops-bench-peers"))
    ap.add_argument("--epochs", type=int, default=None, help="fastai's E (default: params.yaml finetune.epochs)")
    ap.add_argument("--tuned", type=Path, default=None, help="tune summary.json or a {section.key: value} file")
    ap.add_argument("--skip-fastai-2x", action="store_true", help="fine_tune(E) only")
    ap.add_argument("--out", type=Path, default=None, help="the table as JSON (default: WORK/peers.json)")
    a = ap.parse_args()
    images = a.work / f"fashion-{a.per_class}"
    if not images.exists():
        fashion(images, a.per_class)
    data = {"data": {"source": "imagefolder", "path": str(images)}}
    project = projects.clone(a.work / "project", data)
    rows = [tlops_row("tlops run (defaults)", project)]
    params = yaml.safe_load((project / "params.yaml").read_text())
    epochs = a.epochs or params["finetune"]["epochs"]
    notes = []
    if a.tuned:
        changes = tuned_changes(a.tuned)
        tuned = projects.clone(a.work / "project-tuned", data)
        projects.set_params(tuned, as_overrides(changes, params))
        rows.append({**tlops_row("tlops run (tuned)", tuned), "changes": changes})
        if (tuned / "data/prepared/manifest.csv").read_text() != (project / "data/prepared/manifest.csv").read_text():
            notes.append("the tuned changes moved the split: its test set is not the others'")
    else:
        notes.append("no --tuned: the tuned tlops row is skipped")
    for e in [epochs] if a.skip_fastai_2x else [epochs, 2 * epochs]:
        rows.append(fastai_row(project, e))
    imgs = rows[-1]["images"]
    print(f"Fashion-MNIST {a.per_class}/class ({imgs['train']}/{imgs['val']}/{imgs['test']} train/val/test, tlops' "
          f"split), EfficientNet-Lite0 at {params['model']['image_size']} px, E = {epochs}, "
          f"{os.cpu_count()} CPU threads")
    table(rows)
    print("lr_find valley: " + ", ".join(f"{r['recipe']} {r['lr_find_valley']:.2e}" for r in rows
                                         if "lr_find_valley" in r))
    for note in notes:
        print(f"note: {note}")
    out = a.out or a.work / "peers.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"per_class": a.per_class, "epochs": epochs, "cpu_threads": os.cpu_count(),
                               "rows": rows, "notes": notes}, indent=2) + "\n")
    print(f"table: {out}")


if __name__ == "__main__":
    main()
