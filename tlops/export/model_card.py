"""The model card: what the model is, what it was trained on, how well it does and how to use it."""

from __future__ import annotations

from typing import Any

from tlops.inputs.images import PreprocessSpec
from tlops.inputs.text import TextSpec
from tlops.onnx import metadata

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
        f"- data version: `{meta[metadata.DATA_VERSION]}` (DVC hash of data/raw)",
        f"- git commit: `{meta[metadata.GIT_COMMIT] or 'unknown'}`; MLflow run: `{meta[metadata.MLFLOW_RUN_ID]}`;"
        f" params hash: `{meta[metadata.PARAMS_HASH][:12]}`",
        f"- created: {meta[metadata.CREATED]}",
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
                f"tokenizer stored in `{metadata.TOKENIZER}` (sha256 `{spec.tokenizer_sha256[:12]}`), at most "
                f"{spec.max_tokens} tokens; padded with id {spec.pad_id} to the batch's longest text; int64 input "
                f"`{metadata.INPUT}` (batch, sequence), output `{metadata.OUTPUT}` (logits).",
                "The spec, the tokenizer and the labels are stored in the file's metadata (`tlops.preprocess`, "
                "`tlops.tokenizer`, `tlops.labels`): the file alone serves."]
    return [f"RGB; resize the shorter side to {spec.resize_size} px ({spec.interpolation}), centre-crop "
            f"{spec.input_size}x{spec.input_size}; scale to [0, 1]; normalise with mean {list(spec.mean)} and std "
            f"{list(spec.std)}; NCHW float32, input `{metadata.INPUT}`, output `{metadata.OUTPUT}` (logits).",
            "The spec and the labels are stored in the file's metadata (`tlops.preprocess`, `tlops.labels`)."]


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) else "-"
