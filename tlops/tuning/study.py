"""The study: RDB storage (SQLite in the workspace, or the shared database), sampler and pruner from params."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tlops.core import paths
from tlops.core.config import Params, TuneParams

STORAGE_FILE = paths.STATE_DIR / "tune.db"


def storage_url(tune: TuneParams, root: Path | None = None) -> str:
    """tune.storage, else SQLite at .tlops/tune.db of the workspace (an absolute path: trials run in clones).

    A plain postgresql:// URL (the form the MLflow store's is written in) gets the psycopg driver tlops installs:
    SQLAlchemy before 2.1 would otherwise look for psycopg2."""
    if tune.storage:
        scheme, sep, rest = tune.storage.partition("://")
        return f"postgresql+psycopg://{rest}" if sep and scheme in ("postgresql", "postgres") else tune.storage
    path = (root or Path.cwd()).resolve() / STORAGE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def study_name(params: Params) -> str:
    return params.tune.study or f"{params.export.registered_model}-tune"


def sampler(tune: TuneParams, level: str) -> Any:
    import optuna

    seed = tune.seed + (0 if level == "head" else 1)
    if tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(1, tune.startup_trials), multivariate=True)


def warmup_for(epochs: int) -> int:
    """Epochs before the pruner may judge a trial: half of them (at least one), at both levels."""
    return max(1, epochs // 2)


def pruner(tune: TuneParams, warmup_steps: int = 1) -> Any:
    """median: a trial whose value at an epoch is below the median of the others' there stops (after
    startup_trials complete trials and warmup_steps epochs); hyperband: successive halving over the epochs."""
    import optuna

    if tune.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=tune.startup_trials, n_warmup_steps=warmup_steps)
    if tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1)
    return optuna.pruners.NopPruner()


def open_study(tune: TuneParams, name: str, level: str, storage: str, warmup_steps: int = 1) -> Any:
    """The study `name.level` in `storage`, created the first time and resumed after (maximizing the validation
    metric)."""
    import optuna

    quiet()
    return optuna.create_study(study_name=f"{name}.{level}", storage=storage, sampler=sampler(tune, level),
                               pruner=pruner(tune, warmup_steps), direction="maximize", load_if_exists=True)


def quiet() -> None:
    """Optuna logs every trial at INFO and warns that its plots are experimental: tlops prints its own summary."""
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    logging.getLogger("alembic").setLevel(logging.WARNING)
