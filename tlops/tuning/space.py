"""tune.space as Optuna distributions; a trial's values as the params changes that `tlops run -S` writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tlops.core.config import Distribution, Params, TuneParams, dotted_get, set_params
from tlops.core.errors import ConfigError

HEAD = "head."  # keys searched in process on the cached features; every other key needs a pipeline run
# Keys upstream of the cached features, searched in process too: a head trial reads the features extracted at its
# value (each choice once, by the features stage's own code), and the best value is fixed for the pipeline trials as
# the head settings are. The head alone ranks input sizes as fine-tuning does, for seconds per trial instead of
# minutes (Fashion-MNIST validation at 96 / 160 px: the head 0.862 / 0.887, fine-tuned with the defaults 0.893 / 0.914).
FEATURE_KEYS = ("model.image_size",)


def head_level(key: str) -> bool:
    """Whether `tlops tune` searches the key in process (head settings, and what the cached features are of)."""
    return key.startswith(HEAD) or key in FEATURE_KEYS


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
    return ({k: d for k, d in dists.items() if head_level(k)}, {k: d for k, d in dists.items() if not head_level(k)})


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
        if key in FEATURE_KEYS and spec.choices is None:
            raise ConfigError(f"tune.space.{key}: give it choices (e.g. {{choices: [96, 128, 160]}}): the features are "
                              "extracted once for each")
        for value in spec.choices if spec.choices is not None else (spec.low, spec.high):
            try:
                set_params(as_changes({key: value}, params), path, dry_run=True)
            except ConfigError as e:
                raise ConfigError(f"tune.space.{key}: the value {value!r} is not valid there: "
                                  f"{str(e).split(f' {key}: ', 1)[-1]}") from None
