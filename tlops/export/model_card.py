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
        *_card_audit(report.get("label_audit")),
        f"## Test metrics ({metrics.get('test_images', report['test_images'])} images)", "",
        "| metric | head only (frozen backbone) | fine-tuned |", "|---|---:|---:|", *rows, "",
        f"Selection, early stopping and promotion go by {report.get('metric', 'accuracy')}.",
        f"ONNX Runtime matches PyTorch on all {parity['n']} test images (top-1 agreement "
        f"{parity['agreement']:.0%}, max |Δlogit| {parity['max_abs_diff']:.2g}); ONNX test accuracy "
        f"{report['test_accuracy']:.4f}.",
        f"int8: {int8.get('reason', 'not attempted')}.",
        "",
        *_card_trust(report, isinstance(spec, TextSpec)),
        "## Preprocessing", "",
        *_card_preprocessing(spec),
        "",
        "## Intended use", "",
        f"Classifying {'texts' if isinstance(spec, TextSpec) else 'images'} into the {len(counts)} classes above, of "
        "the same kind as the training data (same source, style and length). Not for other classes: an input of none "
        "of them still gets the closest one, with `unknown` set when its OOD score is above the threshold.",
        "",
        "## Limits", "",
        "- Scores come from one held-out test split of the same source; expect lower accuracy on images that "
        "look different (other cameras, backgrounds, resolutions).",
        "- Calibration is fitted on the validation split of the same source: on shifted inputs the probabilities "
        "drift from the truth again (the service's drift monitor watches for that).",
        "- The OOD score flags inputs unlike the training data as a whole; it does not catch an input of a known "
        "kind given the wrong class, and about 5% of in-distribution inputs are flagged by construction.",
        "- Small classes (see the counts) have the least reliable per-class scores.",
        "",
    ])


def _card_audit(audit: dict[str, Any] | None) -> list[str]:
    """The label audit's counts (reports/label_audit.json), when the pipeline ran it."""
    if not audit:
        return []
    if audit.get("mode") == "off":
        return ["Label audit: off (data.label_issues: off).", ""]
    flagged = audit["flagged"]
    dropped = (f"; {audit['dropped']} of them were left out of training (data.label_issues: drop)"
               if audit.get("dropped") else "; all were kept (data.label_issues: report)")
    return [f"Label audit ({audit['folds']}-fold out-of-fold head probabilities, confident learning): "
            f"{flagged['train']} of {audit['train_items']} training items flagged as possibly mislabelled{dropped}; "
            f"{flagged['val']} validation and {flagged['test']} test items reported. The list: "
            "`reports/label_issues.csv`.", ""]


def _card_trust(report: dict[str, Any], text: bool) -> list[str]:
    """Calibration, "none of these" and explanations: what the served outputs mean and how far to trust them."""
    cal, ood, why = report.get("calibration") or {}, report.get("ood") or {}, report.get("explanation") or {}
    test = cal.get("test", {})
    before, after = test.get("before", {}), test.get("after", {})
    lines = ["## Calibration", "",
             f"The logits are divided by T = {cal.get('temperature', 1.0):.3f} inside the file "
             f"(`{metadata.TEMPERATURE}`): softmax of the `{metadata.OUTPUT}` output is the calibrated probability; "
             f"the predicted class is the same as without it. {cal.get('reason', '')}.",
             "", "| test split | ECE (15 bins) | class-wise ECE |", "|---|---:|---:|",
             f"| before | {_fmt(before.get('ece'))} | {_fmt(before.get('classwise_ece'))} |",
             f"| after | {_fmt(after.get('ece'))} | {_fmt(after.get('classwise_ece'))} |", "",
             "## None of these", "",
             f"Output `{metadata.OOD_SCORE}`: the squared Mahalanobis distance of the normalised embedding to the "
             "nearest class mean (training split). Above the threshold "
             f"{_fmt(ood.get('threshold'))} (`{metadata.OOD}`; the validation split's {ood.get('tpr', 0.95):.0%} "
             f"true-positive rate) the input is `unknown`: {_pct(ood.get('test_flagged'))} of the test split is "
             f"flagged (the false-flag rate); AUROC against {ood.get('far_out') or 'a far-out set'}: "
             f"{_fmt(ood.get('auroc'))}.", "",
             "## Explanations", ""]
    if why.get("kind") == "image":
        lines.append(f"Output `{metadata.EXPLANATION}` (batch, classes, h, w): for each class, each region's share of "
                     "its logit (a class activation map, exact for the linear head: the map's sum plus bias / T is the "
                     "logit). Bright regions pushed the class up, dark ones down; the map is coarse (the last feature "
                     "map's grid), upsample it over the image to read it. Each cell sees most of the image, so a grid "
                     "of a few cells a side (3x3 at 96 px) does not locate a small object; a larger model.image_size "
                     "gives a finer grid.")
    elif why.get("kind") == "text":
        lines.append(f"Output `{metadata.EXPLANATION}` (batch, classes, tokens): for each class, each token's share of "
                     "its logit (exact for the linear head: the shares plus bias / T sum to the logit; padding 0). "
                     "A large positive share is a token that decided the class; special tokens carry shares too.")
    else:
        lines.append(f"No explanation output: {why.get('why', 'not measured')}.")
    lines.append("")
    return lines


def _pct(v: Any) -> str:
    return f"{v:.1%}" if isinstance(v, (int, float)) else "-"


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
