"""The finetune stage with and without the frozen-trunk cache, at each precision this CPU has, on the digits.

Each variant runs tlops.training.finetune.finetune in a process of its own (so peak memory is its own), from a trunk cache
that is empty (the trunk is computed inside the measured time) and, for the cached variants, once more with the
cache filled by the first run and another learning rate (what a second run or a sweep costs).

    python bench/finetune.py [--params params.yaml] [--epochs N]

Prints wall seconds, training images/s, peak memory, final validation accuracy and the ratio to the uncached
fp32 stage. Target: >= 3x at equal accuracy (+-0.5 point) with the default params.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANT = """
import json, resource, sys, time
from tlops.core import paths
from tlops.core.config import load_params
from tlops.data.manifest import load_manifest
from tlops.training.finetune import finetune_model
params = load_params("params.yaml")
over = json.loads(sys.argv[1])
params = params.model_copy(update={"finetune": params.finetune.model_copy(update=over)})
t = time.perf_counter()
result = finetune_model(params, load_manifest(), paths.HEAD_DIR, "out/model", sys.argv[2],
                        history_path="out/history.csv")
seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "val_accuracy": result.val_accuracy, "trunk": result.trunk,
                  "train_images": len(load_manifest().rows_in("train")),
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def prepare_project(work: Path, params_file: Path, epochs: int | None) -> None:
    """ingest, prepare, features and train_head of the digits in `work` (the stages before finetune)."""
    import yaml

    from tlops.core import paths
    from tlops.core.config import parse_params
    from tlops.data import manifest, prepare, sources
    from tlops.features import dataset, extract
    from tlops.training import head

    raw = yaml.safe_load(params_file.read_text())
    raw["data"]["source"] = "digits"
    if epochs:
        raw["finetune"]["epochs"] = epochs
    (work / "params.yaml").write_text(yaml.safe_dump(raw))
    params = parse_params(raw)
    sources.ingest_source(params.data, paths.RAW)
    prepare.prepare_data(paths.RAW, params.data, paths.MANIFEST, paths.DATA_REPORT)
    extract.extract_features(manifest.load_manifest(), params, paths.FEATURES_DIR, progress=False)
    head.save_head(head.train_head_grid(dataset.load_feature_dataset(), params.head))


def run_variant(work: Path, over: dict, checkpoints: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", VARIANT, json.dumps(over), checkpoints], cwd=work,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"variant {over} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    from tlops.training.devices import cpu_has_bf16

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--epochs", type=int, default=None, help="default: finetune.epochs of the params file")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="tlops-bench-finetune-") as tmp:
        work = Path(tmp)
        os.chdir(work)
        prepare_project(work, args.params.resolve(), args.epochs)
        precisions = ["fp32", "bf16"] if cpu_has_bf16() else ["fp32"]
        rows = [("before: trunk_cache false fp32, 1 thread", run_variant(
            work, {"trunk_cache": False, "precision": "fp32", "num_threads": 1}, "ckpt-before"))]
        for cache in (False, True):
            for precision in precisions:
                label = f"trunk_cache {str(cache).lower():5} {precision}"
                ckpt = f"ckpt-{int(cache)}-{precision}"
                rows.append((label, run_variant(work, {"trunk_cache": cache, "precision": precision}, ckpt)))
                if cache:  # again, the trunk cache filled: another learning rate, as a rerun or a sweep would be
                    again = run_variant(work, {"trunk_cache": cache, "precision": precision, "lr": 0.002}, ckpt)
                    rows.append((f"{label}, cache warm (lr 0.002)", again))
    before, base = rows[0][1], rows[1][1]
    print(f"\nfinetune stage on the digits ({base['train_images']} training images), CPU: {os.cpu_count()} cores, "
          f"bf16 {'yes' if 'bf16' in precisions else 'no'}")
    print(f"{'variant':44} {'seconds':>8} {'images/s':>9} {'peak MB':>8} {'val acc':>8} {'ratio':>6}")
    epochs = args.epochs or _epochs(args.params)
    for label, r in rows:
        ips = r["train_images"] * epochs / r["seconds"]
        print(f"{label:44} {r['seconds']:8.1f} {ips:9.1f} {r['peak_mb']:8.0f} {r['val_accuracy']:8.4f} "
              f"{base['seconds'] / r['seconds']:5.2f}x")
    cached = next(r for label, r in rows if label.startswith("trunk_cache true  fp32"))
    print(f"\ntrunk cache, fp32, same params otherwise: {base['seconds'] / cached['seconds']:.2f}x faster, validation "
          f"accuracy {cached['val_accuracy'] - base['val_accuracy']:+.4f}")
    print(f"the stage at the default params against the stage before (uncached, 1 thread): "
          f"{before['seconds'] / cached['seconds']:.2f}x (target >= 3x), validation accuracy "
          f"{cached['val_accuracy'] - before['val_accuracy']:+.4f} (target within +-0.005)")


def _epochs(params_file: Path) -> int:
    from tlops.core.config import load_params

    return load_params(params_file).finetune.epochs


if __name__ == "__main__":
    main()
