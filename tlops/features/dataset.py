"""The cached features as a dataset (arrays per split and their classes). Numpy only."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tlops.core import paths
from tlops.core.errors import DataError


@dataclass(frozen=True)
class FeatureDataset:
    """features/dataset.npz: one row per (image, view), in manifest order, views after their image."""

    features: np.ndarray  # float32 (N, D)
    labels: np.ndarray  # int64 (N,)
    splits: np.ndarray  # str (N,): train | val | test
    sha256: np.ndarray  # str (N,)
    views: np.ndarray  # int64 (N,): 0 = the image itself, k > 0 = augmented view k (train only)
    paths: np.ndarray  # str (N,)
    classes: list[str]
    meta: dict  # backbone, weights_id, spec, num_features, precision, augment_views, augment, augment_seed

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(X, y) of one split: train with its augmented views, val and test with the images alone."""
        keep = self.splits == name
        if name != "train":
            keep &= self.views == 0
        return self.features[keep], self.labels[keep]

    def without_training(self, items: set[str]) -> FeatureDataset:
        """This dataset without the training rows (views too) of these item paths (the label audit's drops)."""
        if not items:
            return self
        keep = ~((self.splits == "train") & np.isin(self.paths, sorted(items)))
        return FeatureDataset(self.features[keep], self.labels[keep], self.splits[keep], self.sha256[keep],
                              self.views[keep], self.paths[keep], self.classes, self.meta)

    def image_labels(self, name: str) -> list[str]:
        """The class names of a split's images (their augmented views left out), in manifest order."""
        keep = (self.splits == name) & (self.views == 0)
        return [self.classes[i] for i in self.labels[keep]]


def load_feature_dataset(path: Path = paths.FEATURES_DATASET) -> FeatureDataset:
    """Read features/dataset.npz written by the features stage."""
    try:
        z = np.load(path)
    except FileNotFoundError:
        raise DataError(f"{path} not found; run the features stage first (dvc repro features)") from None
    with z:
        return FeatureDataset(features=z["features"], labels=z["labels"], splits=z["splits"], sha256=z["sha256"],
                              views=z["views"], paths=z["paths"], classes=[str(c) for c in z["classes"]],
                              meta=json.loads(str(z["meta"])))
