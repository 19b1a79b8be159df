"""The head a backbone's pooled features feed: building it, saving and loading its weights (safetensors)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tlops.core import paths
from tlops.core.errors import ConfigError, DataError
from tlops.core.io import atomic_path, read_json


def build_head(kind: str, in_features: int, num_classes: int, hidden: int, dropout: float) -> nn.Module:
    """The new classifier head: dropout + linear, or a one-hidden-layer MLP with dropout."""
    if kind == "linear":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes))
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout),
                             nn.Linear(hidden, num_classes))
    raise ConfigError(f"head.kind: {kind!r} is not linear or mlp")


def load_head(head_dir: str | Path = paths.HEAD_DIR) -> tuple[nn.Module, dict]:
    """The saved head (eval mode) and its head.json."""
    head_dir = Path(head_dir)
    info_path, weights_path = head_dir / paths.HEAD_INFO.name, head_dir / paths.HEAD_WEIGHTS.name
    if not info_path.exists() or not weights_path.exists():
        raise DataError(f"{head_dir}: no trained head ({info_path.name} + {weights_path.name}); "
                        "run the train_head stage")
    info = read_json(info_path)
    head = build_head(info["kind"], info["in_features"], len(info["classes"]), info["hidden"], info["dropout"])
    head.load_state_dict(load_file(str(weights_path)))
    return head.eval(), info


def save_state(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """A state dict as .safetensors, atomically (contiguous CPU copies; the format refuses views)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
