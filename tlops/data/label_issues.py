"""The label audit's verdict as the training stages read it: reports/label_issues.csv (written by the audit stage,
tlops.training.label_audit): with data.label_issues: drop, the training items it flagged, which the training stages
leave out (Manifest.without_training, FeatureDataset.without_training).

Flagged validation and test items are only reported: dropping them would move the goalposts every model is scored
against. Nothing is ever removed from data/raw.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from tlops.core import paths
from tlops.core.errors import DataError

COLUMNS = ("rank", "path", "split", "given", "suggested", "score", "dropped")


def dropped_items(path: str | os.PathLike = paths.LABEL_ISSUES) -> set[str]:
    """The item paths the audit left out of training (its `dropped` column); empty when the file is missing or the
    audit did not drop (data.label_issues: report or off)."""
    path = Path(path)
    if not path.exists():
        return set()
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "dropped" not in reader.fieldnames:
            raise DataError(f"{path}: not a label audit (no 'dropped' column); rerun the audit stage")
        return {row["path"] for row in reader if row["dropped"] == "true"}
