"""tlops tune: an Optuna study in a real SQLite storage, head trials in process on the cached features, pipeline
trials as deployment runs taken by a real process worker, pruning through the study's storage from inside the
fine-tuning stage, one MLflow parent run, resumption after kill -9; the study on a real PostgreSQL (the shared
stores' server), continued by another process, its password never shown."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from contextlib import closing
from pathlib import Path

import pytest
import yaml
from conftest import create_database, make_images, run_cmd, write_params

POOL = "tune-test"
SPACE = {"head.lrs": {"low": 0.001, "high": 0.05, "log": True},
         "head.weight_decays": {"low": 0.000001, "high": 0.001, "log": True},
         "finetune.lr": {"low": 0.0003, "high": 0.003, "log": True}}


def _write(workspace: Path, overrides: dict, space: dict) -> None:
    """params.yaml with tune.space exactly `space` (not merged into the project's)."""
    params = write_params(workspace, overrides)
    params["tune"]["space"] = space
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _project(workspace: Path, space: dict = SPACE, **tune) -> None:
    make_images(workspace.parent / "images", classes=3, per_class=8, size=32)
    _write(workspace, {"data": {"source": "imagefolder", "path": str(workspace.parent / "images")},
                       "finetune": {"epochs": 2, "patience": 2},
                       "tune": {"head_trials": 4, "trials": 2, "pruner": "none", **tune}}, space)
    run_cmd(["git", "add", "-A"], workspace)
    run_cmd(["git", "commit", "-qm", "tune base"], workspace)


def _workers(workspace: Path, n: int = 1) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--type", "process",
                              "--limit", "1", "--name", f"tw{i}"], cwd=workspace, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL) for i in range(n)]


def _stop(workers: list[subprocess.Popen]) -> None:
    for w in workers:
        w.send_signal(signal.SIGINT)
    for w in workers:
        try:
            w.wait(timeout=30)
        except subprocess.TimeoutExpired:
            w.kill()


def test_a_value_the_schema_refuses_fails_before_any_work(workspace: Path) -> None:
    _write(workspace, {}, {"finetune.lr": {"low": 0.0, "high": 0.01}})
    proc = run_cmd([sys.executable, "-m", "tlops.cli", "tune"], workspace, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: tune.space.finetune.lr: the value 0.0 is not valid there: Input should be greater than 0 (got 0.0)"]
    assert not (workspace / ".tlops/tune.db").exists() and not (workspace / "data/raw").exists()
    _write(workspace, {}, {"finetune.lrr": {"low": 0.001, "high": 0.01}})
    proc = run_cmd([sys.executable, "-m", "tlops.cli", "tune"], workspace, check=False)
    assert proc.returncode == 2 and "finetune.lrr is not a params key (did you mean finetune.lr?)" in proc.stderr
    _write(workspace, {}, {"model.image_size": {"low": 96, "high": 160}})  # a head trial extracts features a value
    proc = run_cmd([sys.executable, "-m", "tlops.cli", "tune"], workspace, check=False)
    assert proc.returncode == 2 and "tune.space.model.image_size: give it choices" in proc.stderr


def test_the_defaults_run_seeds_a_fresh_study_when_it_lies_inside_the_space(tmp_path: Path) -> None:
    """The defaults' scores enter a study as trial 0 (so its best is never below them) only where every default is
    a point of the space."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from flows.tune import _defaults_trial

    space = {"finetune.lr": FloatDistribution(2e-4, 5e-3, log=True), "finetune.unfreeze_groups": IntDistribution(1, 8),
             "finetune.augment.hflip": CategoricalDistribution([False, True])}
    defaults = {"finetune.lr": 1e-3, "finetune.unfreeze_groups": 3, "finetune.augment.hflip": False}
    seed = _defaults_trial(space, defaults, 0.89, tmp_path)
    study = optuna.create_study(direction="maximize")
    study.add_trial(seed)
    study.tell(study.ask(space), 0.85)
    assert study.best_trial.number == 0 and study.best_trial.user_attrs["defaults"]
    assert study.best_trial.params == defaults and study.best_value == 0.89
    assert _defaults_trial(space, {**defaults, "finetune.lr": 0.01}, 0.89, tmp_path) is None
    assert _defaults_trial(space, {**defaults, "finetune.augment.hflip": None}, 0.89, tmp_path) is None
    assert _defaults_trial({"head.weight_decays": FloatDistribution(1e-6, 1e-3, log=True)},
                           {"head.weight_decays": 0.0}, 0.89, tmp_path) is None


def test_the_fine_tuning_stage_reports_each_epoch_and_stops_when_pruned(tmp_path: Path) -> None:
    """The reporter a pipeline trial's finetune stage uses: values land in the study; below the others' median the
    pruner stops it with TrialPruned, a permanent error (never retried)."""
    import optuna

    from tlops.core.config import TuneParams
    from tlops.core.errors import TrialPruned, is_permanent
    from tlops.tuning.pruning import TRIAL_ENV, epoch_reporter
    from tlops.tuning.study import open_study

    assert epoch_reporter() is None  # an ordinary run: no study, Optuna never imported for it
    t = TuneParams.model_validate({"space": SPACE, "startup_trials": 1})
    storage = f"sqlite:///{tmp_path / 'tune.db'}"
    study = open_study(t, "s", "pipeline", storage)
    done = study.ask({"finetune.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
    for step, value in ((1, 0.8), (2, 0.9)):
        done.report(value, step)
    study.tell(done, 0.9)
    trial = study.ask({"finetune.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
    os.environ[TRIAL_ENV] = json.dumps({"storage": storage, "study": study.study_name, "trial_id": trial._trial_id,
                                        "tune": t.model_dump(mode="json")})
    try:
        report = epoch_reporter()
        report({"step": 1, "val_metric": 0.85, "val_accuracy": 0.85}, 7)  # above the median at epoch 1: goes on
        with pytest.raises(TrialPruned, match=r"tune trial 1 pruned after fine-tuning epoch 2: validation metric "
                                              r"0\.5000"):
            report({"step": 2, "val_metric": 0.5, "val_accuracy": 0.5}, 8)
    finally:
        del os.environ[TRIAL_ENV]
    stored = optuna.load_study(study_name=study.study_name, storage=storage).trials[1]
    assert stored.intermediate_values == {1: 0.85, 2: 0.5} and stored.user_attrs["pruned_at"] == 2
    # the pipeline level's warm-up (half the fine-tuning epochs): far below the median at epoch 1 is not judged yet
    young = study.ask({"finetune.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
    os.environ[TRIAL_ENV] = json.dumps({"storage": storage, "study": study.study_name, "trial_id": young._trial_id,
                                        "tune": t.model_dump(mode="json"), "warmup_steps": 2})
    try:
        report = epoch_reporter()
        report({"step": 1, "val_metric": 0.1, "val_accuracy": 0.1}, 1)
        with pytest.raises(TrialPruned, match="after fine-tuning epoch 2"):
            report({"step": 2, "val_metric": 0.5, "val_accuracy": 0.5}, 2)
    finally:
        del os.environ[TRIAL_ENV]
    assert is_permanent(TrialPruned("x"))


def test_a_gain_within_the_validation_noise_is_reported_and_not_applied(tmp_path: Path, capsys) -> None:
    """The best trial's gain over the defaults, item by item on the validation items both runs scored (in any order),
    with its paired standard error; --apply writes the trial's values only when the gain is clear of
    tune.min_gain_se standard errors, else says why once and leaves params.yaml as it was."""
    import numpy as np

    from flows.tune import _apply, _validation_gain
    from tlops.core import paths
    from tlops.core.config import load_params

    rng, n = np.random.default_rng(0), 400
    sha, y = np.array([f"{i:064x}" for i in range(n)]), rng.integers(0, 4, n)
    before = y.copy()
    before[:40] = (y[:40] + 1) % 4  # the defaults: 90% right

    def run(folder: Path, predicted: np.ndarray) -> Path:
        (folder / paths.CALIBRATION_DIR).mkdir(parents=True)
        (folder / paths.METRICS).parent.mkdir(parents=True)
        (folder / paths.METRICS).write_text(json.dumps({"metric": "accuracy"}))
        order = rng.permutation(n)  # another order, and an item the other run never scored
        alone = hashlib.sha256(folder.name.encode()).hexdigest()
        np.savez(folder / paths.VAL_PREDICTIONS, sha256=np.r_[sha[order], [alone]], label=np.r_[y[order], 0],
                 predicted=np.r_[predicted[order], 1], classes=np.array(list("abcd")))
        return folder

    root = run(tmp_path / "defaults", before)
    fixed = before.copy()
    fixed[:8] = y[:8]  # 8 of the defaults' errors put right, nothing broken
    clear = _validation_gain(root, run(tmp_path / "clear", fixed), 2.0)
    assert clear["items"] == n and clear["gain"] == pytest.approx(8 / n) and clear["metric"] == "accuracy"
    # paired: only the 8 items that changed carry noise (about sqrt(8)/n), not two whole accuracies' (2.1 points)
    assert 0.6 * 8**0.5 / n < clear["se"] < 1.4 * 8**0.5 / n and clear["clear"]
    mixed = fixed.copy()
    mixed[100:106] = (y[100:106] + 1) % 4  # ... and 6 right ones broken: +2 items, 14 changed
    noise = _validation_gain(root, run(tmp_path / "mixed", mixed), 2.0)
    assert noise["gain"] == pytest.approx(2 / n) and noise["se"] > noise["gain"] / 2 and not noise["clear"]
    assert _validation_gain(root, tmp_path / "mixed", 0.0)["clear"]  # 0: whatever the gain
    assert _validation_gain(root, tmp_path / "nothing", 2.0) is None  # a run with no predictions: not judged

    params = tmp_path / "params.yaml"
    params.write_bytes((Path(__file__).parents[1] / "params.yaml").read_bytes())
    before_bytes = params.read_bytes()
    best = {"changes": {"finetune.lr": 0.002, "export.registered_model": "tlops-classifier-tune"}, "gain": noise}
    out = _apply(best, str(params))
    assert set(out) == {"not_applied"} and params.read_bytes() == before_bytes
    assert out["not_applied"].startswith("the best trial's validation gain, +0.50 points of accuracy, is under 2 "
                                         "standard errors")
    assert capsys.readouterr().err.count("not applied:") == 1
    assert _apply({**best, "gain": clear}, str(params)) == {"applied": {"finetune.lr": 0.002}}
    applied = load_params(params)
    assert applied.finetune.lr == 0.002 and applied.export.registered_model == "tlops-classifier"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_study_searches_both_levels_registers_its_best_and_applies_it(workspace: Path, prefect_api: str) -> None:
    import numpy as np
    import optuna

    from tlops.tracking import registry, runs

    # the params' size: 32; min_gain_se 0: a handful of validation images cannot tell trials apart, apply anyway
    _project(workspace, {**SPACE, "model.image_size": {"choices": [32, 48]}}, min_gain_se=0)
    workers = _workers(workspace)
    try:
        out = run_cmd([sys.executable, "-m", "tlops.cli", "tune", "--pool", POOL, "--budget", "800", "--apply",
                       "--json"], workspace)
    finally:
        _stop(workers)
    summary = json.loads(out.stdout[out.stdout.index("{"):])
    head, pipeline = summary["head"], summary["pipeline"]
    assert head["trials"] == 4 and head["complete"] + head["pruned"] == 4
    # trial 0 is the defaults' run (already made, not rerun), then tune.trials runs on the pool
    assert pipeline["trials"] == 3 and pipeline["complete"] == 3, pipeline
    storage = f"sqlite:///{workspace / '.tlops/tune.db'}"
    trials = optuna.load_study(study_name=pipeline["study"], storage=storage).trials
    assert trials[0].user_attrs["defaults"] and trials[0].value == summary["defaults"]["val_metric"]
    assert trials[0].params == {"finetune.lr": 0.001}  # params.yaml's default
    # the input size is searched by the head trials, on features extracted once at each size, then fixed
    sizes = [t.params["model.image_size"] for t in optuna.load_study(study_name=head["study"], storage=storage).trials]
    assert set(sizes) == {32, 48}, sizes
    assert len(list((workspace / ".tlops/tune/features").glob("*/dataset.npz"))) == 1  # 48 px; 32 is the stage's
    assert all(t.user_attrs["changes"]["model.image_size"] == head["best_changes"]["model.image_size"]
               for t in trials[1:])
    assert pipeline["reserve_s"] > 0  # the defaults' adapt, evaluate and export: no trial starts into that time
    if not head["best_is_defaults"]:  # the first trial: the defaults' fine-tuning with the head level's findings
        assert trials[1].params == trials[0].params and trials[1].user_attrs["changes"] != {}
    best = pipeline["best"]
    assert best["val_metric"] == max(t.value for t in trials)
    # a trial's run stops after fine-tuning (its score is the finetune stage's selection); only the best one's goes
    # on to evaluation and export
    for t in trials[1:]:
        folder = Path(t.user_attrs["folder"])
        assert (folder / "models/finetuned/model.json").exists(), t.number
        assert (folder / "reports/metrics.json").exists() == (t.number == best["trial"]), t.number
        assert (folder / "models/model.onnx").exists() == (t.number == best["trial"]), t.number
    assert isinstance(best["test_score"], float) and isinstance(summary["defaults"]["test_score"], float)
    from tlops.core.config import load_params

    c = runs.client()
    children = c.search_runs([runs.experiment_id(c)], f"tags.mlflow.parentRunId = '{summary['mlflow_parent_run_id']}'")
    assert sorted(r.data.tags["tlops.level"] for r in children) == ["head"] * 4 + ["pipeline"] * 2
    if best.get("defaults"):  # no trial beat them: nothing registered, nothing applied
        assert "registered" not in best and "applied" not in summary
        assert load_params(workspace / "params.yaml").finetune.lr == 0.001
        return
    # its gain, item by item on the validation split, from the two exported models' predictions: the very gain the
    # study ranked it by
    gain = best["gain"]
    assert gain["gain"] == pytest.approx(best["val_metric"] - summary["defaults"]["val_metric"], abs=1e-6), gain
    assert gain["items"] == len(np.load(workspace / "models/calibration/val_predictions.npz")["sha256"]) > 0
    assert gain["clear"] and gain["se"] >= 0
    # every pipeline trial ran with the best head settings fixed and its own fine-tuning lr
    for key in ("head.lrs", "head.weight_decays"):
        assert best["changes"][key] == head["best_changes"][key]
    assert 0.0003 <= best["changes"]["finetune.lr"] <= 0.003
    # registered in the project's store as <model>-tune, candidate; the production model's champion untouched
    assert summary["pipeline"]["best"]["registered"]["name"] == "tlops-classifier-tune"
    assert registry.get_alias_version("tlops-classifier-tune", "candidate") == best["registered"]["version"]
    assert all(r.info.status in ("FINISHED", "KILLED") for r in children)
    assert c.get_run(summary["mlflow_parent_run_id"]).info.status == "FINISHED"
    for name in ("head_history.png", "pipeline_history.png", "head_importances.png", "summary.json"):
        assert (workspace / "reports/tune" / name).stat().st_size > 0, name
    # --apply: the best trial's values in params.yaml, so the next `tlops run` reproduces it
    applied = load_params(workspace / "params.yaml")
    assert applied.finetune.lr == pytest.approx(best["changes"]["finetune.lr"])
    assert applied.head.lrs == best["changes"]["head.lrs"]
    assert applied.export.registered_model == "tlops-classifier"


def _head_trials(db: Path) -> int:
    """Trials of the head study, read without Optuna: loading a study writes its schema, which would race the
    study's own creation in the process under test."""
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
            return con.execute("SELECT count(*) FROM trials JOIN studies USING (study_id) WHERE study_name = ?",
                               ("tlops-classifier-tune.head",)).fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_killed_study_resumes_where_it_was(workspace: Path, prefect_api: str) -> None:
    """kill -9 in the middle of the head level; the same command continues the study (its trial count grows from
    where it was) and leaves no MLflow run RUNNING."""
    import optuna

    from tlops.tracking import runs

    _project(workspace, head_trials=400, trials=0)
    storage = f"sqlite:///{workspace / '.tlops/tune.db'}"
    cmd = [sys.executable, "-m", "tlops.cli", "tune", "--pool", POOL, "--json"]
    log = workspace.parent / "tune.log"
    proc = subprocess.Popen(cmd, cwd=workspace, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(1)
            if _head_trials(workspace / ".tlops/tune.db") >= 3:
                break
        assert proc.poll() is None, f"tlops tune ended before it was killed:\n{log.read_text()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = len(optuna.load_study(study_name="tlops-classifier-tune.head", storage=storage).trials)
    assert before >= 3
    out = run_cmd([*cmd, "--head-trials", str(before + 3)], workspace)
    summary = json.loads(out.stdout[out.stdout.index("{"):])
    after = optuna.load_study(study_name="tlops-classifier-tune.head", storage=storage).trials
    assert len(after) >= before + 3 and summary["head"]["trials"] == len(after)
    assert all(t.state.name != "RUNNING" for t in after)
    c = runs.client()
    where = hashlib.sha256(storage.encode()).hexdigest()[:16]  # this study's parent (the store is the session's)
    studies = c.search_runs([runs.experiment_id(c)], f"tags.`tlops.kind` = 'tune' and tags.`tlops.study_storage` = "
                                                     f"'{where}'")
    assert len(studies) == 1 and studies[0].info.run_id == summary["mlflow_parent_run_id"]  # one parent, reopened
    assert not c.search_runs([runs.experiment_id(c)], "attributes.status = 'RUNNING'")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_pruned_trial_run_ends_pruned_with_its_checkpoint_kept(workspace: Path, prefect_api: str,
                                                                  tmp_path: Path) -> None:
    """A pipeline trial (the sweep-trial flow, in its own clone) whose first fine-tuning epoch is below the study's
    median there: its run stops after that epoch; the Prefect state says Pruned, the MLflow finetune run is KILLED
    with tlops.outcome pruned, the epoch's checkpoint is kept."""
    import mlflow
    import optuna

    from flows.sweep import trial_flow
    from tlops.core import paths
    from tlops.core.config import TuneParams
    from tlops.tuning.pruning import TRIAL_ENV
    from tlops.tuning.study import open_study

    _project(workspace)
    t = TuneParams.model_validate({"space": SPACE, "startup_trials": 1})
    storage = f"sqlite:///{tmp_path / 'tune.db'}"
    study = open_study(t, "p", "pipeline", storage)
    lr = {"finetune.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}
    done = study.ask(lr)
    done.report(2.0, 1)  # above any accuracy: the next trial is below the median at epoch 1
    study.tell(done, 2.0)
    trial = study.ask(lr)
    env = {TRIAL_ENV: json.dumps({"storage": storage, "study": study.study_name, "trial_id": trial._trial_id,
                                  "tune": t.model_dump(mode="json")})}
    folder = tmp_path / "trial"
    state = trial_flow(str(workspace), str(folder), {"finetune.lr": trial.params["finetune.lr"]}, env=env,
                       return_state=True)
    assert state.name == "Pruned" and state.is_completed(), state
    assert "tune trial 1 pruned after fine-tuning epoch 1" in state.message
    stored = optuna.load_study(study_name=study.study_name, storage=storage).trials[1]
    assert list(stored.intermediate_values) == [1] and stored.user_attrs["pruned_at"] == 1
    assert any((folder / paths.CHECKPOINT_DIR).iterdir())  # the pruned epoch's checkpoint stays
    c = mlflow.MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    finetune = c.search_runs([e.experiment_id for e in c.search_experiments()], "tags.stage = 'finetune'")
    assert [(r.info.status, r.data.tags.get("tlops.outcome")) for r in finetune] == [("KILLED", "pruned")]
    assert not (folder / paths.FINETUNE_DIR / "model.safetensors").exists()  # the stage stopped, wrote no model


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_trial_stops_after_fine_tuning_and_the_same_run_completes_it(workspace: Path, prefect_api: str,
                                                                       tmp_path: Path) -> None:
    """A pipeline trial's run (the sweep-trial flow, until the finetune stage) is scored by the finetune stage's
    selection without evaluating or exporting anything; the best trial's run, started again on its folder, runs only
    the stages after fine-tuning and leaves the test scores and the ONNX model that registration reads."""
    import mlflow

    from flows.sweep import trial_flow
    from flows.tune import TRIAL_UNTIL, _run_scores
    from tlops.core import paths

    _project(workspace)
    folder, changes = tmp_path / "trial", {"finetune.lr": 0.002}
    trial_flow(str(workspace), str(folder), changes, until=TRIAL_UNTIL)
    scored = _run_scores(folder)
    info = json.loads((folder / paths.FINETUNE_INFO).read_text())
    assert scored["val_metric"] == info["selection"][info["selected"]]["val_metric"]
    assert "test_score" not in scored
    assert not (folder / paths.METRICS).exists() and not (folder / paths.ONNX).exists()

    def stages() -> list[str]:
        c = mlflow.MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
        return sorted(r.data.tags["stage"] for r in c.search_runs(
            [e.experiment_id for e in c.search_experiments()], "tags.stage != ''"))

    before = stages()
    assert "finetune" in before and "evaluate" not in before and "export" not in before
    trial_flow(str(workspace), str(folder), changes)
    ran = Counter(stages()) - Counter(before)  # the stages run this time: only those after fine-tuning
    assert ran == Counter(["ingest_target", "adapt", "evaluate", "export"]), ran
    done = _run_scores(folder)
    assert done["val_metric"] == scored["val_metric"] and isinstance(done["test_score"], float)
    assert (folder / paths.ONNX).exists()


# --- the shared PostgreSQL (postgres_server: the real server the shared MLflow store's tests run on) ----------------

PG_PASSWORD = "tune-Secret-8f3a"  # the server trusts loopback and ignores it: tlops must still never show it


def _pg_storage(postgres_server: str, database: str) -> str:
    """A database of its own on the shared server, as tune.storage would name it: with a user and a password."""
    return create_database(postgres_server, database).replace("://postgres@", f"://postgres:{PG_PASSWORD}@", 1)


# A second process on the same storage, as a resumed `tlops tune` (the head study) and a pool worker reporting a
# pipeline trial's fine-tuning epochs ($TLOPS_TUNE_TRIAL) would be: what it saw first, what it did, as JSON.
_OTHER_PROCESS = """
import json, sys
import optuna
from tlops.core.config import TuneParams
from tlops.core.errors import TrialPruned
from tlops.tuning.pruning import epoch_reporter
from tlops.tuning.study import open_study, storage_url

t = TuneParams.model_validate(json.loads(sys.argv[1]))
head = open_study(t, "s", "head", storage_url(t))
seen = [trial.number for trial in head.trials]
asked = []
for value in (0.7, 0.4):
    trial = head.ask({"head.lrs": optuna.distributions.FloatDistribution(1e-3, 5e-2, log=True)})
    head.tell(trial, value)
    asked.append(trial.number)
report = epoch_reporter()
report({"step": 1, "val_metric": 0.85, "val_accuracy": 0.85}, 1)
try:
    report({"step": 2, "val_metric": 0.5, "val_accuracy": 0.5}, 2)
    pruned = False
except TrialPruned:
    pruned = True
print(json.dumps({"seen": seen, "asked": asked, "pruned": pruned}))
"""


def test_a_study_on_the_shared_postgresql_is_continued_by_another_process(postgres_server: str,
                                                                         tmp_path: Path) -> None:
    """tune.storage naming the shared PostgreSQL: both levels' studies live there apart, and another process (a
    resumed tune, a worker on another machine) continues them: trial numbers go on from where they were, a pipeline
    trial's epochs reported there reach the pruner, which stops it."""
    import optuna
    import psycopg

    from tlops.core.config import TuneParams
    from tlops.core.secrets import without_password
    from tlops.tuning.pruning import TRIAL_ENV
    from tlops.tuning.study import open_study, storage_url

    t = TuneParams.model_validate({"space": SPACE, "storage": _pg_storage(postgres_server, "tune_study"),
                                   "startup_trials": 1})
    storage = storage_url(t)
    assert storage.startswith("postgresql+psycopg://")  # the driver tlops installs, whatever SQLAlchemy's default
    head = open_study(t, "s", "head", storage)
    for value in (0.5, 0.6):
        head.tell(head.ask({"head.lrs": optuna.distributions.FloatDistribution(1e-3, 5e-2, log=True)}), value)
    pipeline = open_study(t, "s", "pipeline", storage)
    lr = {"finetune.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}
    done = pipeline.ask(lr)
    for step, value in ((1, 0.8), (2, 0.9)):
        done.report(value, step)
    pipeline.tell(done, 0.9)
    trial = pipeline.ask(lr)
    sent = without_password(storage)  # what flows/tune.py gives a worker: Prefect stores a flow run's parameters
    assert PG_PASSWORD not in sent and sent.split("@")[0].endswith("://postgres")
    env = {TRIAL_ENV: json.dumps({"storage": sent, "study": pipeline.study_name, "trial_id": trial._trial_id,
                                  "tune": t.model_dump(mode="json")}), "PGPASSWORD": PG_PASSWORD}
    proc = run_cmd([sys.executable, "-c", _OTHER_PROCESS, json.dumps(t.model_dump(mode="json"))], tmp_path, env=env)
    other = json.loads(proc.stdout.strip().splitlines()[-1])
    assert other == {"seen": [0, 1], "asked": [2, 3], "pruned": True}
    assert PG_PASSWORD not in proc.stdout + proc.stderr

    head = open_study(t, "s", "head", storage)  # as the next `tlops tune` would
    assert [(tr.number, tr.value) for tr in head.trials] == [(0, 0.5), (1, 0.6), (2, 0.7), (3, 0.4)]
    assert head.best_value == 0.7
    stored = open_study(t, "s", "pipeline", storage).trials
    assert len(stored) == 2 and stored[1].intermediate_values == {1: 0.85, 2: 0.5}
    assert stored[1].user_attrs["pruned_at"] == 2
    # the two levels are two studies in that one database, on the server itself (no other storage stood in for it)
    with psycopg.connect(f"{postgres_server}/tune_study") as conn:
        rows = conn.execute("SELECT study_name, count(trial_id) FROM studies LEFT JOIN trials USING (study_id) "
                            "GROUP BY study_name ORDER BY study_name").fetchall()
    assert rows == [("s.head", 4), ("s.pipeline", 2)]


def test_tune_runs_its_head_level_on_postgresql_resumes_it_and_never_shows_the_password(
        trained: Path, postgres_server: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
        caplog: pytest.LogCaptureFixture) -> None:
    """`tlops tune` (head keys only) with tune.storage on the shared PostgreSQL, on a finished workspace's cached
    features; run again with more head trials it continues the same study and MLflow parent run. The password of the
    storage URL appears in nothing it prints, logs, writes or tracks."""
    import psycopg

    import flows.pipeline
    from flows.tune import SUMMARY, tune
    from tlops.tracking import runs

    storage = _pg_storage(postgres_server, "tune_head") + f"?password={PG_PASSWORD}&connect_timeout=10"
    params = yaml.safe_load((trained / "params.yaml").read_text())
    params["tune"].update(space={k: v for k, v in SPACE.items() if k.startswith("head.")}, head_trials=3, trials=0,
                          storage=storage, pruner="none")
    (trained / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # the defaults' `tlops run`: the fixture ran its stages already (the features are cached); no pipeline again
    monkeypatch.setattr(flows.pipeline, "run_pipeline", lambda params_path=None: {})

    first = tune()
    second = tune(head_trials=5)
    assert (first["head"]["trials"], second["head"]["trials"]) == (3, 5)
    assert second["head"]["complete"] == 5 and second["pipeline"] is None
    assert first["mlflow_parent_run_id"] == second["mlflow_parent_run_id"]  # the parent run reopened
    with psycopg.connect(f"{postgres_server}/tune_head") as conn:
        numbers = [n for (n,) in conn.execute("SELECT number FROM trials JOIN studies USING (study_id) WHERE "
                                              "study_name = 'tlops-classifier-tune.head' ORDER BY number")]
    assert numbers == [0, 1, 2, 3, 4]

    shown = capsys.readouterr()
    port = postgres_server.rsplit(":", 1)[1]
    assert f"study tlops-classifier-tune in postgresql+psycopg://127.0.0.1:{port}/tune_head?password=***" in shown.err
    c = runs.client()
    tracked = [c.get_run(first["mlflow_parent_run_id"]), *c.search_runs(
        [runs.experiment_id(c)], f"tags.mlflow.parentRunId = '{first['mlflow_parent_run_id']}'")]
    assert len(tracked) == 1 + 5
    for text in (shown.out, shown.err, caplog.text, (trained / SUMMARY).read_text(), json.dumps(second),
                 *(json.dumps([r.data.params, r.data.tags]) for r in tracked)):
        assert PG_PASSWORD not in text
