"""tune.space as Optuna distributions; a trial's values as the params changes that `tlops run -S` writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tlops.core.config import Distribution, Params, TuneParams, dotted_get, set_params
from tlops.core.errors import ConfigError

HEAD = "head."  # keys searched in process on the cached features; every other key needs a pipeline run


def distribution(spec: Distribution) -> Any:
    """The Optuna distribution of one tune.space entry (integer bounds without a fractional step search integers)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if spec.choices is not None:
        return CategoricalDistribution(spec.choices)
    integral = isinstance(spec.low, int) and isinstance(spec.high, int) and float(spec.step or 1).is_integer()
    if integral:
        return IntDistribution(int(spec.low), int(spec.high), log=spec.log, step=int(spec.step or 1))
    return FloatDistribution(float(spec.low), float(spec.high), log=spec.log, step=spec.step)


def split_levels(tune: TuneParams) -> tuple[dict[str, Any], dict[str, Any]]:
    """({head key: distribution}, {pipeline key: distribution})."""
    dists = {k: distribution(v) for k, v in tune.space.items()}
    return ({k: d for k, d in dists.items() if k.startswith(HEAD)},
            {k: d for k, d in dists.items() if not k.startswith(HEAD)})


def as_changes(values: dict[str, Any], params: Params) -> dict[str, Any]:
    """Sampled values as params changes: a list-valued key (head.lrs, head.weight_decays) gets a one-item list."""
    return {k: [v] if isinstance(dotted_get(params, k), list) and not isinstance(v, list) else v
            for k, v in values.items()}


def check_space(tune: TuneParams, params: Params, path: str | Path | None = None) -> None:
    """Every bound and choice of the space validated as the params file with it set (nothing written): a value the
    schema refuses fails `tlops tune` before any trial starts (ConfigError naming the key and value)."""
    if not tune.space:
        raise ConfigError("tune.space is empty: name at least one params key to search, e.g. "
                          "finetune.lr: {low: 0.0002, high: 0.005, log: true}")
    for key, spec in tune.space.items():
        for value in spec.choices if spec.choices is not None else (spec.low, spec.high):
            try:
                set_params(as_changes({key: value}, params), path, dry_run=True)
            except ConfigError as e:
                raise ConfigError(f"tune.space.{key}: the value {value!r} is not valid there: "
                                  f"{str(e).split(f' {key}: ', 1)[-1]}") from None
