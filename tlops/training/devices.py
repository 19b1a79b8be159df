"""Where torch computes: the device, its mixed-precision dtype, and how many CPU threads a block uses."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from tlops.core.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """finetune.device auto|cpu|cuda -> a torch device; cuda without a GPU is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("finetune.device: cuda, but torch sees no CUDA GPU (use auto or cpu)")
    return torch.device(name)


# finetune.precision: auto on the CPU is what bench/finetune.py measured faster on the reference CPU (which has
# AVX-512 BF16): see CPU_AUTO_REASON.
CPU_AUTO: torch.dtype | None = None
CPU_AUTO_REASON = "fp32: bf16 autocast measured slower for the fine-tuned top on the reference CPU"


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX), as oneDNN reports it."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def amp_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype of the trainable part (None: fp32) for finetune.precision on `device`.

    auto: on CUDA bf16 where the GPU has it (no scaler needed), else fp16 with a GradScaler; on the CPU CPU_AUTO.
    """
    if precision == "fp32":
        return None
    if precision == "fp16":
        if device.type != "cuda":
            raise ConfigError("finetune.precision: fp16 needs a CUDA GPU (on the CPU use bf16 or fp32)")
        return torch.float16
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("finetune.precision: bf16, but this GPU has no bf16 (use fp16 or auto)")
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return CPU_AUTO


def device_tags(device: torch.device, precision: str = "auto") -> dict[str, str]:
    """Where fine-tuning runs, for run tags: device, GPU name, mixed-precision dtype."""
    tags = {"device": device.type, "amp": str(amp_dtype(device, precision) or "off").removeprefix("torch.")}
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
