"""The model tlops trains, evaluates and exports: a backbone and a new head; saved and rebuilt from safetensors."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tlops import paths
from tlops.backbones import create_backbone
from tlops.errors import ConfigError, DataError, ModelIntegrityError
from tlops.io import atomic_path, read_json


def build_head(kind: str, in_features: int, num_classes: int, hidden: int, dropout: float) -> nn.Module:
    """The new classifier head: dropout + linear, or a one-hidden-layer MLP with dropout."""
    if kind == "linear":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes))
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout),
                             nn.Linear(hidden, num_classes))
    raise ConfigError(f"head.kind: {kind!r} is not linear or mlp")


class Classifier(nn.Module):
    """Backbone features -> head logits: the model that is fine-tuned, evaluated and exported."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


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


def load_classifier(model_dir: str | Path = paths.FINETUNE_DIR, tuned: bool = False) -> tuple[Classifier, dict]:
    """The selected model (eval mode, CPU) rebuilt from model.json + model.safetensors, and model.json.

    tuned=True: fine-tuning's best weights, also when the head-only model was selected over them.
    """
    model_dir = Path(model_dir)
    info_path, weights_path = model_dir / paths.FINETUNE_INFO.name, model_dir / paths.FINETUNE_WEIGHTS.name
    if tuned and (model_dir / paths.FINETUNED_WEIGHTS.name).exists():
        weights_path = model_dir / paths.FINETUNED_WEIGHTS.name
    if not info_path.exists() or not weights_path.exists():
        raise DataError(f"{model_dir}: no fine-tuned model ({info_path.name} + {weights_path.name}); "
                        "run the finetune stage")
    info = read_json(info_path)
    if info.get("encoder_config") is not None:  # a text encoder: rebuilt from its recorded config and tokenizer
        from tlops.backbones import text_backbone
        from tlops.encoders import EncoderFiles

        files = EncoderFiles(info["encoder_config"], None, info["preprocess"]["tokenizer"], "random")
        backbone = text_backbone(info["backbone"], files, int(info["preprocess"]["max_tokens"]))
    else:
        backbone = create_backbone(info["backbone"], weights="random", image_size=info["image_size"])
    h = info["head"]
    model = Classifier(backbone.model, build_head(h["kind"], info["num_features"], len(info["classes"]),
                                                  h["hidden"], h["dropout"]))
    try:
        model.load_state_dict(load_file(str(weights_path)))
    except RuntimeError as e:
        raise ModelIntegrityError(f"{weights_path} does not fit the model described in {info_path}: {e}") from None
    return model.eval(), info
