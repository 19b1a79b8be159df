"""The label audit: which training labels look wrong, found from the cached features before they teach the model.

A linear head is fitted K times (audit.folds; stratified, seeded folds of the training items, train_head's class
weighting) on the standardised cached features, each training item one row: the mean of its cached views, a third
of the rows train_head sees with two augmented views. All K are fitted at once by one full-batch L-BFGS rather
than train_head's AdamW epochs, in numpy (importing torch alone took 1.6 s): the same model in a fraction of the
time, since the audit may cost a tenth of the features stage. Each fit predicts the fold it did not see, as the
mean over an item's cached views, so every training item gets an out-of-fold probability without the backbone
ever running again. Confident learning (cleanlab.filter.find_label_issues) flags the items whose given label those
probabilities contradict, ranked by self-confidence: the out-of-fold probability of the given label, the ranking
cleanlab's benchmarks found best overall and one a person reads at once ("the heads give this label 3%").
Validation and test items are scored by the K heads' mean and only reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# cleanlab brings scikit-learn, scipy and pandas (1.1 s): imported with the module, as the features stage imports torch,
# so that `tlops run` pays it while its Prefect server starts (it preloads the stage modules), not in the stage's run
from cleanlab.filter import find_label_issues
from scipy.optimize import minimize
from sklearn.model_selection import StratifiedKFold
from threadpoolctl import threadpool_limits

from tlops.core import paths
from tlops.core.config import Params
from tlops.core.errors import DataError
from tlops.core.io import write_json, write_text
from tlops.data.label_issues import COLUMNS
from tlops.evaluate.plots import Mistake, plot_worst, plot_worst_texts, worst_texts_markdown, write_csv
from tlops.evaluate.scoring import class_weights, policy
from tlops.features.dataset import FeatureDataset
from tlops.onnx.runtime import softmax

RANK_BY = "self_confidence"
FILTER_BY = "both"  # flagged by both of cleanlab's prunings (per class, and by the noise rate of each class pair):
# on digits with 5% of the labels flipped (three seeds) precision 0.81-0.82, recall 0.76-0.90; per class alone
# 0.73-0.77 / 0.89-0.94: the head-only features classify digits at 0.94, so the heads' own errors get flagged too
SHOWN = 16  # suspects in the grid and the table (all are in the CSV)


@dataclass(frozen=True)
class Suspect:
    path: str
    split: str
    given: str
    suggested: str
    score: float  # the given label's out-of-fold probability: low is suspicious


def out_of_fold(ds: FeatureDataset, params: Params) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(training item indices into ds, their out-of-fold probabilities, the K heads' mean probabilities of every
    item (view 0) of ds, K). Each head learns from its folds' training items, each the mean of its views (on digits
    with 5% flipped: precision 0.81, recall 0.82; every view a row, three times the rows: 0.83, 0.81), and predicts
    an item as the mean of its views' probabilities (test-time augmentation from the cached views)."""
    views0 = ds.views == 0
    train = np.flatnonzero((ds.splits == "train") & views0)
    y = ds.labels[train]
    k = folds_for(y, len(ds.classes), params.audit.folds)
    selection = policy(params, ds.image_labels("train"), ds.classes)
    weighted = selection.weighted(params.head.class_weighting)
    starts = np.flatnonzero(views0)  # each item's view-0 row; its views follow it
    item_of_row = np.searchsorted(starts, np.arange(len(ds.views)), side="right") - 1  # row -> item number
    mine = np.searchsorted(starts, train)  # the training items' numbers
    fold_of_item = np.full(len(starts), -1)
    for f, (_, held) in enumerate(StratifiedKFold(n_splits=k, shuffle=True, random_state=params.head.seed)
                                  .split(train, y)):
        fold_of_item[mine[held]] = f
    X = np.asarray(ds.features, np.float32)
    seen = X[fold_of_item[item_of_row] >= 0]  # every view of every training item
    mu, sd = seen.mean(0), seen.std(0) + 1e-6  # standardised: one L2 for every backbone
    del seen
    W, b = fit_linear_folds((_item_means(X, starts)[mine] - mu) / sd, y, fold_of_item[mine], k, len(ds.classes),
                            params.audit.l2, weighted)
    d, c = W.shape[0], W.shape[2]
    W = W / sd[:, None, None]  # the standardisation folded into the heads: no standardised copy of every row
    b = b - np.tensordot(mu, W, axes=1)
    probs = softmax((X @ W.reshape(d, k * c)).reshape(len(X), k, c).transpose(1, 0, 2) + b[:, None])
    per_item = _item_means(probs, starts)  # (K, items, C): the mean over each item's views
    oof = per_item[fold_of_item[mine], mine]
    return train, oof, per_item.mean(axis=0)[item_of_row], k


def fit_linear_folds(X: np.ndarray, y: np.ndarray, fold: np.ndarray, k: int, classes: int, l2: float,
                     weighted: bool, iterations: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """K linear heads (W: D x K x C, b: K x C), head f fitted on the rows whose fold is not f, each to the
    class-weighted cross-entropy of its rows + l2 * |W_f|^2: the fit that train_head's AdamW epochs approach.

    The K objectives are independent, so their sum is minimised at once by one L-BFGS (scipy's): each step is one
    matrix product of the rows with all K heads instead of K thin ones. Stopped at 40 steps, short of the optimum
    as train_head's early stopping is: with 5% flipped, digits precision / recall 0.82 / 0.82 (0.81 / 0.82 at 60 to
    150 steps), Fashion-MNIST 0.35 / 0.90 (0.34 / 0.90 at 100), WordNet 0.34 / 0.91 (0.34 / 0.90); the Fashion-MNIST
    fit takes 0.8 s against 2.0 s. One BLAS thread: L-BFGS's small steps between the products leave a second one
    spinning (Fashion-MNIST, measured on a 256-wide projection of every view: 1.7 s against 3.4 s with two)."""
    n, d = X.shape
    share = np.zeros((n, k), np.float32)  # row r's weight in head f's mean loss; 0 in its own fold
    for f in range(k):
        mine = fold != f
        w = (class_weights(np.bincount(y[mine], minlength=classes)) if weighted else np.ones(classes))[y[mine]]
        share[mine, f] = w / w.sum()
    rows = np.arange(n)

    def loss_and_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        W = theta[:d * k * classes].astype(np.float32).reshape(d, k * classes)
        z = (X @ W).reshape(n, k, classes) + theta[d * k * classes:].astype(np.float32).reshape(k, classes)
        z -= z.max(2, keepdims=True)
        e = np.exp(z)
        total = e.sum(2)
        loss = float((share * (np.log(total) - z[rows, :, y])).sum(dtype=np.float64)) + l2 * float((W * W).sum())
        g = e / total[..., None]
        g[rows, :, y] -= 1.0
        g *= share[..., None]  # d loss / d z
        g = g.reshape(n, k * classes)
        return loss, np.concatenate([(X.T @ g + 2 * l2 * W).ravel(), g.sum(0)]).astype(np.float64)

    with threadpool_limits(limits=1, user_api="blas"):
        theta = minimize(loss_and_grad, np.zeros(d * k * classes + k * classes), jac=True, method="L-BFGS-B",
                         options={"maxiter": iterations}).x
    return (theta[:d * k * classes].astype(np.float32).reshape(d, k, classes),
            theta[d * k * classes:].astype(np.float32).reshape(k, classes))


def _item_means(a: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """a (..., N rows, F) -> (..., items, F): the mean over each item's rows, the item starting at row starts[i]
    (an item's views follow it, so its rows are contiguous); a's dtype kept."""
    counts = np.diff(np.r_[starts, a.shape[-2]]).astype(a.dtype)[:, None]
    return np.add.reduceat(a, starts, axis=-2) / counts


def folds_for(y: np.ndarray, classes: int, wanted: int) -> int:
    """audit.folds, or fewer when a class has fewer training items than that (each fold must see every class);
    DataError when a class has a single training item: nothing can say whether its label is right."""
    counts = np.bincount(y, minlength=classes)
    smallest = int(counts[counts > 0].min()) if (counts > 0).any() else 0
    if smallest < 2:
        raise DataError("the label audit needs at least 2 training items in every class, one has "
                        f"{smallest}; add items or set data.label_issues: off")
    return min(wanted, smallest)


def find_suspects(ds: FeatureDataset, params: Params) -> tuple[list[Suspect], dict[str, Any]]:
    """The flagged items, most suspicious first (training items by confident learning; validation and test items
    where the mean head disagrees as confidently), and the audit's summary."""
    train, oof, mean, k = out_of_fold(ds, params)
    y = ds.labels[train]
    # n_jobs=1: cleanlab's process pool forks a process that already runs torch's and Prefect's threads (it hung)
    ranked = find_label_issues(labels=y, pred_probs=oof, filter_by=FILTER_BY, return_indices_ranked_by=RANK_BY,
                               n_jobs=1)
    suspects = [Suspect(str(ds.paths[train[i]]), "train", ds.classes[y[i]], ds.classes[int(oof[i].argmax())],
                        float(oof[i, y[i]])) for i in ranked]
    # held-out splits: flagged when the given label's probability is below the training flags' largest score
    cut = max((s.score for s in suspects), default=0.0)
    for split in ("val", "test"):
        rows = np.flatnonzero((ds.splits == split) & (ds.views == 0))
        p_given = mean[rows, ds.labels[rows]]
        for i in rows[np.argsort(p_given, kind="stable")]:
            if mean[i, ds.labels[i]] >= cut or mean[i].argmax() == ds.labels[i]:
                continue
            suspects.append(Suspect(str(ds.paths[i]), split, ds.classes[ds.labels[i]],
                                    ds.classes[int(mean[i].argmax())], float(mean[i, ds.labels[i]])))
    oof_accuracy = float((oof.argmax(1) == y).mean()) if len(y) else float("nan")
    summary = {"folds": k, "rank_by": RANK_BY, "filter_by": FILTER_BY,
               "train_items": len(train), "out_of_fold_accuracy": oof_accuracy,
               "flagged": {s: sum(x.split == s for x in suspects) for s in ("train", "val", "test")}}
    return suspects, summary


def write_audit(suspects: Sequence[Suspect], summary: dict[str, Any], mode: str, spec: Any, load: Any,
                max_chars: int) -> dict[str, Any]:
    """reports/label_issues.csv (rank, path, split, given, suggested, score, dropped), reports/label_audit.json and
    the top suspects (reports/label_issues/grid.png, suspects.md): images as the model sees them (spec, load), texts
    (spec None) as text, cut to max_chars."""
    drop = mode == "drop"
    rows = [{"rank": i, "path": s.path, "split": s.split, "given": s.given, "suggested": s.suggested,
             "score": f"{s.score:.6f}", "dropped": "true" if drop and s.split == "train" else "false"}
            for i, s in enumerate(suspects, start=1)]
    write_csv(paths.LABEL_ISSUES, rows, COLUMNS)
    dropped = sum(r["dropped"] == "true" for r in rows)
    report = {**summary, "mode": mode, "dropped": dropped,
              "flagged_share_of_train": summary["flagged"]["train"] / max(1, summary["train_items"])}
    write_json(paths.LABEL_AUDIT, report)
    top = [Mistake(s.path, s.given, s.suggested, s.score) for s in suspects[:SHOWN]]
    paths.LABEL_ISSUES_DIR.mkdir(parents=True, exist_ok=True)
    words = ("given", "suggested")
    if spec is None:
        write_text(paths.LABEL_ISSUES_DIR / "suspects.md",
                   worst_texts_markdown(top, max_chars, title="Suspected label errors", words=words))
        plot_worst_texts(top, max_chars, paths.LABEL_ISSUES_DIR / "grid.png", words=words)
    else:
        write_text(paths.LABEL_ISSUES_DIR / "suspects.md", _table(top))
        plot_worst(top, spec, load, paths.LABEL_ISSUES_DIR / "grid.png", words=words)
    return report


def _table(top: Sequence[Any]) -> str:
    lines = ["# Suspected label errors (most suspicious first)", "",
             "| # | given | suggested | p(given) | file |", "|---|---|---|---|---|"]
    lines += [f"| {i} | {m.actual} | {m.predicted} | {m.confidence:.3f} | {m.path} |" for i, m in enumerate(top, 1)]
    if not top:
        lines.append("| | | | | no suspected label errors |")
    return "\n".join(lines) + "\n"
