"""Fine-tuning checkpoints: one file per finished epoch, written atomically, resumed only by the same run.

A checkpoint carries a fingerprint of everything that shapes training (model + finetune params, the
trained head, the manifest), so one left behind by other params or data is ignored rather than resumed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tlops.core import paths
from tlops.core.config import Params
from tlops.core.imports import code_fingerprint
from tlops.core.io import atomic_path, sha256_file, sha256_json

log = logging.getLogger(__name__)

KEEP = 2  # the newest two, so a checkpoint damaged on disk still leaves one to resume from


# The code of a fine-tuning run, read from the import graph: a checkpoint written by other code is not resumed (it
# would replay its result).
TRAINING_CODE = "tlops.training.finetune"


def run_fingerprint(params: Params, manifest: Any, head_dir: str | Path) -> str:
    """Hash of what a resumed run must share with the interrupted one: params, selection policy, head, data, code."""
    return sha256_json({
        "model": params.model.model_dump(mode="json"),
        "finetune": params.finetune.model_dump(mode="json", exclude={"processes"}),  # checked on its own
        "max_pixels": params.data.max_pixels,
        "policy": {"metric": params.evaluate.metric, "imbalance_ratio": params.data.imbalance_ratio},
        "head": sha256_file(Path(head_dir) / paths.HEAD_WEIGHTS.name),
        "head_info": sha256_file(Path(head_dir) / paths.HEAD_INFO.name),
        "classes": list(manifest.classes),
        "rows": [str(r) for r in manifest.rows],
        "code": code_fingerprint(TRAINING_CODE),
    })


def checkpoint_path(checkpoint_dir: str | Path, epoch: int) -> Path:
    return Path(checkpoint_dir) / f"epoch_{epoch:04d}.pt"


def save_checkpoint(checkpoint_dir: str | Path, model: nn.Module, opt: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, epoch: int, history: list[dict], fingerprint: str,
                    best: dict | None = None, world_size: int = 1) -> Path:
    """Everything needed to continue after `epoch` finished epochs (with `best`, the best epoch so far and its
    weights); older checkpoints beyond KEEP are removed."""
    state = {
        "best": best,
        "fingerprint": fingerprint,
        "world_size": world_size,  # processes of the run: a resume needs as many (tlops.training.distributed)
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "history": history,
    }
    path = checkpoint_path(checkpoint_dir, epoch)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    # Newer files than this epoch are stale (a same-run one would have been resumed); keep the last KEEP.
    for old in Path(checkpoint_dir).glob("epoch_*.pt"):
        n = int(old.stem.removeprefix("epoch_"))
        if n > epoch or n <= epoch - KEEP:
            old.unlink(missing_ok=True)
    return path


def latest_checkpoint(checkpoint_dir: str | Path, fingerprint: str) -> dict | None:
    """The newest readable checkpoint with this fingerprint, else None."""
    for path in sorted(Path(checkpoint_dir).glob("epoch_*.pt"), reverse=True):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a damaged file: fall back to the one before it
            log.warning("ignoring unreadable checkpoint %s: %s", path, e)
            continue
        if state.get("fingerprint") == fingerprint:
            log.info("resuming fine-tuning from %s (epoch %d)", path, state["epoch"])
            return state
        log.info("ignoring %s: made with other params or data", path)
    return None


def restore_checkpoint(state: dict, model: nn.Module, opt: torch.optim.Optimizer,
                       scaler: torch.amp.GradScaler) -> list[dict]:
    """Load model, optimizer, scaler and RNG state in place; return the history so far."""
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return list(state["history"])
