"""Domain adaptation: the target domain's data, each method on two synthetic domains, no target label in training,
`none` passing the model through, resuming after SIGKILL, and the downstream stages scoring the adapted model."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    TRAINING_STAGES,
    deep_update,
    make_domain_images,
    make_workspace,
    run_stage_tasks,
    use_copy,
    write_params,
)
from PIL import Image
from safetensors.torch import load_file

from tlops.adapt import losses, methods, run, summary
from tlops.core import paths
from tlops.core.config import load_params, parse_params
from tlops.core.errors import ConfigError
from tlops.core.io import read_json, sha256_file
from tlops.data.manifest import load_manifest
from tlops.data.target import adapt_paths, load_target, scored_items
from tlops.data.target_ingest import ingest_target_folder
from tlops.onnx import metadata

# A source task the tiny random-init backbone learns fully (its BatchNorm statistics estimated on the source), and
# adaptation that runs in a second or two.
PARAMS = {
    "head": {"epochs": 40, "lrs": [0.03]},
    "finetune": {"epochs": 4, "batchnorm": "train", "unfreeze_groups": 5, "lr": 0.01, "head_lr": 0.01},
    "adapt": {"lr": 0.01, "head_lr": 0.01, "epochs": 4, "batch_size": 8, "batchnorm": "mixed", "unfreeze_groups": 3,
              "test_fraction": 0.5},
}


@pytest.fixture(scope="module")
def domains_workspace(tmp_path_factory: pytest.TempPathFactory, mlflow_store: str) -> Path:
    """Source patterns on dark backgrounds, trained through finetune; the same patterns, faint on bright tinted
    backgrounds, as the labelled target folder (adapt.target)."""
    root = tmp_path_factory.mktemp("domains")
    make_domain_images(root / "source", "source", per_class=30, seed=0)
    make_domain_images(root / "target", "target", per_class=30, seed=1)
    ws = make_workspace(root / "ws")
    write_params(ws, deep_update(PARAMS, {"data": {"source": "imagefolder", "path": str(root / "source")},
                                          "adapt": {"target": str(root / "target")}}))
    run_stage_tasks(ws, (*TRAINING_STAGES, "ingest_target"), mlflow_store, "domains-workspace")
    return ws


@pytest.fixture
def domains(domains_workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return use_copy(domains_workspace, tmp_path / "ws", monkeypatch)


def _with(method: str, **adapt) -> object:
    params = load_params()
    return params.model_copy(update={"adapt": params.adapt.model_copy(update={"method": method, **adapt})})


def _run(params) -> tuple[run.AdaptResult, dict]:
    manifest, rows = load_manifest(paths.MANIFEST), load_target(paths.TARGET_MANIFEST)
    result = run.adapt_model(params, manifest, rows)
    return result, summary.adaptation_report(result, params, manifest, rows, 0.0)


# ---------------------------------------------------------------- the target data


def test_target_folder_splits_by_content_quarantines_broken_files_and_keeps_flat_images_unlabelled(workspace: Path):
    target = workspace.parent / "target"
    make_domain_images(target, "target", per_class=12, seed=3)
    make_domain_images(target, "flat", per_class=2, seed=4, flat=True)  # no class folder: no label
    make_domain_images(target / "other", "other", per_class=2, seed=5, flat=True)  # not a source class
    (target / "class_0" / "broken.png").write_bytes(Image.new("RGB", (8, 8)).tobytes()[:20])
    (target / "class_1" / "empty.jpg").write_bytes(b"")
    params = parse_params(deep_update(load_params().model_dump(mode="json"), {"adapt": {"target": str(target)}}))
    report = ingest_target_folder(params)
    assert {q["path"].rsplit("/", 1)[-1]: q["reason"] for q in report["quarantined"]} == {
        "broken.png": "not_an_image", "empty.jpg": "empty_file"}
    rows = load_target()
    assert len(rows) == 36 + 6 + 6 and report["totals"]["labelled"] == 42
    flat = [r for r in rows if r.label == ""]
    assert len(flat) == 6 and all(r.split == "adapt" for r in flat)  # nothing to hold out without a label
    test_paths, y, unknown = scored_items(rows, ["class_0", "class_1", "class_2"])
    assert {r.split for r in rows} == {"adapt", "test"} and len(test_paths) == len(y)
    assert unknown in ([], ["other"]) and not any("/other/" in p for p in test_paths)  # never scored as a class
    before = {r.sha256: r.split for r in rows}
    make_domain_images(target / "class_2", "more", per_class=5, seed=9, flat=True)
    ingest_target_folder(params)
    after = {r.sha256: r.split for r in load_target()}
    assert len(after) == len(before) + 15
    assert all(after[sha] == split for sha, split in before.items())  # no image moves as the folder grows


def test_a_method_without_a_target_is_a_config_error():
    with pytest.raises(ConfigError, match="adapt.target"):
        parse_params({"adapt": {"method": "mcc"}})


# ---------------------------------------------------------------- the methods


@pytest.mark.parametrize("method", methods.METHODS)
def test_each_method_improves_target_accuracy_and_measures_the_shift(domains: Path, method: str):
    result, report = _run(_with(method))
    target = report["target"]
    assert target["adapted"]["accuracy"] > target["source_only"]["accuracy"], target
    assert report["shift"]["domain_auc"] > 0.9  # the two domains are told apart easily: a real shift
    assert report["method"] == report["chosen"] == method
    assert read_json(paths.ADAPT_INFO)["adapt"]["chosen"] == method
    assert sha256_file(paths.ADAPT_WEIGHTS) != sha256_file(paths.FINETUNE_WEIGHTS)


def test_auto_reports_every_candidate_and_chooses_without_target_labels(domains: Path):
    result, report = _run(_with("auto"))
    assert set(report["candidates"]) == {"none", *methods.METHODS}
    assert report["chosen"] in report["candidates"] and "agreement with the ensemble" in report["criterion"]
    rows = report["candidates"]
    admissible = [m for m, row in rows.items() if row["source_val"] >= rows["none"]["source_val"] - 0.01 - 1e-9]
    assert {m for m, row in rows.items() if row["agreement"] is not None} == set(admissible)
    raced = [m for m in methods.TRAINED if rows[m]["pruned_at"] is None]
    assert len(raced) == 1 and [rows[m]["pruned_at"] for m in methods.TRAINED if m not in raced] == [1]
    assert rows[raced[0]]["epochs"] == 4  # the race's winner trains to adapt.epochs, the other stopped after one
    finishers = [m for m in admissible if rows[m]["pruned_at"] is None]
    assert report["chosen"] == max(finishers, key=lambda m: (rows[m]["agreement"], m == "none"))


def test_a_method_stopped_by_the_race_and_continued_ends_with_the_weights_of_one_uninterrupted_run(domains: Path):
    import torch

    from tlops.models.classifier import load_classifier

    params, device = _with("self_training"), torch.device("cpu")
    model, info = load_classifier(paths.FINETUNE_DIR)
    d = run.domains(params, load_manifest(paths.MANIFEST), load_target(paths.TARGET_MANIFEST), info,
                    paths.FEATURES_IMAGES, paths.TARGET_IMAGES)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    methods.train_method("self_training", model, d, params, domains / "raced", "f", device, until=2)
    known = (2, methods.target_probs(model, d, device))  # the race's score pass, reused as the next pseudo-labels
    model.load_state_dict(start)
    history, resumed = methods.train_method("self_training", model, d, params, domains / "raced", "f", device,
                                            known=known)
    raced = {k: v.clone() for k, v in model.state_dict().items()}
    assert resumed == 2 and len(history) == params.adapt.epochs
    model.load_state_dict(start)
    methods.train_method("self_training", model, d, params, domains / "alone", "f", device)
    assert any(not torch.equal(start[k], raced[k]) for k in start)
    assert all(torch.allclose(raced[k].float(), v.float(), rtol=1e-5, atol=1e-6)
               for k, v in model.state_dict().items())


def test_the_methods_train_the_top_over_the_trunk_cached_once_as_over_the_whole_backbone(domains: Path, tmp_path: Path,
                                                                                         monkeypatch):
    import torch

    from tlops.training.trunk import TrunkCache

    written = []
    original = TrunkCache._write
    monkeypatch.setattr(TrunkCache, "_write", lambda self, keys, rows: written.append(len(keys)) or
                        original(self, keys, rows))
    params = _with("self_training")
    manifest, rows = load_manifest(paths.MANIFEST), load_target(paths.TARGET_MANIFEST)
    cached = run.adapt_model(params, manifest, rows, out_dir=tmp_path / "cached", checkpoint_dir=tmp_path / "c1")
    cut = methods.trained_cut(cached.model, params)
    assert 0 < cut < len(cached.domains.trunk.groups)  # adapt.unfreeze_groups 3 of 4: one group below the cut
    d = cached.domains
    # Each row once: the evaluation view of the target and the source validation images under the fine-tuned trunk
    # and again under the mixed BatchNorm statistics training runs with; each epoch's view of both domains.
    assert sum(written) == 2 * (len(d.target) + len(d.source_val)) + params.adapt.epochs * (
        len(d.source_train) + len(d.target))
    assert sorted((tmp_path / "c1" / "trunk").glob("trunk-*.keys.npy"))
    a = {k: v.clone() for k, v in cached.model.state_dict().items()}
    whole_params = params.model_copy(update={"finetune": params.finetune.model_copy(update={"trunk_cache": False})})
    whole = run.adapt_model(whole_params, manifest, rows, out_dir=tmp_path / "whole", checkpoint_dir=tmp_path / "c2")
    assert whole.domains.trunk is None and not (tmp_path / "c2" / "trunk").exists()
    b = whole.model.state_dict()
    assert any(not torch.equal(a[k], v) for k, v in cached.source_only.state.items())
    for k in a:  # the trunk ran on ONNX Runtime, the whole backbone on PyTorch: float rounding apart
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    # rows are the trunk's own: other BatchNorm statistics below the cut (adapt.batchnorm mixed) are another trunk
    trunk = cached.domains.trunk
    before = trunk.weights(cut)
    norm = next(m for g in trunk.groups[:cut] for m in g.modules() if isinstance(m, torch.nn.BatchNorm2d))
    norm.running_mean += 0.5
    assert trunk.weights(cut) != before


def test_choose_goes_by_agreement_with_the_ensemble_of_the_models_within_the_source_drop():
    truth = np.arange(30) % 3
    onehot = np.eye(3)

    def cand(name: str, right: int, val: float, wrong: int = 1, confidence: float = 0.9) -> methods.Candidate:
        pred = np.where(np.arange(30) < right, truth, (truth + wrong) % 3)  # right on the first `right` images
        probs = onehot[pred] * (confidence - (1 - confidence) / 2) + (1 - confidence) / 2
        return methods.Candidate(name, {}, probs, val, 0.0)

    none = cand("none", 24, 0.90)
    good, overconfident = cand("self_training", 27, 0.90, wrong=2), cand("mcc", 15, 0.90, wrong=2, confidence=0.999)
    chosen, agreement = run.choose(none, {"self_training": good, "mcc": overconfident}, 0.01)
    assert chosen == "self_training" and overconfident.im > good.im  # the confidence score would have picked mcc
    assert run.choose(none, {"self_training": cand("self_training", 27, 0.80)}, 0.01)[0] == "none"
    assert set(run.choose(none, {"mcc": cand("mcc", 27, 0.80)}, 0.01)[1]) == {"none"}  # source fell too far


def test_losses_and_pseudo_labels():
    import torch

    confident = torch.tensor([[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0]])
    confused = torch.tensor([[1.0, 1.0, 0], [1.0, 1.0, 0], [0, 0, 1.0]])
    assert losses.mcc_loss(confident, 2.5) < losses.mcc_loss(confused, 2.5)
    probs = np.array([[0.95, 0.05], [0.6, 0.4], [0.55, 0.45], [0.3, 0.7]])
    labels, weights = losses.pseudo_labels(probs, confidence=0.9, class_share=0.5)
    assert labels.tolist() == [0, 0, 0, 1]
    assert weights[2] == 0 and weights[0] > 0 and weights[3] > 0  # class 1's only image counts as much as class 0
    assert weights[0] + weights[1] == pytest.approx(weights[3])
    assert losses.information_maximisation(np.eye(3)) == pytest.approx(1.0)
    assert losses.information_maximisation(np.full((3, 3), 1 / 3)) == pytest.approx(0.0, abs=1e-9)


def test_no_target_label_reaches_training_shuffled_labels_give_identical_weights(domains: Path, tmp_path: Path):
    params = _with("self_training", epochs=2)
    _run(params)
    first = load_file(str(paths.ADAPT_WEIGHTS))
    # The same images filed under shuffled class folders: the labels change, nothing else.
    shuffled = tmp_path / "shuffled"
    files = sorted(Path(params.adapt.target).rglob("*.png"))
    rng = np.random.default_rng(5)
    for f, c in zip(files, rng.permutation([f.parent.name for f in files]), strict=True):
        (shuffled / c).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, shuffled / c / f.name)
    shutil.rmtree(paths.ADAPT_CHECKPOINTS)
    relabelled = params.model_copy(update={"adapt": params.adapt.model_copy(update={"target": str(shuffled)})})
    adapt_before = sorted(r.sha256 for r in load_target() if r.split == "adapt")
    labels_before = {r.sha256: r.label for r in load_target()}
    ingest_target_folder(relabelled)
    assert sorted(r.sha256 for r in load_target() if r.split == "adapt") == adapt_before
    assert sum(labels_before[r.sha256] != r.label for r in load_target()) > len(labels_before) // 3
    _run(relabelled)
    second = load_file(str(paths.ADAPT_WEIGHTS))
    assert first.keys() == second.keys()
    diff = max(float(np.abs(first[k].numpy() - second[k].numpy()).max()) for k in first)
    assert diff == 0.0, diff


def test_method_none_passes_the_fine_tuned_model_through_and_still_measures_the_shift(domains: Path):
    result, report = _run(_with("none"))
    assert sha256_file(paths.ADAPT_WEIGHTS) == sha256_file(paths.FINETUNE_WEIGHTS)
    assert report["chosen"] == "none" and report["shift"]["domain_auc"] > 0.9
    assert report["target"]["adapted"] == report["target"]["source_only"]


def test_without_a_target_the_stage_is_a_no_op(trained: Path):
    from tasks.adapt import adapt as adapt_task
    from tasks.ingest_target import ingest_target as ingest_target_task

    ingest_target_task.fn()
    assert load_target() == [] and paths.TARGET.is_dir()
    adapt_task.fn()
    assert sha256_file(paths.ADAPT_WEIGHTS) == sha256_file(paths.FINETUNE_WEIGHTS)
    assert read_json(paths.ADAPT_REPORT)["shift"] is None and paths.ADAPT_CHECKPOINTS.is_dir()


# ---------------------------------------------------------------- crash and resume


RUN_ADAPT = """
import sys
from tlops.adapt.run import adapt_model
from tlops.core import paths
from tlops.core.config import load_params
from tlops.data.manifest import load_manifest
from tlops.data.target import load_target
p = load_params()
p = p.model_copy(update={"adapt": p.adapt.model_copy(update={"method": "self_training", "epochs": int(sys.argv[1])})})
r = adapt_model(p, load_manifest(paths.MANIFEST), load_target(paths.TARGET_MANIFEST))
print(r.candidates["self_training"].resumed_epochs)
"""


@pytest.mark.slow
def test_sigkill_during_adapt_then_rerun_resumes_to_the_uninterrupted_weights(domains: Path, tmp_path: Path):
    other = tmp_path / "other"
    shutil.copytree(domains, other, symlinks=True)
    epochs = 12
    first = domains / paths.ADAPT_CHECKPOINTS / "self_training" / "epoch_0001.pt"
    run = subprocess.Popen([sys.executable, "-c", RUN_ADAPT, str(epochs)], cwd=domains)
    deadline = time.monotonic() + 300
    while not first.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert run.returncode == -signal.SIGKILL, "adaptation finished before it could be killed"
    resumed = subprocess.run([sys.executable, "-c", RUN_ADAPT, str(epochs)], cwd=domains, capture_output=True,
                             text=True, check=True)
    assert 1 <= int(resumed.stdout.split()[-1]) < epochs
    fresh = subprocess.run([sys.executable, "-c", RUN_ADAPT, str(epochs)], cwd=other, capture_output=True, text=True,
                           check=True)
    assert int(fresh.stdout.split()[-1]) == 0
    a, b = load_file(str(domains / paths.ADAPT_WEIGHTS)), load_file(str(other / paths.ADAPT_WEIGHTS))
    assert all(np.allclose(a[k].numpy(), b[k].numpy(), rtol=1e-5, atol=1e-6) for k in a)


# ---------------------------------------------------------------- downstream


def test_evaluate_and_export_score_the_adapted_model_and_gate_on_the_target_test_split(domains: Path):
    from tasks.adapt import adapt as adapt_task
    from tasks.evaluate import evaluate as evaluate_task
    from tasks.export import export as export_task

    write_params(domains, deep_update(PARAMS, {
        "data": {"source": "imagefolder", "path": load_params().data.path},
        "adapt": {"target": load_params().adapt.target, "method": "adabn"},
        "export": {"registered_model": f"adapt-{os.getpid()}-{time.monotonic_ns()}"}}))
    adapt_task.fn()
    report = read_json(paths.ADAPT_REPORT)
    evaluate_task.fn()
    metrics = read_json(paths.METRICS)
    assert metrics["adapt"]["chosen"] == "adabn" and metrics["exported"] == metrics["adapted"]
    assert metrics["target"]["adapted"]["accuracy"] == pytest.approx(report["target"]["adapted"]["accuracy"])
    assert metrics["target"]["source_only"]["accuracy"] == pytest.approx(report["target"]["source_only"]["accuracy"])
    for name in ("source_only", "adapted"):
        assert (paths.PLOTS_DIR / f"target_confusion_{name}.png").stat().st_size > 0
    export_task.fn()
    exported = read_json(paths.EXPORT_REPORT)
    assert exported["gate"]["split"] == "target test" and exported["promotion"]["split"] == "target test"
    assert exported["gate"]["images"] == report["target"]["n_test"]
    assert exported["gate"]["score"] == pytest.approx(report["target"]["adapted"]["accuracy"], abs=1e-6)
    meta = metadata.read_metadata(paths.ONNX)
    assert meta[metadata.ADAPT_METHOD] == "adabn"
    assert meta[metadata.TARGET_DATA_VERSION] == report["target_data_version"] != ""
    assert len(adapt_paths(load_target())) == report["target_images"]["adapt"]
