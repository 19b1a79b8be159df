"""What the served ONNX computes, as one PyTorch module exported once (so that parity, the int8 gate and the service all
see the same outputs):

  logits       the head's logits divided by the calibration temperature T (softmax of them: calibrated probabilities;
               the argmax is the head's);
  embedding    the pooled embedding the head reads (drift, and the OOD score);
  ood_score    how unlike the training data the input is (tlops.evaluate.ood): the squared Mahalanobis distance of the
               normalised embedding to its nearest class mean, and of the pooled stride-16 stage's features, each
               scaled by its spread on the validation split, the larger of the two; above the threshold in the
               metadata, the input is unknown;
  explanation  with a linear head on an averaged feature map (or mean-pooled tokens), each position's exact share of
               each logit: logit_c = sum over positions of explanation[c] + bias_c / T. Images: (classes, h, w) class
               activation maps; texts: (classes, tokens), padding 0.

A backbone whose pooled features are not the plain mean of its last feature map (a head that pools then projects, as
MobileNetV3's and VGG's do), or an MLP head, has no explanation output; the metadata says why.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from tlops.onnx import metadata

EXACT_ATOL = 1e-4  # the averaged feature map must give the pooled features to this, or the maps are not exact


class Served(nn.Module):
    """A trained Classifier with its calibration, its OOD fit and (when exact) its explanation."""

    def __init__(self, classifier: nn.Module, temperature: float = 1.0, ood: dict[str, np.ndarray] | None = None,
                 explain: str | None = None) -> None:
        super().__init__()
        self.classifier, self.explain = classifier.eval(), explain
        self.depth = ood_depth(classifier.backbone)
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.has_ood = ood is not None
        parts = 1 + (self.depth is not None)
        if ood is not None and sum(k.startswith("means_") for k in ood) != parts:
            raise ValueError(f"the OOD fit has {sum(k.startswith('means_') for k in ood)} parts, this model {parts}")
        # per part, the squared distance in whitened coordinates (precision = L L^T): stable in float32, unlike the
        # expanded quadratic form; then scaled by the validation split's spread, the largest counts
        for i in range(parts if ood is not None else 0):
            whiten = np.linalg.cholesky(np.asarray(ood[f"precision_{i}"], np.float64))
            self.register_buffer(f"whiten_{i}", torch.from_numpy(np.ascontiguousarray(whiten, np.float32)))
            self.register_buffer(f"centres_{i}", torch.from_numpy(
                np.ascontiguousarray(np.asarray(ood[f"means_{i}"], np.float64) @ whiten, np.float32)))
        if ood is not None:
            self.register_buffer("centre", torch.from_numpy(np.asarray(ood["centre"], np.float32)))
            self.register_buffer("spread", torch.from_numpy(np.asarray(ood["spread"], np.float32)))

    @property
    def outputs(self) -> tuple[str, ...]:
        return (metadata.OUTPUT, metadata.EMBEDDING, metadata.OOD_SCORE) + (
            (metadata.EXPLANATION,) if self.explain else ())

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
        """(the head's logits before T, the pooled features the OOD score reads — the embedding, then the pooled
        stride-16 stage when the backbone has one —, each position's share of each logit or None)."""
        backbone, head = self.classifier.backbone, self.classifier.head
        inner: list[torch.Tensor] = []
        if self.depth is not None:
            fmap, stages = backbone.forward_intermediates(x, indices=[self.depth])
            inner = [stages[0].mean(dim=(2, 3))]
        elif self.explain == "image":
            fmap = backbone.forward_features(x)
        share = None
        if self.explain == "image":
            embedding = fmap.mean(dim=(2, 3))  # (N, D, h, w) -> (N, D): the head's input, as explanation_kind checked
            share = torch.einsum("cd,ndhw->nchw", linear_layer(head).weight, fmap) / (fmap.shape[2] * fmap.shape[3])
        elif self.explain == "text":
            states, weights = backbone.token_states(x)  # (N, L, D), (N, L, 1): 1 for real tokens
            count = weights.sum(1).clamp(min=1.0)  # (N, 1)
            embedding = (states * weights).sum(1) / count
            share = torch.einsum("cd,nld->ncl", linear_layer(head).weight, states * weights) / count.unsqueeze(-1)
        elif self.depth is not None:
            embedding = backbone.forward_head(fmap)
        else:
            embedding = backbone(x)
        return head(embedding), [embedding, *inner], share

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, parts, share = self.parts(x)
        outputs = [logits / self.temperature, parts[0], self.ood_score(parts)]
        if share is not None:
            outputs.append(share / self.temperature)
        return tuple(outputs)

    def ood_score(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """tlops.evaluate.ood.combined_score, in the graph (zeros without a fit)."""
        if not self.has_ood:
            return torch.zeros(parts[0].shape[0], dtype=parts[0].dtype)
        scores = []
        for i, f in enumerate(parts):
            e = f / f.norm(dim=1, keepdim=True).clamp(min=1e-12)
            whiten, centres = getattr(self, f"whiten_{i}"), getattr(self, f"centres_{i}")
            d = ((e @ whiten).unsqueeze(1) - centres.unsqueeze(0)).pow(2).sum(2).min(dim=1).values
            scores.append((d - self.centre[i]) / self.spread[i])
        return torch.stack(scores, 1).max(dim=1).values


def ood_depth(backbone: nn.Module) -> int | None:
    """The index of the stride-16 stage (the one before the last) for the OOD score's second part, for a timm
    backbone with intermediates (EfficientNet, ResNet, MobileNet: texture and scale, which the last stage pools
    away, tell inputs of another kind apart); None for others (texts, which the embedding alone serves)."""
    info = getattr(backbone, "feature_info", None)
    if not hasattr(backbone, "forward_intermediates") or not hasattr(backbone, "forward_head") or not info:
        return None
    return len(info) - 2 if len(info) >= 3 else None


def linear_layer(head: nn.Module) -> nn.Linear | None:
    """The head's one Linear layer when, in eval mode, the head is nothing else (dropout and identities pass the
    features through); None for an MLP."""
    layers = [head] if not isinstance(head, nn.Sequential) else list(head)
    linear = [m for m in layers if isinstance(m, nn.Linear)]
    rest = [m for m in layers if not isinstance(m, (nn.Linear, nn.Dropout, nn.Identity))]
    return linear[0] if len(linear) == 1 and not rest else None


def explanation_kind(classifier: nn.Module, example: torch.Tensor) -> tuple[str | None, str]:
    """("image" | "text" | None, why): whether this classifier's logits split exactly over positions."""
    if linear_layer(classifier.head) is None:
        return None, ("the head is an MLP: a logit is not a sum over positions, so there is no exact explanation "
                      "(head.kind: linear gives one)")
    backbone = classifier.backbone
    with torch.inference_mode():
        pooled = backbone(example)
        if hasattr(backbone, "token_states"):
            states, weights = backbone.token_states(example)
            again, kind = (states * weights).sum(1) / weights.sum(1).clamp(min=1.0), "text"
        elif hasattr(backbone, "forward_features"):
            again, kind = backbone.forward_features(example).mean(dim=(2, 3)), "image"
        else:
            return None, f"{type(backbone).__name__} exposes no feature map"
    if again.shape != pooled.shape or not torch.allclose(again, pooled, atol=EXACT_ATOL):
        return None, (f"{type(backbone).__name__} does more than average its last feature map before the head "
                      "(a projection after pooling): region shares would not add up to the logit")
    return kind, f"exact: each {'token' if kind == 'text' else 'region'}'s share, summing with the bias to the logit"


def served_parts(served: Served, batches: Any) -> dict[str, np.ndarray]:
    """What evaluate fits and measures on: logits before T, each OOD part's pooled features ("part_0" is the
    embedding) and the explanation, concatenated, as float32 numpy."""
    parts: dict[str, list[np.ndarray]] = {}
    with torch.inference_mode():
        for x in batches:
            logits, feats, share = served.parts(torch.from_numpy(np.ascontiguousarray(x)))
            named = {"logits": logits, **{f"part_{i}": f for i, f in enumerate(feats)},
                     **({"explanation": share} if share is not None else {})}
            for name, y in named.items():
                parts.setdefault(name, []).append(y.float().numpy())
    return {name: _concatenate(v) for name, v in parts.items()}


def served_outputs(served: Served, batches: Any) -> dict[str, np.ndarray]:
    """Every output of the served module over batches of inputs, concatenated, as float32 numpy (for evaluation:
    the very numbers the exported graph computes)."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in served.outputs}
    with torch.inference_mode():
        for x in batches:
            ys = served(torch.from_numpy(np.ascontiguousarray(x)))
            for name, y in zip(served.outputs, ys, strict=True):
                parts[name].append(y.float().numpy())
    return {name: _concatenate(v) for name, v in parts.items()}


def _concatenate(arrays: list[np.ndarray]) -> np.ndarray:
    """Batches along the first axis, a shorter last axis (a text batch's token count) padded with zeros."""
    if not arrays:
        return np.zeros((0,), np.float32)
    if arrays[0].ndim >= 2:
        width = max(a.shape[-1] for a in arrays)
        arrays = [np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, width - a.shape[-1])]) for a in arrays]
    return np.concatenate(arrays)
