"""Backbone + head as one classifier, and loading a trained one back (weights only)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from tlops.core import paths
from tlops.core.errors import DataError, ModelIntegrityError
from tlops.core.io import read_json
from tlops.models.backbones import create_backbone
from tlops.models.heads import build_head


class Classifier(nn.Module):
    """Backbone features -> head logits: the model that is fine-tuned, evaluated and exported."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


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
        from tlops.models.backbones import text_backbone
        from tlops.models.encoders import EncoderFiles

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
