"""The fine-tuning schedule: which layer groups train when, at what learning rate, with which BN mode.

Pure functions of (epoch, step, params) and the model's layer groups, so the loop in tlops/train.py
reads top to bottom and a resumed run recomputes exactly the schedule it was interrupted in.
"""

from __future__ import annotations

import math

from torch import nn


def unfrozen_at(epoch: int, unfreeze_groups: int, unfreeze_every: int) -> int:
    """How many top backbone groups train in `epoch` (0-based): all at once, or one more every k epochs."""
    if unfreeze_every <= 0:
        return unfreeze_groups
    return min(unfreeze_groups, 1 + epoch // unfreeze_every)


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of every group's base LR at optimizer step `step` (0-based)."""
    # 1) linear warmup: the new head's gradients are large at first; ramp up so they don't wreck the backbone
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    # 2) past the end (a resumed run that already finished): hold at zero
    if step >= total_steps:
        return 0.0
    # 3) cosine decay from 1 to ~0 over the remaining steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps(steps: int, total: int) -> int:
    """Warm-up in optimizer steps, finetune.warmup_steps, but at most half of the run (a small dataset has few)."""
    return min(steps, total // 2)


# Below this many training images the fine-tuning LRs shrink with the square root of the count: a few images give
# few, noisy gradient steps, which a full-size LR turns into a jump away from where the head left off.
SMALL_DATA = 1000


def small_data_scale(train_images: int) -> float:
    """The factor of every fine-tuning LR for a training split of this size (1 from SMALL_DATA images up)."""
    return min(1.0, math.sqrt(max(train_images, 1) / SMALL_DATA))


def param_groups(head: nn.Module, top_groups: list[nn.Module], lr: float, lr_decay: float,
                 head_lr: float) -> list[dict]:
    """AdamW parameter groups: the head at head_lr, the i-th backbone group from the top at lr * lr_decay**i.

    The head's LR is set apart: it has already converged on the frozen features and only needs to follow them as
    the backbone moves.

    Every group that may ever train is created here, up front: a frozen one simply gets no gradients
    (AdamW skips parameters whose .grad is None), so unfreezing later never rebuilds the optimizer and a
    checkpointed optimizer state always matches.
    """
    groups = [{"params": list(head.parameters()), "base_lr": head_lr, "lr": head_lr, "name": "head"}]
    for i, module in enumerate(top_groups):
        group_lr = lr * lr_decay**i
        groups.append({"params": list(module.parameters()), "base_lr": group_lr, "lr": group_lr, "name": f"top{i}"})
    return groups


def set_trainable(backbone: nn.Module, top_groups: list[nn.Module], n: int, batchnorm: str) -> None:
    """Unfreeze the top `n` groups; freeze the rest of the backbone; set train/eval modes to match.

    Frozen modules run in eval mode (no dropout, BN statistics untouched). With batchnorm "frozen"
    every BN layer stays in eval mode, so its running statistics never change; with "train" the BN
    layers inside unfrozen groups update theirs.
    """
    backbone.requires_grad_(False)
    backbone.eval()
    for module in top_groups[:n]:
        module.requires_grad_(True)
        module.train()
    if batchnorm == "frozen":
        for module in backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
