"""Where torch computes: the device, its mixed-precision dtype, and how many CPU threads a block uses."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from tlops.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """finetune.device auto|cpu|cuda -> a torch device; cuda without a GPU is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("finetune.device: cuda, but torch sees no CUDA GPU (use auto or cpu)")
    return torch.device(name)


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed precision on CUDA: bf16 where the GPU has it (no scaler needed), else fp16 with a GradScaler."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def device_tags(device: torch.device) -> dict[str, str]:
    """Where fine-tuning runs, for run tags: device, GPU name, mixed-precision dtype."""
    tags = {"device": device.type, "amp": str(amp_dtype(device) or "off").removeprefix("torch.")}
    if device.type == "cuda":
        tags["gpu"] = torch.cuda.get_device_name(device)
    return tags


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch.set_num_threads(n) for the block (None: leave the setting), restored afterwards."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
