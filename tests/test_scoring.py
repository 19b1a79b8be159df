"""tlops.scoring: the selection metric and the imbalance policy."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score

from tlops.evaluate import scoring


def test_metrics_agree_with_scikit_learn():
    rng = np.random.default_rng(0)
    y, pred = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    assert scoring.score("accuracy", y, pred, 4) == pytest.approx((y == pred).mean())
    assert scoring.score("balanced_accuracy", y, pred, 4) == pytest.approx(balanced_accuracy_score(y, pred))
    assert scoring.score("macro_f1", y, pred, 4) == pytest.approx(f1_score(y, pred, average="macro",
                                                                           labels=range(4), zero_division=0))


def test_balanced_accuracy_sees_a_class_that_accuracy_does_not():
    y = np.array([0] * 95 + [1] * 5)
    never_one = np.zeros(100, dtype=int)
    assert scoring.score("accuracy", y, never_one, 2) == 0.95
    assert scoring.score("balanced_accuracy", y, never_one, 2) == 0.5


def test_class_weights_make_every_present_class_count_the_same():
    w = scoring.class_weights(np.array([90, 10, 0]))
    assert w[2] == 0 and (w * [90, 10, 0]).sum() / 100 == pytest.approx(1.0)  # the mean weight of a sample is 1
    assert w[0] * 90 == pytest.approx(w[1] * 10)


class _Manifest:
    def __init__(self, labels, classes=None):
        self._rows = [type("Row", (), {"label": lab})() for lab in labels]
        self.classes = classes or sorted(set(labels))

    def rows_in(self, split):
        return self._rows


class _Params:
    def __init__(self, metric, threshold=3.0):
        self.data = type("D", (), {"imbalance_ratio": threshold})()
        self.evaluate = type("E", (), {"metric": metric})()


def test_auto_is_balanced_accuracy_past_the_imbalance_ratio_and_accuracy_below():
    def policy(params: _Params, manifest: _Manifest) -> scoring.Policy:
        return scoring.policy(params, scoring.train_labels(manifest), manifest.classes)

    imbalanced = _Manifest(["a"] * 100 + ["b"] * 12)
    balanced = _Manifest(["a"] * 100 + ["b"] * 90)
    assert policy(_Params("auto"), imbalanced).metric == "balanced_accuracy"
    assert policy(_Params("auto"), imbalanced).imbalanced
    assert policy(_Params("auto"), balanced).metric == "accuracy"
    assert policy(_Params("macro_f1"), imbalanced).metric == "macro_f1"
    assert policy(_Params("auto", threshold=10.0), imbalanced).metric == "accuracy"
    empty_class = _Manifest(["a"] * 10 + ["b"] * 10, classes=["a", "b", "c"])  # c has no training image
    assert policy(_Params("auto"), empty_class).ratio == float("inf")
