"""Text benchmark: MiniLM feature extraction (PyTorch vs ONNX Runtime), fine-tuning speed, serving fp32 vs int8.

    python bench/text.py [--texts /tmp/wordnet_texts] [--model models/model.onnx] [--concurrency 1,8,32]
                         [--max-seconds 20] [--n 512]

  extraction  texts/s of the frozen all-MiniLM-L6-v2 encoder (mean pooling, max 128 tokens) over --n texts, batches
              of 64 sorted by length as the features stage runs them: eager PyTorch (inference_mode) against the
              ONNX Runtime export the features stage uses on CPU (tlops.features.frozen.make_runner)
  finetune    training texts/s of the fine-tuning step as tlops runs it: the top 3 layer groups unfrozen, AdamW,
              batch 32, finetune.precision auto (what tlops.training.devices picks here)
  serving     POST /predict (text/plain, one text per request) to `python -m serving` at each concurrency, the fp32
              model and its int8 dynamic quantization (tlops.export.quantize_int8), every answer's status checked;
              and ONNX Runtime directly (batch 32) for both
The texts are the files of --texts (a textfolder; bench/wordnet.py makes one from WordNet), else generated
sentences. The model is --model (default: the pipeline's models/model.onnx when it is a text model), else a
stand-in: MiniLM + a random linear head over 8 classes, exported by tlops.export like the export stage does.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tlops.core import paths
from tlops.inputs.text import load_text
from tlops.onnx import metadata


def bench_serving_module():
    """bench/serving.py (the load generator and server helpers), loaded by path: `serving` is also the package."""
    spec = importlib.util.spec_from_file_location("bench_serving", ROOT / "bench" / "serving.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_serving"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def read_texts(folder: Path | None, n: int) -> list[str]:
    if folder is not None:
        files = sorted(p for p in folder.rglob("*.txt"))
        rng = np.random.default_rng(0)
        chosen = rng.choice(len(files), size=min(n, len(files)), replace=False)
        return [load_text(files[i]) for i in sorted(chosen)]
    words = "the a model text reads classes quickly slowly data pipeline serving token encoder layer".split()
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(words, size=int(rng.integers(5, 40)))) for _ in range(n)]


def timed(fn, repeats: int = 1) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


def extraction(texts: list[str]) -> dict:
    import torch

    from tlops.features.frozen import make_runner, torch_runner
    from tlops.models.backbones import create_backbone

    bb = create_backbone("minilm_l6")
    ids = bb.spec.encode(texts)
    order = np.argsort([len(x) for x in ids], kind="stable")
    batches = [bb.spec.pad([ids[i] for i in order[s : s + 64]]) for s in range(0, len(order), 64)]
    eager = torch_runner(bb.model, torch.device("cpu"))
    ort, engine = make_runner(bb.model, bb.spec.input_size, "onnxruntime", example=batches[-1][:4])
    out = {}
    for name, run in (("torch", eager), (engine, ort)):
        seconds = timed(lambda run=run: [run(b) for b in batches])
        out[name] = round(len(texts) / seconds, 1)
    return {"texts": len(texts), "mean_tokens": round(float(np.mean([len(x) for x in ids])), 1), "texts_per_s": out}


def finetune_speed(texts: list[str], steps: int = 12) -> dict:
    import torch
    from torch.nn import functional as F

    from tlops.models.backbones import create_backbone
    from tlops.models.classifier import Classifier
    from tlops.models.heads import build_head
    from tlops.training.devices import amp_dtype
    from tlops.training.schedule import param_groups, set_trainable

    bb = create_backbone("minilm_l6")
    head = build_head("linear", bb.num_features, 8, 256, 0.2)
    model = Classifier(bb.model, head)
    top = bb.groups[::-1][:3]
    set_trainable(model.backbone, top, 3, "frozen")
    opt = torch.optim.AdamW(param_groups(head, top, 1e-3, 0.6, 1e-3), weight_decay=0.01, fused=True)
    amp = amp_dtype(torch.device("cpu"), "auto")
    x = torch.from_numpy(bb.spec.batch((texts * 2)[:32]))
    y = torch.randint(0, 8, (32,))

    def step() -> None:
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    seconds = timed(step, steps)
    return {"batch": 32, "tokens": int(x.shape[1]), "unfrozen_groups": 3, "precision": str(amp or "fp32"),
            "texts_per_s": round(32 / seconds, 1), "step_ms": round(seconds * 1000, 1)}


def standin_model(work: Path) -> Path:
    """MiniLM + a random linear head, exported with the embedding output and metadata as the export stage does."""
    import torch

    from tlops.export.lineage import build_metadata, write_metadata
    from tlops.export.onnx_export import export_onnx
    from tlops.export.served import Served
    from tlops.models.backbones import create_backbone
    from tlops.models.classifier import Classifier
    from tlops.models.heads import build_head

    bb = create_backbone("minilm_l6")
    torch.manual_seed(0)
    model = Classifier(bb.model, build_head("linear", bb.num_features, 8, 256, 0.0)).eval()
    path = work / "model.onnx"
    served = Served(model, explain="text")
    export_onnx(served, bb.spec.input_size, path, 17, served.outputs,
                example=bb.spec.batch(["a stand-in", "model"]))
    write_metadata(path, build_metadata([f"class_{i}" for i in range(8)], bb.spec, "minilm_l6", None, None, None,
                                        "standin"))
    metadata.write_sha256(path)
    return path


def serving(model: Path, int8: Path, texts: list[str], levels: list[int], max_seconds: float, work: Path) -> dict:
    bs = bench_serving_module()
    folder = work / "payloads"
    folder.mkdir()
    bodies = [t.encode("utf-8") for t in texts]
    for i, b in enumerate(bodies):
        (folder / f"{i:04d}.bin").write_bytes(b)
    (folder / "meta.json").write_text(json.dumps({"mode": "predict", "path": "/predict", "content_type": "text/plain",
                                                  "headers": [{} for _ in bodies]}))
    out = {}
    for tag, path in (("fp32", model), ("int8", int8)):
        proc, url, _ = bs.start_server(path, work, {"grpc_port": None, "drift_window": 500}, tag)
        try:
            out[tag] = [bs.run_load(url, folder, c, 100_000, max_seconds) for c in levels]
        finally:
            bs.stop_server(proc)
    return out


def ort_direct(model: Path, int8: Path, texts: list[str]) -> dict:
    from tlops.onnx import runtime

    spec = metadata.spec_of(metadata.read_metadata(model))
    ids = spec.encode(texts)
    batches = [spec.pad(ids[s : s + 32]) for s in range(0, len(ids), 32)]
    out = {}
    for tag, path in (("fp32", model), ("int8", int8)):
        sess = runtime.session(path, cpu_only=True)
        seconds = timed(lambda sess=sess: [sess.run(["logits"], {"input": b}) for b in batches])
        out[tag] = round(len(texts) / seconds, 1)
    out["size_mb"] = {"fp32": round(model.stat().st_size / 1e6, 1), "int8": round(int8.stat().st_size / 1e6, 1)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=Path, default=None)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--max-seconds", type=float, default=20.0)
    args = ap.parse_args()
    texts = read_texts(args.texts, args.n)
    print(f"{len(texts)} texts from {args.texts or 'the generator'}", flush=True)
    print("extraction:", json.dumps(extraction(texts)), flush=True)
    print("finetune:", json.dumps(finetune_speed(texts)), flush=True)
    from tlops.export.verify import quantize_int8

    with tempfile.TemporaryDirectory(prefix="tlops-bench-text-") as tmp:
        work = Path(tmp)
        model = args.model
        if model is None and paths.ONNX.exists() and \
                metadata.input_kind_of(metadata.read_metadata(paths.ONNX)) == "text":
            model = paths.ONNX
        model = model or standin_model(work)
        int8 = quantize_int8(model, work / "model.int8.onnx", None)
        metadata.write_sha256(int8)
        print(f"model: {model}", flush=True)
        print("onnxruntime direct (texts/s, batch 32):", json.dumps(ort_direct(model, int8, texts)), flush=True)
        levels = [int(c) for c in args.concurrency.split(",")]
        results = serving(model, int8, texts, levels, args.max_seconds, work)
    print(f"\n{'model':6} {'c':>3} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
    for tag, rows in results.items():
        for r in rows:
            print(f"{tag:6} {r['concurrency']:>3} {r['throughput']:>8.1f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
                  f"{r['errors']:>6}")
    return 1 if any(r["errors"] for rows in results.values() for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
