"""ONNX export of the fine-tuned classifier: one verified file with its metadata, parity gate, int8, promotion.

    export_onnx(model, size, paths.ONNX, opset)       # legacy TorchScript exporter: pinned opset, one file
    write_metadata(paths.ONNX, build_metadata(...))   # labels + preprocessing travel inside the file
    check_parity(paths.ONNX, model, batches, atol)    # ONNX Runtime vs PyTorch on the whole test split
    decide_promotion(candidate_acc, champion_acc, min_delta)

torch is imported inside the functions that need it: the ONNX Runtime helpers here stay usable without it.
Library code: no MLflow, no Prefect (the export task does the registry through tlops.tracking).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tlops import onnx_meta, paths, runtime, scoring
from tlops.config import Params, flatten
from tlops.data import load_manifest, same_classes, split_items
from tlops.errors import ModelIntegrityError, ParityError
from tlops.io import atomic_path, read_json, sha256_json, write_json, write_text
from tlops.preprocess import PreprocessSpec, load_and_preprocess, preprocess_batches, spec_from_dict
from tlops.text import TextSpec

if TYPE_CHECKING:
    from torch import nn


# ---------------------------------------------------------------- export and metadata


def export_onnx(model: nn.Module, input_size: int, path: str | os.PathLike, opset: int,
                output: str | Sequence[str] = onnx_meta.OUTPUT, example: np.ndarray | None = None) -> Path:
    """Export `model` (NCHW float32, dynamic batch -> `output`, or one name per output of a model returning a tuple)
    to ONE self-contained ONNX file at `path`, checked. An integer `example` (token ids, N x L) exports a text model:
    int64 input, batch and sequence length dynamic.

    The one ONNX export of tlops: the features stage runs the frozen base through it, the export stage the whole
    classifier. The TorchScript exporter is used on purpose: the dynamo exporter (torch >= 2.9) cannot convert timm's
    EfficientNet-Lite0 down to opset 17 and silently writes opset 18 instead, so the opset would not be pinned; it is
    also 5-15x slower here. What it exports is compared with the original by `parity`.
    """
    import onnx
    import torch

    tokens = example is not None and np.issubdtype(example.dtype, np.integer)
    if tokens:
        model, x = model.eval().to("cpu"), torch.from_numpy(np.ascontiguousarray(example, np.int64))
        axes = {0: "batch", 1: "sequence"}
    else:
        model, x = static_same_padding(model.eval().to("cpu"), input_size), torch.zeros(2, 3, input_size, input_size)
        axes = {0: "batch"}
    outputs = [output] if isinstance(output, str) else list(output)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "legacy exporter": chosen on purpose, see above
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")  # F.pad's index reversal
        warnings.filterwarnings("ignore", message="Exporting aten::index")  # text: the attention mask's indexing
        torch.onnx.export(
            model, (x,), str(tmp), dynamo=False, opset_version=opset,
            input_names=[onnx_meta.INPUT], output_names=outputs,
            dynamic_axes={onnx_meta.INPUT: axes, **{name: {0: "batch"} for name in outputs}},
        )
        onnx_meta.assert_self_contained(tmp)
        onnx.checker.check_model(str(tmp), full_check=True)
    return Path(path)


def with_embedding(model: nn.Module) -> nn.Module:
    """The classifier with a second output: the pooled embedding its head reads (what the service's drift monitor
    watches, so no second model is needed)."""
    from torch import nn

    class WithEmbedding(nn.Module):
        def __init__(self, classifier: nn.Module) -> None:
            super().__init__()
            self.classifier = classifier

        def forward(self, x):  # noqa: ANN001, ANN202 - traced by the exporter
            embedding = self.classifier.backbone(x)
            return self.classifier.head(embedding), embedding

    return WithEmbedding(model).eval()


def static_same_padding(model: nn.Module, input_size: int) -> nn.Module:
    """A copy of `model` whose TF-style "same" convolutions (timm's Conv2dSame) pad by constants.

    Conv2dSame computes its padding from the input's size at run time. Traced, that is a Shape/Div/Ceil/Pad
    chain per strided convolution which ONNX Runtime cannot fold (the batch axis is dynamic) and which the
    int8 quantizer wrecks (EfficientNet-Lite0 on digits: int8 accuracy 0.65 against fp32 0.91). The exported
    input size is fixed, so each padding is a constant: ZeroPad2d + a plain Conv2d, same weights.
    """
    import copy

    import torch
    from torch import nn

    try:
        from timm.layers import Conv2dSame
        from timm.layers.padding import pad_same_arg
    except ImportError:  # no timm, no Conv2dSame
        return model
    model = copy.deepcopy(model)
    sizes: dict[nn.Module, tuple[int, int]] = {}
    same = [m for m in model.modules() if isinstance(m, Conv2dSame)]
    if not same:
        return model
    hooks = [m.register_forward_pre_hook(lambda m, args: sizes.__setitem__(m, tuple(args[0].shape[-2:])))
             for m in same]
    with torch.inference_mode():
        model(torch.zeros(1, 3, input_size, input_size))
    for h in hooks:
        h.remove()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv2dSame):
                conv = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride, 0,
                                 child.dilation, child.groups, child.bias is not None)
                conv.load_state_dict(child.state_dict())
                pad = pad_same_arg(sizes[child], child.kernel_size, child.stride, child.dilation)
                setattr(parent, name, nn.Sequential(nn.ZeroPad2d(pad), conv))
    return model.eval()


def params_hash(params: Params) -> str:
    """sha256 of the flattened params: which configuration produced a model."""
    return sha256_json(flatten(params))


def build_metadata(classes: Sequence[str], spec: PreprocessSpec | TextSpec, backbone: str, data_version: str | None,
                   git_commit: str | None, run_id: str | None, params_sha: str, precision: str = "fp32",
                   created: str | None = None, selected: str = "finetuned", adapt_method: str = "none",
                   target_data_version: str | None = None) -> dict[str, str]:
    """The tlops.* metadata_props of an exported model (every value a string)."""
    created = created or dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    text = {onnx_meta.TOKENIZER: spec.tokenizer} if isinstance(spec, TextSpec) else {}
    return {
        onnx_meta.LABELS: json.dumps(list(classes)),
        onnx_meta.PREPROCESS: spec.to_json(),
        onnx_meta.INPUT_SIZE: str(spec.input_size),
        onnx_meta.BACKBONE: backbone,
        onnx_meta.DATA_VERSION: data_version or "",
        onnx_meta.GIT_COMMIT: git_commit or "",
        onnx_meta.MLFLOW_RUN_ID: run_id or "",
        onnx_meta.PARAMS_HASH: params_sha,
        onnx_meta.CREATED: created,
        onnx_meta.PRECISION: precision,
        onnx_meta.INPUT_KIND: onnx_meta.TEXT if text else onnx_meta.IMAGE,
        onnx_meta.SELECTED: selected,
        onnx_meta.ADAPT_METHOD: adapt_method,
        onnx_meta.TARGET_DATA_VERSION: target_data_version or "",
        **text,
    }


def write_metadata(path: str | os.PathLike, meta: dict[str, str]) -> None:
    """Replace the tlops.* metadata_props of the ONNX file at `path` (atomically), keeping other keys."""
    import onnx

    model = onnx.load(str(path))
    kept = [(p.key, p.value) for p in model.metadata_props if not p.key.startswith(onnx_meta.PREFIX)]
    del model.metadata_props[:]
    for key, value in [*kept, *meta.items()]:
        model.metadata_props.add(key=key, value=str(value))
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
        onnx.checker.check_model(str(tmp), full_check=True)


# ---------------------------------------------------------------- parity


def parity(reference: np.ndarray, candidate: np.ndarray, atol: float, top1: bool = True) -> dict[str, Any]:
    """The one parity rule: max |candidate - reference| <= atol * max(1, max |reference|), and with top1 the same
    argmax on every row. Returns the figures; ParityError naming them when the rule fails."""
    if reference.shape != candidate.shape:
        raise ParityError(f"ONNX Runtime output has shape {candidate.shape}, PyTorch's {reference.shape}")
    n = len(reference)
    agree = float((reference.argmax(1) == candidate.argmax(1)).mean()) if n and top1 else 1.0
    diff = float(np.abs(reference.astype(np.float64) - candidate).max()) if n else 0.0
    scale = max(1.0, float(np.abs(reference).max())) if n else 1.0
    stats = {"agreement": agree, "max_abs_diff": diff, "allowed_diff": atol * scale, "n": n, "atol": atol}
    if agree < 1.0 or not diff <= atol * scale:
        raise ParityError(f"ONNX Runtime disagrees with PyTorch on {n} inputs: top-1 agreement {agree:.2%} (must be "
                          f"100%), max |Δ| {diff:.3g} (must be <= export.parity_atol = {atol:g} times "
                          f"max(1, max |output|) = {atol * scale:.3g})")
    return stats


def check_parity(onnx_path: str | os.PathLike, model: nn.Module, batches: Iterable[np.ndarray],
                 atol: float) -> dict[str, Any]:
    """ONNX Runtime (CPU) against PyTorch (CPU) on every batch, under the one parity rule."""
    import torch

    sess, model = runtime.session(onnx_path, cpu_only=True), model.eval().to("cpu")
    ref, got = [], []
    with torch.inference_mode():
        for x in batches:
            ref.append(model(torch.from_numpy(runtime.as_input(x))).float().numpy())
            got.append(runtime.run_batches(sess, [x]))
    if not ref:
        raise ParityError("parity check got no test images: the test split is empty")
    try:
        return parity(np.concatenate(ref), np.concatenate(got), atol)
    except ParityError as e:
        raise ParityError(f"{onnx_path}: {e} (the test split)") from None


def accuracy_of(pred_labels: Sequence[str], true_labels: Sequence[str]) -> float:
    """Share of predictions equal to the true class name (names, so models with other label sets compare)."""
    if not true_labels:
        return math.nan
    return float(np.mean([p == t for p, t in zip(pred_labels, true_labels, strict=True)]))


def score_onnx(path: str | os.PathLike, images: Sequence[str | Path], true_labels: Sequence[str],
               max_pixels: int, metric: str = "accuracy") -> float:
    """`metric` (tlops.scoring) of an ONNX file on labelled images (see onnx_scores)."""
    return onnx_scores(path, images, true_labels, max_pixels, (metric,))[metric]


def onnx_scores(path: str | os.PathLike, images: Sequence[str | Path], true_labels: Sequence[str],
                max_pixels: int, metrics: Sequence[str]) -> dict[str, float]:
    """Each of `metrics` of an ONNX file on labelled images, from one run, with the file's OWN labels and
    preprocessing (from its metadata); a true label the model does not know counts as a miss."""
    meta = onnx_meta.read_metadata(path)
    labels, spec = onnx_meta.labels_of(meta), onnx_meta.spec_of(meta)
    pred = runtime.run_batches(runtime.session(path, cpu_only=True),
                               preprocess_batches(images, spec, max_pixels)).argmax(1)
    known = {name: i for i, name in enumerate(labels)}
    y = np.array([known.get(t, -1) for t in true_labels])  # a label the model does not know: never matched
    return {m: accuracy_of([labels[i] for i in pred], true_labels) if m == "accuracy" else
            scoring.score(m, y, pred, len(labels)) for m in metrics}


def benchmark(path: str | os.PathLike, x: np.ndarray, repeats: int = 20) -> dict[str, float]:
    """Median batch-1 latency (ms) and throughput (images/s) at the batch size of `x`."""
    sess = runtime.session(path, cpu_only=True)
    run = lambda batch: sess.run([onnx_meta.OUTPUT], {onnx_meta.INPUT: batch})  # noqa: E731
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


# ---------------------------------------------------------------- promotion gate (pure)


def decide_promotion(candidate_acc: float, champion_acc: float | None, min_delta: float,
                     metric: str = "accuracy") -> tuple[bool, str]:
    """Promote when there is no champion, or when the candidate is strictly better AND better by >= min_delta.

    "Strictly better" makes min_delta = 0 mean "any improvement": re-exporting an identical model (equal
    accuracy) never moves the alias back and forth. A tiny epsilon absorbs float error in k/n accuracies.
    """
    eps = 1e-9
    if champion_acc is None or math.isnan(champion_acc):
        return True, f"no champion yet: candidate ({metric} {candidate_acc:.4f}) becomes champion"
    delta = candidate_acc - champion_acc
    if delta > eps and delta >= min_delta - eps:
        return True, (f"candidate {metric} {candidate_acc:.4f} beats champion {champion_acc:.4f} by {delta:+.4f} "
                      f"(>= {min_delta:g})")
    need = "any improvement" if min_delta == 0 else f"an improvement of at least {min_delta:g}"
    return False, (f"candidate {metric} {candidate_acc:.4f} vs champion {champion_acc:.4f} ({delta:+.4f}): "
                   f"needs {need}")


# ---------------------------------------------------------------- int8


def quantize_int8(fp32_path: str | os.PathLike, out_path: str | os.PathLike,
                  calibration: Iterable[np.ndarray] | None) -> Path:
    """Static int8 quantization (QDQ, per-channel weights, MinMax) calibrated on the given input batches; without
    calibration (None: text models, whose cost is in MatMuls over activations of every length) dynamic quantization,
    int8 weights and activations quantized per batch as they come.

    The fp32 model's metadata is carried over with tlops.precision = int8.
    """
    if calibration is None:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        meta = {**onnx_meta.read_metadata(fp32_path), onnx_meta.PRECISION: "int8"}
        with atomic_path(out_path) as out:
            # per channel: on WordNet glosses (MiniLM) per-tensor int8 lost 1.1 points of accuracy, per channel 0.2
            quantize_dynamic(str(fp32_path), str(out), weight_type=QuantType.QInt8, per_channel=True)
            write_metadata(out, meta)
            onnx_meta.assert_self_contained(out)
        return Path(out_path)
    import tempfile

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self._batches, None)
            return None if x is None else {onnx_meta.INPUT: np.ascontiguousarray(x, np.float32)}

    meta = {**onnx_meta.read_metadata(fp32_path), onnx_meta.PRECISION: "int8"}
    with tempfile.TemporaryDirectory(prefix="tlops-int8-") as tmp, atomic_path(out_path) as out:
        prepared = Path(tmp) / "prepared.onnx"
        # Shape inference + graph fusion first, so the quantizer sees fused Conv+activation nodes.
        quant_pre_process(str(fp32_path), str(prepared))
        quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        write_metadata(out, meta)
        onnx_meta.assert_self_contained(out)
    return Path(out_path)


def int8_verdict(fp32_acc: float, int8_acc: float, max_drop: float, metric: str = "accuracy") -> tuple[bool, str]:
    """Keep the int8 model only if its `metric` is at most `max_drop` below fp32's."""
    drop = fp32_acc - int8_acc
    said = f"int8 {metric} {int8_acc:.4f} vs fp32 {fp32_acc:.4f} (drop {drop:+.4f}"
    if drop <= max_drop + 1e-9:
        return True, f"{said} <= {max_drop:g}): kept"
    return False, f"{said} > {max_drop:g}): rejected"


# ---------------------------------------------------------------- the stage


Gate = tuple[list[str], list[str], str]  # (images, true class names, the split's name) the promotion gate scores on
# (model file, source val + test images, adapt method, preprocessing, max pixels) -> (drift reference JSON, about);
# given by the stage (tlops.drift.model_reference), so that the stages importing this module do not depend on it
Reference = Callable[[Path, list[str], str, PreprocessSpec, int], tuple[str, dict[str, Any]]]


def export_model(params: Params, run_id: str | None, git_commit: str | None, gate: Gate | None = None,
                 reference: Reference | None = None) -> dict[str, Any]:
    """Export the fine-tuned model to paths.ONNX (+ sha256, model card, int8); return the export report.

    The file is verified (checker, self-contained, parity) under a temp name and only then renamed into
    place, so a model that fails the parity gate never replaces the last good models/model.onnx.
    """
    from tlops.model import load_classifier

    manifest = load_manifest(paths.MANIFEST)
    model, info = load_classifier(paths.ADAPT_DIR)  # the adapt stage's: the selected model, adapted or passed through
    classes = same_classes(manifest.classes, info["classes"])
    spec, ex, max_pixels = spec_from_dict(info["preprocess"]), params.export, params.data.max_pixels
    images, truth = labelled_test_images(manifest)
    adapted = info.get("adapt", {})
    meta = build_metadata(classes, spec, info["backbone"], info.get("data_version"), git_commit, run_id,
                          params_hash(params), selected=info.get("selected", "finetuned"),
                          adapt_method=adapted.get("chosen", "none"),
                          target_data_version=adapted.get("target_data_version"))
    about_reference = None
    example = next(preprocess_batches(images[:2], spec, max_pixels)) if isinstance(spec, TextSpec) else None
    with atomic_path(paths.ONNX) as tmp:
        export_onnx(with_embedding(model), spec.input_size, tmp, ex.opset, (onnx_meta.OUTPUT, onnx_meta.EMBEDDING),
                    example=example)
        parity = check_parity(tmp, model, preprocess_batches(images, spec, max_pixels), ex.parity_atol)
        if reference is not None:
            held_out = [p for p, _ in split_items(manifest, "val")] + images  # unseen by the weights' fitting
            meta[onnx_meta.DRIFT_REFERENCE], about_reference = reference(tmp, held_out, meta[onnx_meta.ADAPT_METHOD],
                                                                         spec, max_pixels)
        write_metadata(tmp, meta)
    sha = onnx_meta.write_sha256(paths.ONNX)
    metric = scoring.policy(params, manifest).metric
    scores = onnx_scores(paths.ONNX, images, truth, max_pixels, ("accuracy", metric))
    accuracy, score = scores["accuracy"], scores[metric]
    calibration = calibration_images(manifest, ex.calibration_images)
    int8 = export_int8(params, spec, score, images, truth, calibration, metric)
    gate_images, gate_truth, gate_split = gate or (images, truth, "source test")
    gate_score = score if gate_split == "source test" else score_onnx(paths.ONNX, gate_images, gate_truth,
                                                                       max_pixels, metric)
    report = {"onnx": str(paths.ONNX), "opset": ex.opset, "sha256": sha, "parity": parity,
              "selected": info.get("selected", "finetuned"), "adapt_method": adapted.get("chosen", "none"),
              "metric": metric, "test_score": score, "test_accuracy": accuracy, "test_images": len(images),
              "gate": {"split": gate_split, "images": len(gate_images), "score": gate_score}, "int8": int8,
              "drift_reference": about_reference}
    metrics = read_json(paths.METRICS) if paths.METRICS.exists() else {}
    write_text(paths.MODEL_CARD, model_card(info, meta, spec, class_counts(manifest), metrics, report))
    return report


def labelled_test_images(manifest: Any) -> tuple[list[str], list[str]]:
    """(image paths, true class names) of the manifest's test split; DataError if it is empty."""
    items = split_items(manifest, "test")
    return [p for p, _ in items], [manifest.classes[c] for _, c in items]


def input_example(onnx_path: str | os.PathLike, image: str | os.PathLike, max_pixels: int) -> np.ndarray:
    """One image preprocessed as the model's metadata says: (1, 3, S, S) float32, for the registry."""
    spec = onnx_meta.spec_of(onnx_meta.read_metadata(onnx_path))
    return load_and_preprocess(image, spec, max_pixels)[None]


def calibration_images(manifest: Any, n: int) -> list[str]:
    """n training images spread evenly over the manifest (sorted by path, so over every class)."""
    rows = manifest.rows_in("train")
    if not rows:
        return []
    idx = np.unique(np.linspace(0, len(rows) - 1, min(n, len(rows))).round().astype(int))
    return [rows[i].path for i in idx]


def class_counts(manifest: Any) -> dict[str, dict[str, int]]:
    """{class: {train: n, val: n, test: n}} of the manifest."""
    counts = {c: {"train": 0, "val": 0, "test": 0} for c in manifest.classes}
    for r in manifest.rows:
        counts[r.label][r.split] += 1
    return counts


def export_int8(params: Params, spec: PreprocessSpec, fp32_acc: float, images: Sequence[str],
                truth: Sequence[str], calibration: Sequence[str], metric: str = "accuracy") -> dict[str, Any]:
    """Quantize paths.ONNX to paths.INT8_ONNX if export.int8; keep it only if its `metric` (fp32's is fp32_acc)
    stays within export.int8_max_drop.

    paths.INT8_DIR always ends up holding quantization.json, which says what happened and why.
    """
    ex, max_pixels = params.export, params.data.max_pixels
    for stale in (paths.INT8_ONNX, onnx_meta.sidecar_path(paths.INT8_ONNX)):
        stale.unlink(missing_ok=True)
    if not ex.int8:
        result = {"enabled": False, "kept": False, "reason": "export.int8 is false"}
    elif not calibration:
        result = {"enabled": True, "kept": False, "reason": "no training images to calibrate on"}
    else:
        text = isinstance(spec, TextSpec)
        quantize_int8(paths.ONNX, paths.INT8_ONNX,
                      None if text else preprocess_batches(calibration, spec, max_pixels, batch=16))
        int8_acc = score_onnx(paths.INT8_ONNX, images, truth, max_pixels, metric)
        keep, reason = int8_verdict(fp32_acc, int8_acc, ex.int8_max_drop, metric)
        x = next(preprocess_batches(images[:32], spec, max_pixels, batch=32))
        how = {"format": "dynamic", "per_channel": True} if text else {
            "format": "QDQ", "per_channel": True, "calibration_images": len(calibration)}
        result = {"enabled": True, "kept": keep, "reason": reason, **how, "metric": metric, "fp32_score": fp32_acc,
                  "int8_score": int8_acc, "drop": fp32_acc - int8_acc, "max_drop": ex.int8_max_drop,
                  "speed": {"fp32": benchmark(paths.ONNX, x), "int8": benchmark(paths.INT8_ONNX, x)}}
        if keep:
            result["sha256"] = onnx_meta.write_sha256(paths.INT8_ONNX)
            result["path"] = str(paths.INT8_ONNX)
        else:
            paths.INT8_ONNX.unlink()
    write_json(paths.INT8_DIR / "quantization.json", result)
    return result


def promotion(params: Params, candidate_version: str, candidate_score: float, candidate_path: str | os.PathLike,
              champion_path: str | os.PathLike | None, champion_version: str | None,
              metric: str = "accuracy", gate: Gate | None = None) -> dict[str, Any]:
    """Score the champion (if any) by `metric` on the gate's split (default: the source test split) exactly like the
    candidate was, and decide.

    A champion of another task (other labels, or another kind of input) is no rival: it is not scored, the
    candidate is not promoted over it, and the reason says so.
    """
    min_delta = params.evaluate.promote_min_delta
    images, truth, split = gate or (*labelled_test_images(load_manifest(paths.MANIFEST)), "source test")
    decision = {"metric": metric, "min_delta": min_delta, "candidate_version": candidate_version,
                "candidate_score": candidate_score, "champion_version": champion_version,
                "champion_score": None, "comparable": True, "split": split}
    if champion_path is not None:
        mine, theirs = (onnx_meta.task_of(onnx_meta.read_metadata(p)) for p in (candidate_path, champion_path))
        if mine != theirs:
            reason = (f"not compared: champion v{champion_version} is a model of another task "
                      f"({onnx_meta.describe_task(theirs)}) than the candidate ({onnx_meta.describe_task(mine)}); the "
                      f"champion stays. Give this task its own export.registered_model (now "
                      f"{params.export.registered_model!r}) to track its champion")
            return {**decision, "promoted": False, "comparable": False, "reason": reason,
                    "champion_after": champion_version}
        decision["champion_score"] = score_onnx(champion_path, images, truth, params.data.max_pixels, metric)
    promote, reason = decide_promotion(candidate_score, decision["champion_score"], min_delta, metric)
    reason = f"{reason} (on the {split} split, {len(images)} images)"
    return {**decision, "promoted": promote, "reason": reason,
            "champion_after": candidate_version if promote else champion_version}


def flat_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The export report's numbers for tracking: parity, ONNX accuracy, int8 accuracy and speed, promotion."""
    int8, promo = report.get("int8", {}), report.get("promotion", {})
    out = {"parity.agreement": report["parity"]["agreement"], "parity.max_abs_diff": report["parity"]["max_abs_diff"],
           "onnx.test_accuracy": report["test_accuracy"], f"onnx.test_{report['metric']}": report["test_score"]}
    for key in ("int8_score", "drop"):
        if key in int8:
            out[f"int8.{key}"] = int8[key]
    for precision, speed in int8.get("speed", {}).items():
        out[f"{precision}.latency_ms"] = speed["latency_ms"]
        out[f"{precision}.throughput_ips"] = speed["throughput_ips"]
    if "promoted" in promo:
        out["promotion.promoted"] = float(promo["promoted"])
        if promo.get("champion_score") is not None:
            out["promotion.champion_score"] = promo["champion_score"]
    return {k: float(v) for k, v in out.items()}


# ---------------------------------------------------------------- model card (pure)

_CARD_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "top5_accuracy", "ece", "loss")


def model_card(info: dict, meta: dict[str, str], spec: PreprocessSpec, counts: dict[str, dict[str, int]],
               metrics: dict[str, Any], report: dict[str, Any]) -> str:
    """models/model_card.md: what the model is, what data made it, how good it is, how to feed it, its limits."""
    head, ft = metrics.get("head", {}), metrics.get("finetuned", {})
    rows = [f"| {k} | {_fmt(head.get(k))} | {_fmt(ft.get(k))} |" for k in _CARD_METRICS if k in head or k in ft]
    count_rows = [f"| {c} | {n['train']} | {n['val']} | {n['test']} |" for c, n in counts.items()]
    int8 = report.get("int8", {})
    parity = report["parity"]
    selected, selection = info.get("selected", "finetuned"), info.get("selection", {})
    chose = (f"the {'fine-tuned' if selected == 'finetuned' else 'head-only (frozen backbone)'} model: validation "
             f"{selection.get('metric', 'accuracy')} {_fmt(selection.get(selected, {}).get('val_metric'))} against "
             f"{_fmt(selection.get('head' if selected == 'finetuned' else 'finetuned', {}).get('val_metric'))}"
             if selection else "the fine-tuned model")
    return "\n".join([
        f"# Model card: {info['backbone']}, {len(counts)} classes",
        "",
        f"- exported: {chose}",
        f"- ONNX file: `{report['onnx']}` (opset {report['opset']}, sha256 `{report['sha256']}`)",
        f"- backbone: {info['backbone']} (initial weights: {info.get('weights_id', 'unknown')})",
        f"- data version: `{meta[onnx_meta.DATA_VERSION]}` (DVC hash of data/raw)",
        f"- git commit: `{meta[onnx_meta.GIT_COMMIT] or 'unknown'}`; MLflow run: `{meta[onnx_meta.MLFLOW_RUN_ID]}`;"
        f" params hash: `{meta[onnx_meta.PARAMS_HASH][:12]}`",
        f"- created: {meta[onnx_meta.CREATED]}",
        "",
        "## Data", "", "| class | train | val | test |", "|---|---:|---:|---:|", *count_rows, "",
        f"## Test metrics ({metrics.get('test_images', report['test_images'])} images)", "",
        "| metric | head only (frozen backbone) | fine-tuned |", "|---|---:|---:|", *rows, "",
        f"Selection, early stopping and promotion go by {report.get('metric', 'accuracy')}.",
        f"ONNX Runtime matches PyTorch on all {parity['n']} test images (top-1 agreement "
        f"{parity['agreement']:.0%}, max |Δlogit| {parity['max_abs_diff']:.2g}); ONNX test accuracy "
        f"{report['test_accuracy']:.4f}.",
        f"int8: {int8.get('reason', 'not attempted')}.",
        "",
        "## Preprocessing", "",
        *_card_preprocessing(spec),
        "",
        "## Intended use", "",
        f"Classifying {'texts' if isinstance(spec, TextSpec) else 'images'} into the {len(counts)} classes above, of "
        "the same kind as the training data (same source, style and length). Not for other classes: the model always "
        "answers one of these.",
        "",
        "## Limits", "",
        "- Scores come from one held-out test split of the same source; expect lower accuracy on images that "
        "look different (other cameras, backgrounds, resolutions).",
        "- Confidences are not calibrated beyond what the ECE above shows; do not read them as probabilities "
        "of being right without checking.",
        "- No out-of-distribution detection: an image of none of these classes still gets one of them.",
        "- Small classes (see the counts) have the least reliable per-class scores.",
        "",
    ])


def _card_preprocessing(spec: PreprocessSpec | TextSpec) -> list[str]:
    if isinstance(spec, TextSpec):
        return [f"Unicode NFC, whitespace runs to one space, cut to {spec.max_chars} characters; tokenised by the "
                f"tokenizer stored in `{onnx_meta.TOKENIZER}` (sha256 `{spec.tokenizer_sha256[:12]}`), at most "
                f"{spec.max_tokens} tokens; padded with id {spec.pad_id} to the batch's longest text; int64 input "
                f"`{onnx_meta.INPUT}` (batch, sequence), output `{onnx_meta.OUTPUT}` (logits).",
                "The spec, the tokenizer and the labels are stored in the file's metadata (`tlops.preprocess`, "
                "`tlops.tokenizer`, `tlops.labels`): the file alone serves."]
    return [f"RGB; resize the shorter side to {spec.resize_size} px ({spec.interpolation}), centre-crop "
            f"{spec.input_size}x{spec.input_size}; scale to [0, 1]; normalise with mean {list(spec.mean)} and std "
            f"{list(spec.std)}; NCHW float32, input `{onnx_meta.INPUT}`, output `{onnx_meta.OUTPUT}` (logits).",
            "The spec and the labels are stored in the file's metadata (`tlops.preprocess`, `tlops.labels`)."]


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) else "-"
