"""What a pipeline trial of `tlops tune` reports while it fine-tunes: its validation metric after every epoch, into
the study's storage, and TrialPruned when the study's pruner says stop (the stage ends, its checkpoint kept).

flows/tune.py starts each trial with $TLOPS_TUNE_TRIAL = {"storage", "study", "trial_id", "tune", "warmup_steps":
the epochs before the pruner may judge}; without it (every ordinary run) the reporter is None and nothing here
imports Optuna.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

from tlops.core.errors import TrialPruned

TRIAL_ENV = "TLOPS_TUNE_TRIAL"


def epoch_reporter() -> Callable[[dict, int], None] | None:
    """on_epoch(row, epoch) for the fine-tuning stage of a tune trial; row["step"] is the fine-tuning epoch (1, 2,
    ...) and row["val_metric"] the validation metric the trial is scored by."""
    raw = os.environ.get(TRIAL_ENV)
    if not raw:
        return None
    import optuna

    from tlops.core.config import TuneParams
    from tlops.tuning.study import pruner, quiet

    spec = json.loads(raw)
    quiet()
    tune = TuneParams.model_validate(spec["tune"])
    study = optuna.load_study(study_name=spec["study"], storage=spec["storage"],
                              pruner=pruner(tune, int(spec.get("warmup_steps", 1))))
    trial = optuna.trial.Trial(study, int(spec["trial_id"]))

    def report(row: dict, epoch: int) -> None:
        value = float(row.get("val_metric", row["val_accuracy"]))  # distributed runs replay their rows: accuracy
        trial.report(value, int(row["step"]))
        if trial.should_prune():
            trial.set_user_attr("pruned_at", int(row["step"]))
            raise TrialPruned(f"tune trial {trial.number} pruned after fine-tuning epoch {row['step']}: validation "
                              f"metric {value:.4f} is below the other trials' median there")

    return report
