"""Running a frozen module fast, in inference mode: ONNX Runtime on CPU (exported and checked against PyTorch
first), PyTorch on CUDA. The features stage runs the backbone through it, fine-tuning the frozen trunk."""

from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tlops.export.onnx_export import export_onnx, parity
from tlops.onnx import runtime

log = logging.getLogger(__name__)

ENGINES = ("auto", "torch", "onnxruntime")
Runner = Callable[[np.ndarray], np.ndarray]  # float32 NCHW batch -> float32 outputs


def make_runner(module: nn.Module, input_size: int, engine: str = "auto", num_threads: int | None = None,
                example: np.ndarray | None = None, opset: int = 17, atol: float = 1e-3) -> tuple[Runner, str]:
    """The fastest available way to run a frozen module on float32 batches, and its name.

    auto: PyTorch on CUDA when there is one, else ONNX Runtime if its export passes the parity rule on `example`,
    else PyTorch on CPU. The features stage runs the backbone through it, fine-tuning the frozen trunk.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r} is not one of {ENGINES}")
    if engine == "torch" or (engine == "auto" and torch.cuda.is_available()):
        return torch_runner(module), "torch-cuda" if torch.cuda.is_available() else "torch"
    try:
        run = onnx_runner(module, input_size, num_threads, opset, example)
        if example is not None:
            parity(torch_runner(module, torch.device("cpu"))(example), run(example), atol, top1=False)
        return run, "onnxruntime"
    except Exception as e:  # an op the exporter or runtime lacks: PyTorch still works, only slower
        if engine == "onnxruntime":
            raise
        log.warning("ONNX Runtime unavailable for %s (%s); running it with PyTorch", type(module).__name__, e)
        return torch_runner(module), "torch"


def torch_runner(module: nn.Module, device: torch.device | None = None) -> Runner:
    """The module under inference_mode, channels_last (oneDNN's fast layout), on `device` (default: CUDA if any)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # A copy: the caller's module keeps its device and memory format.
    model = copy.deepcopy(module).to(device, memory_format=torch.channels_last).eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            t = torch.from_numpy(x).to(device)
            if t.dim() == 4:
                t = t.contiguous(memory_format=torch.channels_last)
            return model(t).float().cpu().numpy()

    return run


def onnx_runner(module: nn.Module, input_size: int, num_threads: int | None = None, opset: int = 17,
                example: np.ndarray | None = None) -> Runner:
    """The module exported by tlops.export.export_onnx and run by ONNX Runtime on CPU, batch size dynamic (and the
    sequence length, for token ids: an integer `example`)."""
    with tempfile.TemporaryDirectory(prefix="tlops-onnx-") as tmp:
        path = export_onnx(module, input_size, Path(tmp) / "module.onnx", opset, output="output", example=example)
        session = runtime.session(path.read_bytes(), threads=num_threads, cpu_only=True)
    name = session.get_inputs()[0].name
    dtype = np.int64 if example is not None and np.issubdtype(example.dtype, np.integer) else np.float32
    return lambda x: session.run(None, {name: np.ascontiguousarray(x, dtype)})[0]
