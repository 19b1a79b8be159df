"""An exported model held to its numbers with ONNX Runtime: parity with PyTorch, scores on labelled files, timing, int8
quantisation behind the same gate."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tlops.core.errors import ParityError
from tlops.core.io import atomic_path
from tlops.evaluate import scoring
from tlops.export.lineage import write_metadata
from tlops.export.onnx_export import parity
from tlops.inputs.model_input import preprocess_batches
from tlops.onnx import metadata, runtime

if TYPE_CHECKING:
    from torch import nn


def check_parity(onnx_path: str | os.PathLike, model: nn.Module, batches: Iterable[np.ndarray],
                 atol: float) -> dict[str, Any]:
    """ONNX Runtime (CPU) against PyTorch (CPU) on every batch, under the one parity rule, for every output of the
    model (a module returning a tuple: the served logits, embedding, OOD score and explanation, in the file's order);
    the figures returned are the logits'."""
    import torch

    sess, model = runtime.session(onnx_path, cpu_only=True), model.eval().to("cpu")
    names = [o.name for o in sess.get_outputs()]
    ref: list[list[np.ndarray]] = [[] for _ in names]
    got: list[list[np.ndarray]] = [[] for _ in names]
    with torch.inference_mode():
        for x in batches:
            x = runtime.as_input(x)
            ys = model(torch.from_numpy(x))
            ys = ys if isinstance(ys, tuple) else (ys,)
            if len(ys) != len(names):
                raise ParityError(f"{onnx_path}: {len(names)} outputs ({', '.join(names)}), PyTorch gives {len(ys)}")
            for i, (y, o) in enumerate(zip(ys, sess.run(None, {sess.get_inputs()[0].name: x}), strict=True)):
                flat = names[i] != metadata.OUTPUT  # 1-D: a text explanation's length differs between batches
                ref[i].append(y.float().numpy().reshape(-1) if flat else y.float().numpy())
                got[i].append(o.reshape(-1) if flat else o)
    if not ref[0]:
        raise ParityError("parity check got no test images: the test split is empty")
    stats = {}
    for i, name in enumerate(names):
        try:
            stats[name] = parity(np.concatenate(ref[i]), np.concatenate(got[i]), atol, top1=name == metadata.OUTPUT)
        except ParityError as e:
            where = "" if name == metadata.OUTPUT else f" (output {name})"
            raise ParityError(f"{onnx_path}: {e}{where} (the test split)") from None
    first = stats.pop(names[0])
    return {**first, **({"outputs": {k: v["max_abs_diff"] for k, v in stats.items()}} if stats else {})}


def accuracy_of(pred_labels: Sequence[str], true_labels: Sequence[str]) -> float:
    """Share of predictions equal to the true class name (names, so models with other label sets compare)."""
    if not true_labels:
        return math.nan
    return float(np.mean([p == t for p, t in zip(pred_labels, true_labels, strict=True)]))


def score_onnx(path: str | os.PathLike, images: Sequence[str | Path], true_labels: Sequence[str],
               max_pixels: int, metric: str = "accuracy") -> float:
    """`metric` (tlops.evaluate.scoring) of an ONNX file on labelled images (see onnx_scores)."""
    return onnx_scores(path, images, true_labels, max_pixels, (metric,))[metric]


def onnx_scores(path: str | os.PathLike, images: Sequence[str | Path], true_labels: Sequence[str],
                max_pixels: int, metrics: Sequence[str]) -> dict[str, float]:
    """Each of `metrics` of an ONNX file on labelled images, from one run, with the file's OWN labels and
    preprocessing (from its metadata); a true label the model does not know counts as a miss."""
    meta = metadata.read_metadata(path)
    labels, spec = metadata.labels_of(meta), metadata.spec_of(meta)
    pred = runtime.run_batches(runtime.session(path, cpu_only=True),
                               preprocess_batches(images, spec, max_pixels)).argmax(1)
    known = {name: i for i, name in enumerate(labels)}
    y = np.array([known.get(t, -1) for t in true_labels])  # a label the model does not know: never matched
    return {m: accuracy_of([labels[i] for i in pred], true_labels) if m == "accuracy" else
            scoring.score(m, y, pred, len(labels)) for m in metrics}


def benchmark(path: str | os.PathLike, x: np.ndarray, repeats: int = 20) -> dict[str, float]:
    """Median batch-1 latency (ms) and throughput (images/s) at the batch size of `x`."""
    sess = runtime.session(path, cpu_only=True)
    run = lambda batch: sess.run([metadata.OUTPUT], {metadata.INPUT: batch})  # noqa: E731
    run(x[:1]), run(x)  # warm-up: first runs allocate and pick kernels
    single = []
    for _ in range(repeats):
        t = time.perf_counter()
        run(x[:1])
        single.append(time.perf_counter() - t)
    t = time.perf_counter()
    rounds = max(1, repeats // 4)
    for _ in range(rounds):
        run(x)
    elapsed = time.perf_counter() - t
    return {"latency_ms": float(np.median(single) * 1000), "throughput_ips": float(rounds * len(x) / elapsed),
            "batch": len(x)}


def quantize_int8(fp32_path: str | os.PathLike, out_path: str | os.PathLike,
                  calibration: Iterable[np.ndarray] | None) -> Path:
    """Static int8 quantization (QDQ, per-channel weights, MinMax) calibrated on the given input batches; without
    calibration (None: text models, whose cost is in MatMuls over activations of every length) dynamic quantization,
    int8 weights and activations quantized per batch as they come.

    The fp32 model's metadata is carried over with tlops.precision = int8.
    """
    if calibration is None:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        meta = {**metadata.read_metadata(fp32_path), metadata.PRECISION: "int8"}
        with atomic_path(out_path) as out:
            # per channel: on WordNet glosses (MiniLM) per-tensor int8 lost 1.1 points of accuracy, per channel 0.2
            quantize_dynamic(str(fp32_path), str(out), weight_type=QuantType.QInt8, per_channel=True)
            write_metadata(out, meta)
            metadata.assert_self_contained(out)
        return Path(out_path)
    import tempfile

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self._batches, None)
            return None if x is None else {metadata.INPUT: np.ascontiguousarray(x, np.float32)}

    meta = {**metadata.read_metadata(fp32_path), metadata.PRECISION: "int8"}
    with tempfile.TemporaryDirectory(prefix="tlops-int8-") as tmp, atomic_path(out_path) as out:
        prepared = Path(tmp) / "prepared.onnx"
        # Shape inference + graph fusion first, so the quantizer sees fused Conv+activation nodes.
        quant_pre_process(str(fp32_path), str(prepared))
        quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        write_metadata(out, meta)
        metadata.assert_self_contained(out)
    return Path(out_path)
