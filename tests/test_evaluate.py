"""tlops.evaluate: metrics, calibration, history merging, plots; the evaluate stage on a tiny trained workspace."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import make_images
from PIL import Image

from tlops.evaluate import metrics, plots
from tlops.inputs.images import PreprocessSpec, load_image
from tlops.onnx.runtime import softmax
from tlops.training.epochs import merge_history

CLASSES7 = [f"c{i}" for i in range(7)]


def one_hot_logits(pred: np.ndarray, classes: int, scale: float = 10.0) -> np.ndarray:
    return np.eye(classes, dtype=np.float32)[pred] * scale


def test_metrics_have_every_key_and_per_class_entry():
    rng = np.random.default_rng(0)
    logits, y = rng.normal(size=(50, 7)).astype(np.float32), rng.integers(0, 7, 50)
    m = metrics.compute_metrics(logits, y, CLASSES7)
    assert set(m) == {"accuracy", "balanced_accuracy", "macro_f1", "top5_accuracy", "ece", "loss", "per_class"}
    assert set(m["per_class"]) == set(CLASSES7)
    assert set(m["per_class"]["c0"]) == {"precision", "recall", "f1", "support"}
    assert sum(v["support"] for v in m["per_class"].values()) == 50
    assert m["accuracy"] == pytest.approx(float((logits.argmax(1) == y).mean()))
    assert m["top5_accuracy"] >= m["accuracy"]
    json.dumps(m)  # plain JSON types only


def test_top5_only_with_more_than_five_classes():
    y = np.array([0, 1, 2, 0, 1])
    m = metrics.compute_metrics(one_hot_logits(y, 5), y, ["a", "b", "c", "d", "e"])
    assert "top5_accuracy" not in m
    assert m["accuracy"] == 1.0 and m["macro_f1"] == pytest.approx(1.0 * 3 / 5)  # d, e absent: f1 0


def test_loss_is_cross_entropy():
    logits = np.array([[2.0, 0.0], [0.0, 1.0]], np.float32)
    y = np.array([0, 0])
    expected = -np.mean([np.log(np.exp(2) / (np.exp(2) + 1)), np.log(1 / (1 + np.e))])
    assert metrics.compute_metrics(logits, y, ["a", "b"])["loss"] == pytest.approx(expected, rel=1e-6)


def test_ece_is_zero_when_confidence_matches_accuracy_and_large_when_overconfident():
    y = np.arange(100) % 4
    assert metrics.expected_calibration_error(np.eye(4)[y], y) == pytest.approx(0.0)
    wrong = (y + 1) % 4
    half = np.where(np.arange(100) < 50, y, wrong)
    assert metrics.expected_calibration_error(np.eye(4)[half], y) == pytest.approx(0.5)
    # 60% confident, 60% right: calibrated
    probs = np.full((100, 2), 0.4)
    pred = np.where(np.arange(100) < 60, 0, 1)
    probs[np.arange(100), pred] = 0.6
    assert metrics.expected_calibration_error(probs, np.zeros(100, int)) == pytest.approx(0.0, abs=1e-9)


def test_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="do not match"):
        metrics.compute_metrics(np.zeros((3, 2)), np.zeros(4, int), ["a", "b"])


def test_worst_indices_are_the_most_confidently_wrong():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.99, 0.01], [0.3, 0.7]])
    y = np.array([1, 0, 0, 0, 1])  # wrong: 0 (0.9), 1 (0.8), 2 (0.6)
    assert metrics.worst_indices(probs, y, 2) == [0, 1]
    assert metrics.worst_indices(probs, y, 10) == [0, 1, 2]


def test_gain_is_finetuned_minus_head_for_scalars():
    g = metrics.gain({"accuracy": 0.5, "loss": 1.0, "per_class": {}}, {"accuracy": 0.75, "loss": 0.5, "per_class": {}})
    assert g == {"accuracy": 0.25, "loss": -0.5}


def history(epochs, phase):
    return [{"epoch": str(e), "phase": phase, "train_loss": "1.0", "train_accuracy": "0.5", "val_loss": "1.1",
             "val_accuracy": "0.4", "lr": "0.01"} for e in epochs]


def test_merge_history_puts_both_phases_on_one_axis_and_marks_the_unfreeze_point():
    rows, unfreeze = merge_history(history([1, 2, 3], "head"), history([4, 5], "finetune"))
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]
    assert unfreeze == 3.5
    rows, unfreeze = merge_history(history([1, 2, 3], "head"), history([1, 2], "finetune"))  # restarted count
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5] and unfreeze == 3.5


def test_plots_are_written_as_png(tmp_path):
    images = make_images(tmp_path / "img", classes=3, per_class=3)
    y = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    pred = np.array([0, 1, 0, 1, 1, 2, 2, 2, 0])
    plots.plot_confusion(y, pred, ["a", "b", "c"], tmp_path / "p" / "confusion.png")
    rows, unfreeze = merge_history(history([1, 2], "head"), history([3, 4], "finetune"))
    plots.plot_curves(rows, unfreeze, tmp_path / "p" / "curves.png")
    probs = softmax(one_hot_logits(pred, 3, 2.0))
    worst = [plots.Mistake(str(images[i]), "abc"[y[i]], "abc"[pred[i]], float(probs[i].max()))
             for i in metrics.worst_indices(probs, y, 4)]
    assert len(worst) == 3
    plots.plot_worst(worst, PreprocessSpec(32, "bilinear"), lambda p: load_image(p, 10**7), tmp_path / "p" / "worst.png")
    plots.plot_worst([], PreprocessSpec(32), lambda p: load_image(p, 10**7), tmp_path / "p" / "none.png")
    for name in ("confusion", "curves", "worst", "none"):
        with Image.open(tmp_path / "p" / f"{name}.png") as img:
            assert img.format == "PNG" and img.width > 100


def test_confusion_rows_name_classes():
    rows = metrics.confusion_rows(np.array([0, 1]), np.array([1, 1]), ["cat", "dog"])
    assert rows == [{"actual": "cat", "predicted": "dog"}, {"actual": "dog", "predicted": "dog"}]
# ---------------------------------------------------------------- the stage


def test_evaluate_stage_writes_metrics_plots_and_dvc_renders_the_confusion_matrix(trained, capsys):
    from conftest import run_cmd

    from tasks.evaluate import evaluate
    from tlops.core import paths

    summary = evaluate.fn()
    report = json.loads(paths.METRICS.read_text())
    assert set(report) >= {"head", "finetuned", "finetune_gain", "test_images", "data_version"}
    for model in ("head", "finetuned"):
        assert {"accuracy", "macro_f1", "ece", "loss", "per_class"} <= set(report[model])
    assert report["finetune_gain"]["accuracy"] == pytest.approx(
        report["finetuned"]["accuracy"] - report["head"]["accuracy"])
    assert summary["test_images"] == report["test_images"] > 0
    with open(paths.CONFUSION, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == report["test_images"] and set(rows[0]) == {"actual", "predicted"}
    with open(paths.HISTORY, newline="") as f:
        hist = list(csv.DictReader(f))
    assert {r["phase"] for r in hist} >= {"head"} and len({r["epoch"] for r in hist}) == len(hist)
    for name in ("confusion.png", "curves.png", "worst.png"):
        assert (paths.PLOTS_DIR / name).stat().st_size > 1000
    out = capsys.readouterr().out
    assert "head only" in out and "fine-tuned" in out
    # the exported model's class for each validation image, by its hash (what `tlops tune` compares a trial with the
    # defaults by): scored, they give the selection's own validation metric
    from tlops.data.manifest import load_manifest

    with np.load(paths.VAL_PREDICTIONS) as p:
        assert list(p["sha256"]) == [r.sha256 for r in load_manifest(paths.MANIFEST).rows_in("val")]
        assert report["metric"] == "accuracy" and float((p["predicted"] == p["label"]).mean()) == pytest.approx(
            report["selection"][report["selected"]]["val_metric"])

    run_cmd(["dvc", "plots", "show", "-o", "dvc_plots"], trained)
    html = (trained / "dvc_plots" / "index.html").read_text()
    assert "Confusion matrix" in html and '"actual": "class_0"' in html  # the vega confusion template, with data
    assert "Learning curves" in html
