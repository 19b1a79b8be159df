"""`tlops tune`: an Optuna study over params.yaml's tune.space, within a wall-clock budget, resumable.

    tlops tune --budget 1200 --concurrency 2 [--apply]

1. The project's own run first (`tlops run`; unchanged stages skipped): the cached features the head level reads and
   the defaults' scores the study is compared with.
2. head.* keys: trials in this process on the cached features (seconds each), pruned by their per-epoch validation
   metric; the best head settings are fixed for the next level.
3. Every other key: each trial is a run of the sweep-trial deployment on schedule.work_pool (flows/sweep.py: its own
   clone sharing the DVC cache), at most `concurrency` at once. Its fine-tuning stage reports the validation metric
   after every epoch into the study's storage (tlops/tuning/pruning.py); a trial the pruner stops ends its run there
   (checkpoint kept; the MLflow stage run KILLED with tlops.outcome=pruned; the Prefect flow run state "Pruned").
   A trial's run stops after the finetune stage, which selects the model it is scored by; the best trial's run then
   goes on to adaptation, evaluation and export in its folder. With no such key, one run of the best head settings.
The studies live in Optuna's RDB storage (tune.storage: SQLite in .tlops/ by default, the shared PostgreSQL when
scaled out), named <tune.study>.head and .pipeline: the same command after a kill continues them, waiting again for
trials whose flow runs are still going. One MLflow parent run (reopened on resume) holds a child run per trial;
reports/tune/ gets the summary and each level's optimization history and parameter importances. The best pipeline
trial's model is registered in the project's store as <export.registered_model>-tune, alias candidate (never the
production model's champion); --apply writes its params into params.yaml, so the next `tlops run` reproduces it,
when its validation gain over the defaults is clear of the validation split's noise (tune.min_gain_se standard
errors, paired over the validation items: the best of several trials is partly the luckiest).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import chdir, contextmanager
from pathlib import Path
from typing import Any

from tlops.core import paths
from tlops.core.config import HeadParams, Params, TuneParams, dotted_get, is_text_backbone, load_params, set_params
from tlops.core.errors import TlopsError
from tlops.core.io import read_json, sha256_bytes, write_json
from tlops.core.secrets import redact, without_credentials, without_password

REPORT_DIR = paths.METRICS.parent / "tune"
SUMMARY = REPORT_DIR / "summary.json"
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
PRUNED_STATE = "Pruned"  # the Prefect state name of a trial run its pruner stopped (type COMPLETED)
# A trial is scored by the validation metric of the model the finetune stage selects (head alone or fine-tuned), so
# its run stops there; adaptation, evaluation and export run for the best trial only, once the study has chosen it.
TRIAL_UNTIL = "finetune"


def tune(params_path: str | None = None, root: Path | None = None, budget_s: float | None = None,
         trials: int | None = None, head_trials: int | None = None, concurrency: int | None = None,
         pool: str | None = None, apply: bool = False, poll_s: float = 2.0) -> dict[str, Any]:
    """Run (or resume) the study; the summary written to reports/tune/summary.json."""
    from flows.deploy import _require_server
    from tlops.tuning.space import check_space, split_levels
    from tlops.tuning.study import storage_url, study_name

    started = time.monotonic()
    root = (root or Path.cwd()).resolve()
    params = load_params(params_path)
    overrides = {"budget_s": budget_s, "trials": trials, "head_trials": head_trials, "concurrency": concurrency}
    t = TuneParams.model_validate({**params.tune.model_dump(), **{k: v for k, v in overrides.items() if v is not None}})
    check_space(t, params, params_path)
    head_space, pipeline_space = split_levels(t)
    if t.trials:
        _require_server("tlops tune")  # pipeline trials are deployment runs on the pool
    deadline = started + t.budget_s
    storage, name = storage_url(t, root), study_name(params)
    print(f"study {name} in {_shown(storage)}: budget {t.budget_s:g} s", file=sys.stderr)

    from flows.pipeline import run_pipeline

    run_pipeline(params_path)  # the defaults: cached features for the head level, and the scores to beat
    defaults = _run_scores(root)
    with _parent_run(name, t, storage) as parent:
        head = (_head_level(params, params_path, t, name, storage, head_space, deadline, parent) if head_space
                else None)
        fixed = head["best_changes"] if head and head.get("best_changes") else {}
        pipeline = _pipeline_level(params, t, name, storage, pipeline_space, fixed, deadline, parent, root,
                                   pool or params.schedule.work_pool, poll_s, defaults,
                                   head_found=bool(fixed) and not head.get("best_is_defaults")) if t.trials else None
        best = (pipeline or {}).get("best")
        if best and best.get("defaults"):
            print("no trial beat the defaults: nothing to register or apply", file=sys.stderr)
            best = None
        if best:
            best["gain"] = _validation_gain(root, Path(best["folder"]), t.min_gain_se)
            best["registered"] = _register(params, best, parent)
        summary = {"study": name, "storage": _shown(storage), "budget_s": t.budget_s,
                   "seconds": round(time.monotonic() - started, 1), "defaults": defaults, "head": head,
                   "pipeline": pipeline, "mlflow_parent_run_id": parent}
        write_json(root / SUMMARY, summary)
        _log_outcome(parent, summary, root)
    if apply and best:
        summary.update(_apply(best, params_path))
    return summary


def _apply(best: dict[str, Any], params_path: str | None) -> dict[str, Any]:
    """--apply: the best trial's values into params.yaml ({"applied": changes}), unless its validation gain is not
    clear of the noise ({"not_applied": why}, printed once; params.yaml untouched)."""
    if (g := best.get("gain")) and not g["clear"]:
        why = (f"the best trial's validation gain, {100 * g['gain']:+.2f} points of {g['metric']}, is under "
               f"{g['min_gain_se']:g} standard errors ({100 * g['se']:.2f} points each, paired over {g['items']} "
               "validation items): params.yaml unchanged (tune.min_gain_se: 0 applies it anyway)")
        print(f"not applied: {why}", file=sys.stderr)
        return {"not_applied": why}
    changes = {k: v for k, v in best["changes"].items() if k != "export.registered_model"}
    set_params(changes, params_path)
    return {"applied": changes}


def gain_line(g: dict[str, Any]) -> str:
    """The best trial's validation gain over the defaults as `tlops tune` and bench/tune.py print it."""
    return (f"validation {g['metric']} {100 * g['gain']:+.2f} points over the defaults, standard error "
            f"{100 * g['se']:.2f} (paired over {g['items']} items)")


def _validation_gain(root: Path, folder: Path, min_se: float) -> dict[str, Any] | None:
    """The best trial's gain over the defaults on the validation items both were scored on (their exported models'
    predictions, which the evaluate stage keeps), with its paired bootstrap standard error; `clear` when the gain is
    positive and at least min_se standard errors (0: always). None when either run has no predictions to compare."""
    import numpy as np

    from tlops.evaluate.scoring import paired_gain

    ours, theirs = root / paths.VAL_PREDICTIONS, folder / paths.VAL_PREDICTIONS
    if not (ours.exists() and theirs.exists() and (root / paths.METRICS).exists()):
        return None
    with np.load(ours) as a, np.load(theirs) as b:
        if list(a["classes"]) != list(b["classes"]):
            return None
        common, i, j = np.intersect1d(a["sha256"], b["sha256"], return_indices=True)
        y, before, after, classes = a["label"][i], a["predicted"][i], b["predicted"][j], len(a["classes"])
    if len(common) < 2:
        return None
    metric = read_json(root / paths.METRICS).get("metric", "accuracy")
    gain, se = paired_gain(metric, y, before, after, classes)
    return {"metric": metric, "items": len(common), "gain": gain, "se": se, "min_gain_se": min_se,
            "clear": min_se == 0 or (gain > 0 and gain >= min_se * se)}


def _shown(storage: str) -> str:
    """The storage URL without its credentials (printed and logged): user:password@ dropped, and a password=...
    among its query parameters (SQLAlchemy passes them to the driver) replaced by ***."""

    return redact(without_credentials(storage))


# --- head level: in-process trials on the cached features ---------------------------------------------------------

def _head_level(params: Params, params_path: str | None, t: TuneParams, name: str, storage: str,
                space: dict[str, Any], deadline: float, parent: str) -> dict[str, Any]:
    import optuna
    from optuna.trial import TrialState

    from tlops.training.head import train_head_grid
    from tlops.tuning.space import HEAD, as_changes
    from tlops.tuning.study import open_study, warmup_for

    # A head trial costs seconds: judged only after half its epochs, when a slow learning rate has caught up.
    study = open_study(t, name, "head", storage, warmup_steps=warmup_for(params.head.epochs))
    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(stale.number, state=TrialState.FAIL)  # in-process trials of a killed tune: not running anymore
    info = read_json(paths.HEAD_INFO)  # the defaults' head: the train_head stage's choice in its grid
    chosen = {"head.lrs": info["lr"], "head.weight_decays": info["weight_decay"]}
    if not study.trials and (seed := _defaults_trial(
            space, {k: chosen.get(k, dotted_get(params, k)) for k in space}, info["val_metric"], paths.HEAD_DIR)):
        study.add_trial(seed)
    seeded = sum(1 for tr in study.trials if tr.user_attrs.get("defaults"))
    inputs = _FeaturesAt(params, params_path)
    while _finished(study) < t.head_trials + seeded and time.monotonic() < deadline:
        trial = study.ask(space)
        changes = as_changes(trial.params, params)
        hp = HeadParams.model_validate({**params.head.model_dump(), **{k.split(".", 1)[1]: v
                                                                        for k, v in changes.items()
                                                                        if k.startswith(HEAD)}})
        ds, selection = inputs({k: v for k, v in changes.items() if not k.startswith(HEAD)})

        def report(row: dict, trial: optuna.Trial = trial) -> None:
            trial.report(float(row["val_metric"]), int(row["epoch"]))
            if trial.should_prune():
                raise optuna.TrialPruned()

        try:
            result = train_head_grid(ds, hp, metric=selection.metric,
                                     class_weighted=selection.weighted(hp.class_weighting), report=report)
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, result.val_metric)
        _log_trial(parent, "head", study.trials[trial.number], changes)
    return _level_summary(study, params, "head")


class _FeaturesAt:
    """The head's inputs for a head trial: the workspace's cached features, or, where the trial changes what they
    are of (tlops.tuning.space.FEATURE_KEYS: the input size), those the features stage's own code extracts with the
    change into .tlops/tune/features/<digest> (content-addressed as the stage's cache: once per value, kept for a
    resumed study; never the stage's own output, which DVC tracks)."""

    def __init__(self, params: Params, params_path: str | None) -> None:
        self.params, self.path, self.seen = params, params_path, {}

    def __call__(self, upstream: dict[str, Any]) -> tuple[Any, Any]:
        from tasks.train_head import head_inputs

        text = is_text_backbone(self.params.model.backbone)  # a text model's features have no input size
        upstream = {k: v for k, v in upstream.items() if dotted_get(self.params, k) != v and not text}
        key = json.dumps(upstream, sort_keys=True)
        if key not in self.seen:
            if not upstream:
                self.seen[key] = head_inputs(self.params)
            else:
                from tlops.data.manifest import load_manifest
                from tlops.features.extract import extract_features

                out = paths.STATE_DIR / "tune" / "features" / sha256_bytes(key.encode())[:16]
                started = time.monotonic()
                changed = set_params(upstream, self.path, dry_run=True)
                stats = extract_features(load_manifest(paths.MANIFEST), changed, out, progress=False)
                print(f"head level: features with {_brief(upstream)}: {stats['extracted']} extracted, "
                      f"{stats['cached']} cached ({time.monotonic() - started:.0f} s)", file=sys.stderr)
                self.seen[key] = head_inputs(self.params, out / paths.FEATURES_DATASET.name)
        return self.seen[key]


def _finished(study: Any) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)))


def _level_summary(study: Any, params: Params, level: str) -> dict[str, Any]:
    from optuna.trial import TrialState

    from tlops.tuning.space import as_changes

    states = [t.state.name.lower() for t in study.trials]
    out: dict[str, Any] = {"study": study.study_name, "trials": len(states),
                           **{s: states.count(s) for s in ("complete", "pruned", "fail")},
                           "epochs": sum(len(t.intermediate_values) for t in study.trials)}
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if complete:
        best = max(complete, key=lambda t: t.value)
        out.update(best_trial=best.number, best_value=best.value,
                   best_is_defaults=bool(best.user_attrs.get("defaults")),
                   best_changes=best.user_attrs.get("changes") or as_changes(best.params, params))
        out["plots"] = _plots(study, level)
    return out


# --- pipeline level: deployment runs on the pool, pruned per fine-tuning epoch -------------------------------------

def _pipeline_level(params: Params, t: TuneParams, name: str, storage: str, space: dict[str, Any],
                    fixed: dict[str, Any], deadline: float, parent: str, root: Path, pool: str,
                    poll_s: float, defaults: dict[str, Any], head_found: bool = False) -> dict[str, Any]:
    from optuna.trial import TrialState
    from prefect import get_client
    from prefect.deployments import run_deployment

    from flows.sweep import SWEEPS_DIR, deploy_trials
    from tlops.tuning.pruning import TRIAL_ENV
    from tlops.tuning.space import as_changes
    from tlops.tuning.study import open_study, warmup_for

    # The pruner judges a trial from half its fine-tuning epochs on, as the head level's: a high learning rate over
    # many unfrozen groups scores low while the schedule is young (Fashion-MNIST: the trial that ended best,
    # validation 0.915, stood last after epoch 1 at 0.823 and above the median after epoch 2; pruned at epoch 1).
    warmup = warmup_for(params.finetune.epochs)
    study = open_study(t, name, "pipeline", storage, warmup_steps=warmup)
    # No trial starts once the budget left would not hold the best trial's completion (its run's stages after
    # fine-tuning), so that the study ends within the budget and the trials running at its end.
    reserve = _completion_s(params, fixed)
    deployment = deploy_trials(root, pool, t.concurrency)
    if not study.trials and "val_metric" in defaults and (seed := _defaults_trial(
            space, {k: dotted_get(params, k) for k in space}, defaults["val_metric"], root)):
        study.add_trial(seed)  # trial 0 is the run already made: the sampler's first point, the score to beat
        if head_found:  # the first trial: the defaults' own settings here with the head level's findings fixed
            study.enqueue_trial(seed.params, skip_if_exists=False)
    seeded = sum(1 for tr in study.trials if tr.user_attrs.get("defaults"))
    wanted = (t.trials if space else 1) + seeded  # no pipeline key: one run of the best head settings
    running: dict[int, dict[str, Any]] = {}
    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if stale.user_attrs.get("flow_run_id"):  # its flow run may still be going: wait for it again
            running[stale.number] = dict(stale.user_attrs)
        else:
            study.tell(stale.number, state=TrialState.FAIL)
    with get_client(sync_client=True) as client:
        while True:
            while (len(running) < t.concurrency and len(study.trials) < wanted
                   and time.monotonic() < deadline - reserve):
                trial = study.ask(space)
                changes = {**fixed, **as_changes(trial.params, params),
                           "export.registered_model": f"{params.export.registered_model}-tune"}
                folder = root / SWEEPS_DIR / f"tune-{name}" / f"{trial.number:03d}"
                # A flow run's parameters are stored and shown by Prefect: the worker gets the URL without its
                # password and authenticates as libpq does (PGPASSWORD, ~/.pgpass).
                sent = without_password(storage)
                env = {TRIAL_ENV: json.dumps({"storage": sent, "study": study.study_name, "trial_id": trial._trial_id,
                                              "tune": {**t.model_dump(mode="json"), "storage": sent},
                                              "warmup_steps": warmup})}
                run = run_deployment(deployment, parameters={"origin": str(root), "folder": str(folder),
                                                             "set_params": changes, "env": env,
                                                             "until": TRIAL_UNTIL},
                                     timeout=0, tags=["tune", name])
                attrs = {"flow_run_id": str(run.id), "folder": str(folder), "changes": changes}
                for k, v in attrs.items():
                    trial.set_user_attr(k, v)
                running[trial.number] = attrs
                print(f"trial {trial.number}: flow run {run.id} ({_brief(changes)})", file=sys.stderr)
            if not running:
                break
            time.sleep(poll_s)
            for number, attrs in list(running.items()):
                state = client.read_flow_run(attrs["flow_run_id"]).state
                if state is None or state.type.value not in FINAL:
                    continue
                del running[number]
                scores = {}
                if state.type.value == "COMPLETED" and state.name != PRUNED_STATE:
                    scores = _run_scores(Path(attrs["folder"]))
                    value = scores.get("val_metric")
                    study.tell(number, value) if value is not None else study.tell(number, state=TrialState.FAIL)
                else:
                    study.tell(number, state=TrialState.PRUNED if state.name == PRUNED_STATE else TrialState.FAIL)
                frozen = study.trials[number]
                _log_trial(parent, "pipeline", frozen, attrs["changes"],
                           scores if frozen.state == TrialState.COMPLETE else {},
                           state.message if frozen.state == TrialState.FAIL else None)
                print(f"trial {number}: {frozen.state.name.lower()}"
                      + (f", validation {frozen.value:.4f}" if frozen.value is not None else ""), file=sys.stderr)
    out = {**_level_summary(study, params, "pipeline"), "reserve_s": round(reserve, 1)}
    if "best_trial" in out:
        attrs = study.trials[out["best_trial"]].user_attrs
        if not attrs.get("defaults"):
            _complete(deployment, root, out["best_trial"], attrs, name)
        out["best"] = {"trial": out["best_trial"], **_run_scores(Path(attrs["folder"])),
                       "val_metric": out["best_value"], "changes": attrs["changes"], "folder": attrs["folder"],
                       **({"defaults": True} if attrs.get("defaults") else {})}
    return out


def _completion_s(params: Params, fixed: dict[str, Any]) -> float:
    """The expected seconds of the best trial's completion: the stages after TRIAL_UNTIL as long as they took in the
    project's own last run (their MLflow stage runs), times the input's pixels at the size the head level fixed over
    the params' size; 0 for a stage never run here."""
    from orchestration import dvc_stages
    from tlops.tracking import runs

    with dvc_stages.open_repo() as repo:
        before = {s.name for s in dvc_stages.pipeline_stages(repo, TRIAL_UNTIL)}
        after = [s.name for s in dvc_stages.pipeline_stages(repo) if s.name not in before]
    c = runs.client()
    seconds = 0.0
    for stage in after:
        found = c.search_runs([runs.experiment_id(c)], f"tags.stage = '{stage}' and attributes.status = 'FINISHED'",
                              max_results=1, order_by=["attributes.start_time DESC"])
        seconds += (found[0].info.end_time - found[0].info.start_time) / 1000 if found else 0.0
    size, default = fixed.get("model.image_size"), params.model.image_size
    return seconds * (size / default) ** 2 if size and default else seconds


def _complete(deployment: str, root: Path, number: int, attrs: dict[str, Any], name: str) -> None:
    """The best trial's run brought to the end (adaptation, evaluation, export) in its folder, on the pool as the
    trial ran: its stages up to fine-tuning are up to date there and skipped. Nothing to do when already done (a
    resumed study)."""
    from prefect.deployments import run_deployment

    if (Path(attrs["folder"]) / paths.METRICS).exists():
        return
    print(f"trial {number}: the best; its run goes on to evaluation and export", file=sys.stderr)
    run = run_deployment(deployment, parameters={"origin": str(root), "folder": attrs["folder"],
                                                 "set_params": attrs["changes"]}, timeout=None, tags=["tune", name])
    if run.state is None or not run.state.is_completed():
        print(f"warning: the best trial's run did not complete ({run.state.message if run.state else 'no state'}): "
              "no test scores, nothing registered", file=sys.stderr)


def _defaults_trial(space: dict[str, Any], values: dict[str, Any], value: float, folder: Path) -> Any:
    """The defaults' run as a finished trial of a study (None where a default lies outside the space): the sampler
    starts from a known point and the best trial is never worse than what the defaults scored."""
    import optuna
    from optuna.distributions import CategoricalDistribution

    for key, dist in space.items():
        v = values.get(key)
        if not (v in dist.choices if isinstance(dist, CategoricalDistribution) else
                isinstance(v, (int, float)) and not isinstance(v, bool) and dist.low <= v <= dist.high):
            return None
    try:
        return optuna.trial.create_trial(params={k: values[k] for k in space}, distributions=space, value=value,
                                         user_attrs={"changes": {}, "folder": str(folder), "defaults": True})
    except ValueError:  # e.g. off a stepped grid
        return None


def _brief(changes: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in changes.items()
                     if k != "export.registered_model")


def _run_scores(folder: Path) -> dict[str, Any]:
    """The validation metric of the model a run selected (trials are ranked by it, never by test scores) and, once
    the run has evaluated it, its test scores: from reports/metrics.json, or from the finetune stage's model info
    where the run stopped after that stage."""
    from flows.sweep import _scores_of

    path, info = folder / paths.METRICS, folder / paths.FINETUNE_INFO
    m = read_json(path) if path.exists() else read_json(info) if info.exists() else {}
    chosen = m.get("selection", {}).get(m.get("selected"), {})
    return {**({"val_metric": chosen["val_metric"]} if "val_metric" in chosen else {}),
            **({f"test_{k}" if k in ("score", "head", "finetuned") else k: v for k, v in _scores_of(m).items()}
               if path.exists() else {})}


# --- tracking and outcome --------------------------------------------------------------------------------------------

@contextmanager
def _parent_run(name: str, t: TuneParams, storage: str) -> Iterator[str]:
    """The study's MLflow parent run (tags tlops.study and the storage's digest: a study of the same name in another
    storage is another study): created once, reopened by a resumed tune, ended here."""
    from tlops.tracking import runs

    c = runs.client()
    exp = runs.experiment_id(c)
    runs.reap_stale_runs(c)  # a killed tune's parent and the trial it was logging: KILLED, not left RUNNING
    where = sha256_bytes(_shown(storage).encode())[:16]
    found = c.search_runs([exp], f"tags.`tlops.study` = '{name}' and tags.`tlops.kind` = 'tune' and "
                                 f"tags.`tlops.study_storage` = '{where}'", max_results=1,
                          order_by=["attributes.start_time DESC"])
    if found:
        run_id = found[0].info.run_id
        c.update_run(run_id, status="RUNNING")
        runs.StageRun(c, run_id).set_tags(runs.owned_by_this_process())
    else:
        run_id = c.create_run(exp, run_name=f"tune-{name}", tags={"tlops.kind": "tune", "tlops.study": name,
                                                                 "tlops.study_storage": where,
                                                                 **runs.owned_by_this_process()}).info.run_id
        c.log_param(run_id, "space", json.dumps(t.model_dump(mode="json")["space"])[:6000])
    status = "FAILED"
    try:
        yield run_id
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        try:
            c.set_terminated(run_id, status)
        except Exception as e:  # never hide the study's own error
            print(f"warning: could not end MLflow run {run_id}: {e}", file=sys.stderr)


def _log_trial(parent: str, level: str, trial: Any, changes: dict[str, Any], scores: dict[str, Any] | None = None,
               error: str | None = None) -> None:
    """A child run of the study's parent: the trial's params, validation metric per epoch, state."""
    from tlops.tracking import runs

    c = runs.client()
    exp = c.get_run(parent).info.experiment_id
    state = trial.state.name.lower()
    child = runs.StageRun(c, c.create_run(exp, run_name=f"{level}-{trial.number:03d}", tags={
        "mlflow.parentRunId": parent, "tlops.kind": "tune-trial", "tlops.level": level, "tlops.outcome": state,
        **runs.owned_by_this_process(), **({"error": error[:500]} if error else {})}).info.run_id, parent)
    child.log_params(changes)
    child.log_series("val_metric_epoch", trial.intermediate_values)
    child.log_metrics({**({"val_metric": trial.value} if trial.value is not None else {}),
                       **{k: v for k, v in (scores or {}).items()
                          if isinstance(v, (int, float)) and not isinstance(v, bool)}})
    c.set_terminated(child.run_id, {"complete": "FINISHED", "pruned": "KILLED"}.get(state, "FAILED"))


def _plots(study: Any, level: str) -> list[str]:
    """The optimization history (each trial's value, the best so far) and the parameter importances (fANOVA, from
    two complete trials on) as PNGs in reports/tune/."""
    import optuna
    from optuna.trial import TrialState

    from tlops.evaluate.plots import _figure, _save

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    written = []
    fig = _figure(7, 4)
    ax = fig.add_subplot()
    numbers, values = [t.number for t in done], [t.value for t in done]
    ax.scatter(numbers, values, s=14, label="trial")
    ax.step(numbers, [max(values[: i + 1]) for i in range(len(values))], where="post", color="C3", label="best so far")
    ax.set(xlabel="trial", ylabel="validation metric", title=f"{study.study_name}: optimization history")
    ax.legend(loc="lower right")
    path = REPORT_DIR / f"{level}_history.png"
    _save(fig, path)
    written.append(str(path))
    if len(done) >= 2 and len(study.best_trial.params) >= 1:
        try:
            importance = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))  # Optuna 5's default is PED-ANOVA
        except (RuntimeError, ValueError):  # e.g. every complete trial drew the same values
            importance = {}
        if importance:
            fig = _figure(7, 1 + 0.4 * len(importance))
            ax = fig.add_subplot()
            ax.barh(list(importance)[::-1], list(importance.values())[::-1])
            ax.set(xlabel="importance (fANOVA)", title=f"{study.study_name}: parameter importances")
            path = REPORT_DIR / f"{level}_importances.png"
            _save(fig, path)
            written.append(str(path))
    return written


def _log_outcome(parent: str, summary: dict[str, Any], root: Path) -> None:
    from tlops.tracking import runs

    run = runs.StageRun(runs.client(), parent)
    for level in ("head", "pipeline"):
        part = summary.get(level) or {}
        run.log_metrics({f"{level}_{k}": part[k] for k in ("best_value", "trials", "pruned", "epochs")
                         if isinstance(part.get(k), (int, float))})
        if isinstance(score := (part.get("best") or {}).get("test_score"), (int, float)):
            run.log_metrics({f"{level}_best_test_score": score})
        if gain := (part.get("best") or {}).get("gain"):
            run.log_metrics({f"{level}_best_val_gain": gain["gain"], f"{level}_best_val_gain_se": gain["se"]})
        for path in part.get("plots", []):
            run.log_artifact(root / path, "tune")
    run.log_artifact(root / SUMMARY, "tune")


def _register(params: Params, best: dict[str, Any], parent: str) -> dict[str, Any] | None:
    """The best trial's ONNX model into the project's registry as <export.registered_model>-tune, alias candidate."""
    import os

    from tlops.core.config import load_params as load
    from tlops.export.promotion import register
    from tlops.tracking import runs

    folder = Path(best["folder"])
    if not (folder / paths.ONNX).exists():
        return None
    uri, saved = runs.tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri  # the project's store, while the clone's files are read
    try:
        with chdir(folder):
            trial_params = load(folder / "params.yaml")
            version = register(trial_params, {}, parent)
    except TlopsError as e:
        print(f"warning: the best trial's model was not registered: {e}", file=sys.stderr)
        return None
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    return {"name": trial_params.export.registered_model, "version": version, "alias": "candidate"}


def table(summary: dict[str, Any]) -> Any:
    """The study's outcome as a rich Table: the defaults, the best head trial, the best pipeline trial."""
    from rich.table import Table

    tab = Table(title=f"tune {summary['study']} ({summary['seconds']:.0f} s of {summary['budget_s']:.0f}; MLflow "
                      f"parent run {summary['mlflow_parent_run_id']})")
    for col in ("", "trials", "pruned", "epochs", "validation", "test", "settings"):
        tab.add_column(col, justify="left" if col in ("", "settings") else "right")
    fmt = lambda v: f"{v:.4f}" if isinstance(v, (int, float)) else "-"
    d = summary["defaults"]
    tab.add_row("defaults", "-", "-", "-", fmt(d.get("val_metric")), fmt(d.get("test_score")), "params.yaml")
    for level in ("head", "pipeline"):
        part = summary.get(level)
        if part:
            best = part.get("best") or {}
            tab.add_row(level, str(part["trials"]), str(part["pruned"]), str(part["epochs"]),
                        fmt(part.get("best_value")), fmt(best.get("test_score")),
                        "the defaults (trial 0)" if best.get("defaults") else _brief(part.get("best_changes") or {}))
    return tab

