"""Head training on cached features and fine-tuning: grid, early stopping, freeze invariants, schedule, resume."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, TINY, deep_update, make_images
from safetensors.torch import load_file, save_file

from tlops.core import paths
from tlops.core.config import HeadParams, Params, parse_params
from tlops.core.errors import NonFiniteLossError
from tlops.core.io import sha256_file
from tlops.data import manifest, prepare
from tlops.features.dataset import load_feature_dataset
from tlops.features.extract import extract_features
from tlops.models.backbones import create_backbone
from tlops.models.classifier import load_classifier
from tlops.models.heads import build_head, load_head
from tlops.training.epochs import HISTORY_COLUMNS
from tlops.training.finetune import finetune_model, keep_best
from tlops.training.head import save_head, train_head_grid
from tlops.training.loaders import ImageDataset
from tlops.training.schedule import lr_factor, param_groups, set_trainable, small_data_scale, unfrozen_at, warmup_steps


@dataclass
class Arrays:
    """Feature arrays shaped like tlops.features.FeatureDataset, for tests that need no backbone."""

    features: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    classes: list[str]
    meta: dict = field(default_factory=dict)

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        keep = self.splits == name
        return self.features[keep], self.labels[keep]


def blobs(n: int = 240, dim: int = 16, classes: int = 3, noise: float = 1.0, seed: int = 0) -> Arrays:
    """Gaussian clusters, split 2:1 into train and val."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centres = rng.normal(size=(classes, dim)) * 2.0
    x = (centres[labels] + noise * rng.normal(size=(n, dim))).astype(np.float32)
    splits = np.where(np.arange(n) % 3 == 0, "val", "train")
    return Arrays(x, labels.astype(np.int64), splits, [f"c{i}" for i in range(classes)], {"backbone": "tiny_test"})


def tiny_params(**finetune) -> Params:
    raw = deep_update(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    return parse_params(deep_update(raw, {"finetune": finetune}))


# ---------------------------------------------------------------- head


def test_head_grid_keeps_the_config_with_best_val_accuracy():
    params = HeadParams(epochs=15, lrs=[1e-6, 0.05], weight_decays=[0.0, 1e-3], patience=15)
    result = train_head_grid(blobs(), params)
    assert [(g["lr"], g["weight_decay"]) for g in result.grid] == [(1e-6, 0.0), (1e-6, 1e-3), (0.05, 0.0), (0.05, 1e-3)]
    assert result.lr == 0.05  # 1e-6 cannot move a head in 15 epochs
    assert result.val_accuracy == max(g["val_accuracy"] for g in result.grid) > 0.9
    assert [r["epoch"] for r in result.history] == list(range(1, result.epochs + 1))
    assert {r["phase"] for r in result.history} == {"head"}


def test_head_early_stopping_stops_and_restores_the_best_epoch():
    noisy = blobs(n=120, dim=64, noise=6.0)  # barely separable: val loss turns up after a few epochs
    params = HeadParams(kind="mlp", hidden=64, dropout=0.0, epochs=200, lrs=[0.05], weight_decays=[0.0], patience=3)
    result = train_head_grid(noisy, params)
    best = min(result.history, key=lambda r: r["val_loss"])
    assert result.epochs < 200 and result.epochs == best["epoch"] + 3
    xv, yv = noisy.split("val")
    with torch.inference_mode():
        loss = torch.nn.functional.cross_entropy(result.model(torch.from_numpy(xv)), torch.from_numpy(yv))
    assert float(loss) == pytest.approx(best["val_loss"], rel=1e-5)  # the weights are those of the best epoch


def test_head_training_is_seeded():
    params = HeadParams(epochs=5, lrs=[0.01], weight_decays=[0.0])
    a, b = train_head_grid(blobs(), params), train_head_grid(blobs(), params)
    assert all(torch.equal(a.model.state_dict()[k], v) for k, v in b.model.state_dict().items())


def test_class_weighting_trains_on_imbalanced_data():
    ds = blobs(n=300)
    keep = (ds.labels != 0) | (np.arange(len(ds.labels)) % 5 == 0)  # class 0 becomes rare
    rare = Arrays(ds.features[keep], ds.labels[keep], ds.splits[keep], ds.classes)
    result = train_head_grid(rare, HeadParams(epochs=10, lrs=[0.05], weight_decays=[0.0], class_weighting=True))
    assert result.val_accuracy > 0.8


def test_saved_head_loads_back_with_its_metadata(tmp_path: Path):
    result = train_head_grid(blobs(), HeadParams(epochs=3, lrs=[0.01], weight_decays=[0.0]))
    save_head(result, tmp_path / "head", tmp_path / "history.csv")
    head, info = load_head(tmp_path / "head")
    x = torch.randn(4, 16)
    with torch.inference_mode():
        assert torch.equal(head(x), result.model.eval()(x))
    assert info["classes"] == ["c0", "c1", "c2"] and info["in_features"] == 16 and info["epochs"] == 3
    assert info["backbone"] == {"backbone": "tiny_test"} and info["lr"] == 0.01
    rows = list(csv.DictReader((tmp_path / "history.csv").open()))
    assert list(rows[0]) == HISTORY_COLUMNS and len(rows) == 3


# ---------------------------------------------------------------- schedule


def test_param_group_lrs_follow_lr_decay_from_the_top_and_the_head_has_its_own():
    bb = create_backbone("tiny_test", weights="random")
    top = bb.groups[::-1][:3]
    groups = param_groups(build_head("linear", 32, 3, 8, 0.0), top, lr=1e-2, lr_decay=0.5, head_lr=1e-3)
    assert [g["base_lr"] for g in groups] == [1e-3, 1e-2, 5e-3, 2.5e-3]
    assert groups[1]["params"] == list(bb.groups[-1].parameters())


def test_warmup_is_counted_in_steps_and_small_data_scales_the_lrs_down():
    assert warmup_steps(50, total=1000) == 50 and warmup_steps(50, total=16) == 8
    assert small_data_scale(1250) == 1.0 and small_data_scale(100) == pytest.approx(0.316, abs=1e-3)


def test_lr_warms_up_linearly_then_decays_by_cosine_to_about_zero():
    f = [lr_factor(s, total_steps=100, warmup_steps=10) for s in range(100)]
    assert f[:10] == pytest.approx([(s + 1) / 11 for s in range(10)])
    assert f[10] == 1.0 and all(a >= b for a, b in zip(f[10:], f[11:], strict=False)) and f[-1] < 1e-3


def test_gradual_unfreeze_adds_a_group_every_k_epochs():
    assert [unfrozen_at(e, 3, 2) for e in range(8)] == [1, 1, 2, 2, 3, 3, 3, 3]
    assert [unfrozen_at(e, 3, 0) for e in range(3)] == [3, 3, 3]


def test_frozen_backbone_modules_run_in_eval_mode():
    bb = create_backbone("tiny_test", weights="random")
    top = bb.groups[::-1][:2]
    set_trainable(bb.model, top, 1, "train")
    assert all(m.training for m in bb.groups[-1]) and not any(m.training for m in bb.groups[-2])
    assert [p.requires_grad for p in bb.groups[-1].parameters()] == [True] * 3
    assert not any(p.requires_grad for g in bb.groups[:-1] for p in g.parameters())
    set_trainable(bb.model, top, 2, "frozen")
    assert not any(m.training for m in bb.model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_a_training_view_is_a_function_of_seed_view_and_content_not_of_position(tmp_path: Path):
    from tlops.core.io import sha256_file
    from tlops.features.working_images import WorkingImages

    [a, b] = make_images(tmp_path, classes=1, per_class=2)
    bb = create_backbone("tiny_test", weights="random")
    images = WorkingImages(tmp_path / "store", bb.spec, 10**7, {str(p): sha256_file(p) for p in (a, b)})
    ds = ImageDataset([(str(a), 0), (str(b), 0)], images, augment=tiny_params().finetune.augment, seed=1)
    moved = ImageDataset([(str(b), 0), (str(a), 0)], images, augment=tiny_params().finetune.augment, seed=1)
    assert torch.equal(ds[0][0], moved[1][0])  # the same image at another position: the same view
    assert not torch.equal(ds[0][0], ds.at_view(1)[0][0]) and torch.equal(ds.at_view(1)[0][0], ds.at_view(1)[0][0])
    assert ds[0][0].shape == (3, 32, 32)


# ---------------------------------------------------------------- fine-tuning


def make_project(root: Path) -> None:
    """Generated images, their manifest, tiny_test features (the features stage's code) and a trained head."""
    params = tiny_params()
    make_images(paths.RAW, classes=3, per_class=8)
    prepare.prepare_data(paths.RAW, params.data, paths.MANIFEST, paths.DATA_REPORT)
    extract_features(manifest.load_manifest(), params, paths.FEATURES_DIR, progress=False, engine="torch")
    save_head(train_head_grid(load_feature_dataset(), params.head))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project root shared by the fine-tuning tests, which write only under their own tmp_path."""
    root = tmp_path_factory.mktemp("finetune")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        make_project(root)
    return root


@pytest.fixture
def project(images: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(images)
    return images


def run_finetune(out: Path, params: Params | None = None, on_epoch=None):
    return finetune_model(params or tiny_params(), manifest.load_manifest(), paths.HEAD_DIR, out / "model", out / "ckpt",
                    on_epoch=on_epoch, history_path=out / "history.csv")


def tuned_weights(out: Path) -> dict[str, torch.Tensor]:
    """What fine-tuning reached: model.safetensors, or finetuned.safetensors beside it when the head was selected."""
    tuned = out / "model" / "finetuned.safetensors"
    return load_file(str(tuned if tuned.exists() else out / "model" / "model.safetensors"))


def state_of(name: str = "tiny_test") -> dict[str, torch.Tensor]:
    return {f"backbone.{k}": v.clone() for k, v in create_backbone(name, weights="random").model.state_dict().items()}


def changed(before: dict, after: dict, prefix: str) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix))


# tiny_test groups are backbone.features.0 .. .3; conv weight, then BN weight/bias/running stats.
def test_finetune_frozen_parameters_and_bn_statistics_stay_bit_identical(project: Path, tmp_path: Path):
    before = state_of()
    run_finetune(tmp_path, tiny_params(unfreeze_groups=1, batchnorm="frozen"))
    after = tuned_weights(tmp_path)
    for group in range(3):
        assert not changed(before, after, f"backbone.features.{group}.")
    assert not changed(before, after, "backbone.features.3.1.running_")
    assert changed(before, after, "backbone.features.3.0.weight")  # the unfrozen group did learn


def test_finetune_bn_statistics_update_under_batchnorm_train(project: Path, tmp_path: Path):
    before = state_of()
    run_finetune(tmp_path, tiny_params(unfreeze_groups=1, batchnorm="train"))
    after = tuned_weights(tmp_path)
    assert changed(before, after, "backbone.features.3.1.running_mean")
    assert not changed(before, after, "backbone.features.2.")


def test_finetune_gradual_unfreeze_trains_one_more_group_each_epoch(project: Path, tmp_path: Path):
    before = state_of()
    run_finetune(tmp_path, tiny_params(epochs=2, unfreeze_groups=3, unfreeze_every=1))
    after = tuned_weights(tmp_path)
    assert [changed(before, after, f"backbone.features.{g}.0.weight") for g in range(4)] == [False, False, True, True]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return tuned_weights(out)


@pytest.mark.parametrize("over", [{}, {"unfreeze_groups": 3, "unfreeze_every": 1, "epochs": 3}, {"views": 1}],
                         ids=["top-2", "gradual-unfreezing", "one-view"])
def test_the_trunk_cache_trains_on_the_same_inputs_as_the_whole_backbone(project: Path, tmp_path: Path, over):
    cached = run_finetune(tmp_path / "cached", tiny_params(trunk_cache=True, **over))
    whole = run_finetune(tmp_path / "whole", tiny_params(trunk_cache=False, **over))
    assert cached.trunk == "cached" and whole.trunk == "finetune.trunk_cache is false"
    a, b = _weights(tmp_path / "cached"), _weights(tmp_path / "whole")
    assert a.keys() == b.keys()
    for k in a:  # the trunk ran on ONNX Runtime, the whole backbone on PyTorch: float rounding apart
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    for x, y in zip(cached.history, whole.history, strict=True):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-4)
        assert x["val_accuracy"] == y["val_accuracy"]


def test_the_trunk_is_computed_once_per_view_and_reused_by_a_rerun_with_other_params(project: Path, tmp_path: Path,
                                                                                     monkeypatch):
    import tlops.features.frozen

    runs = []
    original = tlops.features.frozen.make_runner
    monkeypatch.setattr("tlops.training.trunk.make_runner", lambda *a, **k: runs.append(1) or original(*a, **k))
    run_finetune(tmp_path, tiny_params(epochs=3, views=2))
    shards = sorted((tmp_path / "ckpt" / "trunk").glob("trunk-*.keys.npy"))
    assert len(shards) == 3  # views 0 and 1 of the training images, and the validation images
    runs.clear()
    run_finetune(tmp_path, tiny_params(epochs=3, views=2, lr=2e-3))  # another run: nothing recomputed
    assert runs == [] and sorted((tmp_path / "ckpt" / "trunk").glob("trunk-*.keys.npy")) == shards


def test_no_epoch_decodes_an_image_the_features_stage_decoded(project: Path, tmp_path: Path, monkeypatch):
    import tlops.features.working_images

    decoded = []
    original = tlops.features.working_images.decode
    monkeypatch.setattr(tlops.features.working_images, "decode", lambda *a, **k: decoded.append(a[0]) or original(*a, **k))
    run_finetune(tmp_path / "cached", tiny_params(trunk_cache=True))
    run_finetune(tmp_path / "whole", tiny_params(trunk_cache=False))
    assert decoded == []


def test_batchnorm_train_turns_the_trunk_cache_off_and_says_why(project: Path, tmp_path: Path):
    result = run_finetune(tmp_path, tiny_params(batchnorm="train"))
    assert "batchnorm is train" in result.trunk


def test_one_bf16_epoch_lands_near_the_fp32_one(project: Path, tmp_path: Path):
    fp32 = run_finetune(tmp_path / "fp32", tiny_params(epochs=1, precision="fp32"))
    bf16 = run_finetune(tmp_path / "bf16", tiny_params(epochs=1, precision="bf16"))
    assert bf16.history[0]["train_loss"] == pytest.approx(fp32.history[0]["train_loss"], rel=0.05)
    assert bf16.history[0]["val_loss"] == pytest.approx(fp32.history[0]["val_loss"], rel=0.05)


def test_finetune_two_cpu_runs_write_identical_weights(project: Path, tmp_path: Path):
    run_finetune(tmp_path / "a")
    run_finetune(tmp_path / "b")
    assert sha256_file(tmp_path / "a/model/model.safetensors") == sha256_file(tmp_path / "b/model/model.safetensors")


def test_finetune_resumed_after_a_crash_ends_with_the_uninterrupted_weights(project: Path, tmp_path: Path):
    params = tiny_params(epochs=3)
    whole = run_finetune(tmp_path / "whole", params)

    def crash(row: dict, epoch: int) -> None:
        if row["epoch"] == whole.history[0]["epoch"]:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_finetune(tmp_path / "crash", params, on_epoch=crash)
    assert not (tmp_path / "crash/model").exists()
    resumed = run_finetune(tmp_path / "crash", params)
    assert resumed.resumed_epochs == 1 and resumed.history == whole.history
    assert sha256_file(tmp_path / "whole/model/model.safetensors") == sha256_file(tmp_path / "crash/model/model.safetensors")


def test_finetune_ignores_a_checkpoint_made_with_other_params(project: Path, tmp_path: Path):
    run_finetune(tmp_path, tiny_params(lr=1e-3))
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("epoch_*")) == ["epoch_0001.pt", "epoch_0002.pt"]
    assert run_finetune(tmp_path, tiny_params(lr=2e-3)).resumed_epochs == 0


def test_finetune_nan_loss_raises_naming_the_epoch(project: Path, tmp_path: Path):
    head_dir = tmp_path / "head"
    head_dir.mkdir()
    weights = load_file(str(paths.HEAD_WEIGHTS))
    save_file({k: torch.full_like(v, float("nan")) for k, v in weights.items()}, str(head_dir / "head.safetensors"))
    (head_dir / "head.json").write_text(paths.HEAD_INFO.read_text())
    with pytest.raises(NonFiniteLossError, match="epoch 1, step 0"):
        finetune_model(tiny_params(), manifest.load_manifest(), head_dir, tmp_path / "model", tmp_path / "ckpt",
                 history_path=tmp_path / "history.csv")


def test_finetune_writes_a_model_that_load_classifier_rebuilds(project: Path, tmp_path: Path):
    result = run_finetune(tmp_path)
    model, info = load_classifier(tmp_path / "model")
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():  # close, not equal: the trained copy is in channels_last layout
        torch.testing.assert_close(model(x), result.model.eval()(x), rtol=1e-5, atol=1e-6)
    assert info["backbone"] == "tiny_test" and info["classes"] == ["class_0", "class_1", "class_2"]
    assert info["preprocess"]["input_size"] == info["image_size"] == 32 and info["head"]["kind"] == "linear"
    assert info["weights_sha256"] == sha256_file(tmp_path / "model/model.safetensors")
    rows = list(csv.DictReader((tmp_path / "history.csv").open()))
    head_epochs = info["head_epochs"]
    assert [int(r["epoch"]) for r in rows] == [head_epochs + 1, head_epochs + 2]
    assert {r["phase"] for r in rows} == {"finetune"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_finetune_on_cuda_with_mixed_precision(project: Path, tmp_path: Path):
    result = run_finetune(tmp_path, tiny_params(device="cuda", num_workers=2))
    assert result.device.startswith("cuda")
    assert all(torch.isfinite(v.float()).all() for v in load_file(str(tmp_path / "model/model.safetensors")).values())
    model, _ = load_classifier(tmp_path / "model")
    assert next(model.parameters()).device.type == "cpu"


@pytest.mark.slow
def test_stage_tasks_print_both_accuracies_and_log_epochs_on_one_axis(tmp_path: Path, monkeypatch, capsys):
    from conftest import write_params

    from tasks.finetune import finetune as finetune_task
    from tasks.train_head import train_head as train_head_task
    from tlops.tracking import runs

    monkeypatch.chdir(tmp_path)
    write_params(tmp_path)
    make_project(tmp_path)
    head = train_head_task.fn()
    tuned = finetune_task.fn()
    out = capsys.readouterr().out
    assert f"head-only val accuracy: {head['head_val_accuracy']:.4f}" in out
    assert f"fine-tuned val accuracy: {tuned['val_accuracy']:.4f}" in out
    c = runs.client()
    runs = {r.data.tags.get("stage"): r for r in c.search_runs(
        [runs.experiment_id(c)], f"tags.workspace = '{tmp_path}'")}
    steps = {s: [m.step for m in c.get_metric_history(runs[s].info.run_id, "val_loss")] for s in runs}
    assert steps["train_head"] == list(range(1, head["epochs"] + 1))
    assert steps["finetune"] == [head["epochs"] + 1, head["epochs"] + 2]
    assert runs["finetune"].data.tags["device"] == "cpu"


# ---------------------------------------------------------------- the recipe: best epoch, selection, early stopping


def test_keep_best_keeps_the_weights_of_the_best_epoch_by_metric_then_loss():
    model = torch.nn.Linear(2, 2)
    best = keep_best(None, {"val_metric": 0.8, "val_loss": 0.5}, model)
    kept = best["state"]["weight"].clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    worse = keep_best(best, {"val_metric": 0.8, "val_loss": 0.6}, model)
    assert worse["stale"] == 1 and torch.equal(worse["state"]["weight"], kept)
    better = keep_best(worse, {"val_metric": 0.8, "val_loss": 0.4}, model)
    assert better["stale"] == 0 and not torch.equal(better["state"]["weight"], kept)


def test_a_fine_tuning_that_does_not_beat_the_head_exports_the_head_only_model(project: Path, tmp_path: Path):
    result = run_finetune(tmp_path, tiny_params(lr=1e-12, head_lr=1e-12))  # moves nothing: it can only tie
    assert result.selected == "head" and result.info["selected"] == "head"
    exported = load_file(str(tmp_path / "model" / "model.safetensors"))
    initial = {**state_of(), **{f"head.{k}": v for k, v in load_file(str(paths.HEAD_WEIGHTS)).items()}}
    assert all(torch.equal(exported[k], initial[k]) for k in initial)
    assert (tmp_path / "model" / "finetuned.safetensors").exists()
    assert set(result.info["selection"]) == {"metric", "head", "finetuned"}


def test_fine_tuning_stops_after_patience_epochs_without_a_better_metric(project: Path, tmp_path: Path):
    result = run_finetune(tmp_path, tiny_params(epochs=6, patience=1, lr=1e-12, head_lr=1e-12))
    assert len(result.history) == 2  # the first epoch is the best; one more without improvement ends it
