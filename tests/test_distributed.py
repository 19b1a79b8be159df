"""Data-parallel fine-tuning (tlops.training.distributed): two gloo ranks on CPU train exactly what one process trains
with the doubled batch, write one checkpoint set and one model, report to one MLflow run, and refuse a resume with another
rank count."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import make_images, run_stage_tasks, write_params

from tlops.core import paths
from tlops.core.config import load_params
from tlops.core.errors import ConfigError
from tlops.data.manifest import load_manifest
from tlops.tracking import runs


@pytest.fixture
def headed(workspace: Path, mlflow_store: str) -> Path:
    """A workspace after train_head on generated images; dropout off, so no random stream differs between ranks."""
    make_images(workspace.parent / "images", classes=3, per_class=14, size=32)
    write_params(workspace, {"data": {"source": "imagefolder", "path": str(workspace.parent / "images")},
                             "head": {"dropout": 0.0},
                             "finetune": {"epochs": 2, "batch_size": 4, "trunk_cache": False, "warmup_steps": 2}})
    run_stage_tasks(workspace, ("ingest", "prepare", "features", "train_head"), mlflow_store, "distributed")
    return workspace


def with_finetune(params, **changes):
    return params.model_copy(update={"finetune": params.finetune.model_copy(update=changes)})


def test_two_gloo_ranks_equal_one_process_with_the_doubled_batch(headed: Path, tmp_path: Path) -> None:
    from tlops.models.classifier import load_classifier
    from tlops.models.heads import load_head
    from tlops.training.finetune import finetune_model

    params, manifest = load_params(), load_manifest()
    one = finetune_model(with_finetune(params, batch_size=8), manifest, paths.HEAD_DIR, tmp_path / "one",
                         tmp_path / "ckpt-one", history_path=tmp_path / "one.csv")
    two = finetune_model(with_finetune(params, batch_size=4, processes=2), manifest, paths.HEAD_DIR,
                         tmp_path / "two", tmp_path / "ckpt-two", history_path=tmp_path / "two.csv")
    assert two.world_size == 2 and two.trunk.startswith("distributed")
    import signal

    assert "elastic" not in getattr(signal.getsignal(signal.SIGTERM), "__module__", "")  # its handler is not left
    a, _ = load_classifier(tmp_path / "one", tuned=True)
    b, _ = load_classifier(tmp_path / "two", tuned=True)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        np.testing.assert_allclose(x.numpy(), y.numpy(), atol=1e-5, rtol=1e-4, err_msg=name)  # 1 and 2 ranks agree
    before, _ = load_head(paths.HEAD_DIR)  # the trained head fine-tuning started from
    after = a.head.state_dict()
    moved = {k: float((after[k] - v).abs().max()) for k, v in before.state_dict().items()}
    assert max(moved.values()) > 1e-4, moved  # it trained: the weights left the pre-fine-tune state (tolerance 1e-5)
    assert [r["train_loss"] for r in one.history] == pytest.approx([r["train_loss"] for r in two.history], rel=1e-4)
    assert sorted(p.name for p in (tmp_path / "ckpt-two").iterdir()) == ["epoch_0001.pt", "epoch_0002.pt"]


def test_the_stage_with_two_processes_is_one_mlflow_run_and_resumes_only_with_two(headed: Path,
                                                                                    mlflow_store: str) -> None:
    write_params(headed, {"data": {"source": "imagefolder", "path": str(headed.parent / "images")},
                          "head": {"dropout": 0.0},
                          "finetune": {"epochs": 2, "batch_size": 4, "trunk_cache": False, "warmup_steps": 2,
                                       "processes": 2}})
    run_stage_tasks(headed, ("finetune",), mlflow_store, "distributed-stage")
    c = runs.client()
    exp = c.get_experiment_by_name("distributed-stage")
    found = c.search_runs([exp.experiment_id], "attributes.run_name = 'finetune'")
    assert len(found) == 1 and found[0].data.tags["world_size"] == "2"
    assert len(c.get_metric_history(found[0].info.run_id, "val_accuracy")) == 2  # one point per epoch, from rank 0
    from tlops.training.finetune import finetune_model

    params = with_finetune(load_params(), processes=1)  # the same run, whose checkpoints 2 ranks made
    with pytest.raises(ConfigError, match="finetune.processes = 2; this run has 1"):
        finetune_model(params, load_manifest(), paths.HEAD_DIR)


def test_a_slice_per_rank_covers_the_global_batch() -> None:
    from tlops.training.distributed import World

    batch = list(range(9))
    parts = [World(r, 2).slice(batch) for r in range(2)]
    assert parts == [[0, 1, 2, 3, 4], [5, 6, 7, 8]]
    assert sum((World(r, 3).slice(list(range(7))) for r in range(3)), []) == list(range(7))


def test_a_failing_rank_fails_the_run_with_its_own_message(headed: Path, tmp_path: Path) -> None:
    from tlops.core.errors import TlopsError
    from tlops.training.finetune import finetune_model

    params = with_finetune(load_params(), processes=2, batchnorm="train")
    with pytest.raises(TlopsError, match="rank [01] of 2 failed: .*needs CUDA"):  # whichever rank fails first
        finetune_model(params, load_manifest(), paths.HEAD_DIR, tmp_path / "out", tmp_path / "ckpt",
                       history_path=tmp_path / "h.csv")
