"""ONNX Runtime, the one way tlops opens and runs an ONNX model: session, providers, outputs, softmax. Torch-free.

Used by the features stage (the frozen base on CPU), export (parity, scoring, int8), the registry (signatures)
and the service, so every one of them runs a model with the same options.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnxruntime as ort

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def providers(cpu_only: bool = False) -> list[str]:
    """Execution providers in preference order: CUDA when this onnxruntime build has it, then the CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in (() if cpu_only else (CUDA,)) + (CPU,) if p in available]


def session(model: str | os.PathLike | bytes, threads: int | None = None, cpu_only: bool = False,
            spinning: bool = True) -> ort.InferenceSession:
    """An ONNX Runtime session on a model file or its bytes.

    threads: intra-op threads (None: one per physical core); cpu_only: the CPU provider alone (the reference the
    parity gate holds a model to); spinning=False lets idle threads sleep, for a service whose event loop and
    decoders need the cores between batches.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1  # one batch at a time uses every core through intra-op threads
    if threads:
        opts.intra_op_num_threads = threads
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=opts, providers=providers(cpu_only))


def run_batches(sess: ort.InferenceSession, batches: Iterable[np.ndarray], output: str | None = None) -> np.ndarray:
    """One output of the model (default: its first) over batches of its first input (float32 images, int64 token
    ids), concatenated."""
    name = sess.get_inputs()[0].name
    wanted = [output or sess.get_outputs()[0].name]  # only that output's nodes run (not the explanation maps)
    out = [sess.run(wanted, {name: as_input(x)})[0] for x in batches]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def as_input(x: np.ndarray) -> np.ndarray:
    """A batch as the model takes it: token ids int64, anything else float32, contiguous."""
    return np.ascontiguousarray(x, np.int64 if np.issubdtype(x.dtype, np.integer) else np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, computed in float64 so that tiny probabilities do not underflow."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)
