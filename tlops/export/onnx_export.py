"""PyTorch to ONNX: the export (static padding for TF-style backbones, several named outputs) and the parity
measure it is held to."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tlops.core.errors import ParityError
from tlops.core.io import atomic_path
from tlops.onnx import metadata

if TYPE_CHECKING:
    from torch import nn


def export_onnx(model: nn.Module, input_size: int, path: str | os.PathLike, opset: int,
                output: str | Sequence[str] = metadata.OUTPUT, example: np.ndarray | None = None) -> Path:
    """Export `model` (NCHW float32, dynamic batch -> `output`, or one name per output of a model returning a tuple)
    to ONE self-contained ONNX file at `path`, checked. An integer `example` (token ids, N x L) exports a text model:
    int64 input, batch and sequence length dynamic.

    The one ONNX export of tlops: the features stage runs the frozen base through it, the export stage the whole
    classifier. The TorchScript exporter is used on purpose: the dynamo exporter (torch >= 2.9) cannot convert timm's
    EfficientNet-Lite0 down to opset 17 and silently writes opset 18 instead, so the opset would not be pinned; it is
    also 5-15x slower here. What it exports is compared with the original by `parity`.
    """
    import onnx
    import torch

    tokens = example is not None and np.issubdtype(example.dtype, np.integer)
    if tokens:
        model, x = model.eval().to("cpu"), torch.from_numpy(np.ascontiguousarray(example, np.int64))
        axes = {0: "batch", 1: "sequence"}
    else:
        model, x = static_same_padding(model.eval().to("cpu"), input_size), torch.zeros(2, 3, input_size, input_size)
        axes = {0: "batch"}
    outputs = [output] if isinstance(output, str) else list(output)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "legacy exporter": chosen on purpose, see above
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")  # F.pad's index reversal
        warnings.filterwarnings("ignore", message="Exporting aten::index")  # text: the attention mask's indexing
        torch.onnx.export(
            model, (x,), str(tmp), dynamo=False, opset_version=opset,
            input_names=[metadata.INPUT], output_names=outputs,
            dynamic_axes={metadata.INPUT: axes, **{name: {0: "batch"} for name in outputs}},
        )
        metadata.assert_self_contained(tmp)
        onnx.checker.check_model(str(tmp), full_check=True)
    return Path(path)


def static_same_padding(model: nn.Module, input_size: int) -> nn.Module:
    """A copy of `model` whose TF-style "same" convolutions (timm's Conv2dSame) pad by constants.

    Conv2dSame computes its padding from the input's size at run time. Traced, that is a Shape/Div/Ceil/Pad
    chain per strided convolution which ONNX Runtime cannot fold (the batch axis is dynamic) and which the
    int8 quantizer wrecks (EfficientNet-Lite0 on digits: int8 accuracy 0.65 against fp32 0.91). The exported
    input size is fixed, so each padding is a constant: ZeroPad2d + a plain Conv2d, same weights.
    """
    import copy

    import torch
    from torch import nn

    try:
        from timm.layers import Conv2dSame
        from timm.layers.padding import pad_same_arg
    except ImportError:  # no timm, no Conv2dSame
        return model
    model = copy.deepcopy(model)
    sizes: dict[nn.Module, tuple[int, int]] = {}
    same = [m for m in model.modules() if isinstance(m, Conv2dSame)]
    if not same:
        return model
    hooks = [m.register_forward_pre_hook(lambda m, args: sizes.__setitem__(m, tuple(args[0].shape[-2:])))
             for m in same]
    with torch.inference_mode():
        model(torch.zeros(1, 3, input_size, input_size))
    for h in hooks:
        h.remove()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv2dSame):
                conv = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride, 0,
                                 child.dilation, child.groups, child.bias is not None)
                conv.load_state_dict(child.state_dict())
                pad = pad_same_arg(sizes[child], child.kernel_size, child.stride, child.dilation)
                setattr(parent, name, nn.Sequential(nn.ZeroPad2d(pad), conv))
    return model.eval()


def parity(reference: np.ndarray, candidate: np.ndarray, atol: float, top1: bool = True) -> dict[str, Any]:
    """The one parity rule: max |candidate - reference| <= atol * max(1, max |reference|), and with top1 the same
    argmax on every row. Returns the figures; ParityError naming them when the rule fails."""
    if reference.shape != candidate.shape:
        raise ParityError(f"ONNX Runtime output has shape {candidate.shape}, PyTorch's {reference.shape}")
    n = len(reference)
    agree = float((reference.argmax(1) == candidate.argmax(1)).mean()) if n and top1 else 1.0
    diff = float(np.abs(reference.astype(np.float64) - candidate).max()) if n else 0.0
    scale = max(1.0, float(np.abs(reference).max())) if n else 1.0
    stats = {"agreement": agree, "max_abs_diff": diff, "allowed_diff": atol * scale, "n": n, "atol": atol}
    if agree < 1.0 or not diff <= atol * scale:
        raise ParityError(f"ONNX Runtime disagrees with PyTorch on {n} inputs: top-1 agreement {agree:.2%} (must be "
                          f"100%), max |Δ| {diff:.3g} (must be <= export.parity_atol = {atol:g} times "
                          f"max(1, max |output|) = {atol * scale:.3g})")
    return stats
