"""Open Inference Protocol (KServe v2) REST bodies: parse and check an infer request, build the responses.

Pure functions of bytes, numpy arrays and the loaded model; every problem with a request raises ApiError
with a 4xx status and a message naming the field and what would be right.
Spec: https://github.com/kserve/open-inference-protocol/blob/main/specification/protocol/inference_rest.md
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import tlops
from serving.model import LoadedModel
from tlops.preprocess import preprocess_uint8

PLATFORM = "onnxruntime_onnx"  # Triton's name for this backend; v2 clients display it as is
TENSOR_INPUT = "input"         # FP32 [N, 3, S, S], already preprocessed
IMAGE_INPUT = "image"          # UINT8 [N, H, W, C] or [H, W, C]; the server preprocesses it
CHANNELS = (1, 3, 4)


class ApiError(Exception):
    """A request the service refuses: HTTP status, message, and an optional stable reason code."""

    def __init__(self, status: int, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.reason = status, message, reason

    def body(self) -> dict:
        return {"error": self.message, **({"reason": self.reason} if self.reason else {})}


@dataclass
class InferRequest:
    input_name: str
    datatype: str
    shape: list[int]
    data: Any
    id: str | None = None
    parameters: dict = field(default_factory=dict)
    outputs: list[str] | None = None


def server_metadata() -> dict:
    return {"name": "tlops", "version": tlops.__version__, "extensions": []}


def model_metadata(model: LoadedModel) -> dict:
    """GET /v2/models/{name}: the tensors a client may send and will get back."""
    return {
        "name": model.name,
        "versions": [model.version],
        "platform": PLATFORM,
        "inputs": [
            {"name": TENSOR_INPUT, "datatype": "FP32", "shape": model.input_shape},
            {"name": IMAGE_INPUT, "datatype": "UINT8", "shape": [-1, -1, -1, 3]},
        ],
        "outputs": [{"name": model.output_name, "datatype": "FP32", "shape": [-1, len(model.labels)]}],
        "parameters": {
            "labels": list(model.labels),
            "preprocess": model.spec.to_dict(),
            "sha256": model.sha256,
            **{k.removeprefix("tlops."): v for k, v in model.metadata.items()
               if k.startswith("tlops.") and k not in ("tlops.labels", "tlops.preprocess")},
        },
    }


def parse_infer_request(body: bytes) -> InferRequest:
    """The JSON body of POST .../infer -> InferRequest; ApiError(400) naming the first problem."""
    try:
        req = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"request body is not valid JSON ({e})") from None
    if not isinstance(req, dict):
        raise ApiError(400, f"request body must be a JSON object with an 'inputs' list, got {type(req).__name__}")
    rid, params = req.get("id"), req.get("parameters") or {}
    if rid is not None and not isinstance(rid, str):
        raise ApiError(400, f"'id' must be a string, got {type(rid).__name__}")
    if not isinstance(params, dict):
        raise ApiError(400, "'parameters' must be a JSON object")
    if params.get("binary_data_output"):
        raise ApiError(400, "binary tensor data (binary_data_output) is not supported; use JSON data")
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ApiError(400, f"'inputs' must be a list of exactly one tensor object: '{TENSOR_INPUT}' "
                            f"(FP32 [N,3,S,S]) or '{IMAGE_INPUT}' (UINT8 [N,H,W,C] or [H,W,C])")
    t = inputs[0]
    name, dtype, shape = t.get("name"), t.get("datatype"), t.get("shape")
    if not isinstance(name, str) or not isinstance(dtype, str):
        raise ApiError(400, "each input needs a string 'name' and 'datatype'")
    if (not isinstance(shape, list) or not shape
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise ApiError(400, f"input '{name}': 'shape' must be a non-empty list of non-negative integers")
    if "data" not in t:
        raise ApiError(400, f"input '{name}': 'data' is missing (binary tensor data is not supported)")
    if (t.get("parameters") or {}).get("binary_data_size") is not None:
        raise ApiError(400, f"input '{name}': binary tensor data is not supported; send 'data' as JSON")
    return InferRequest(name, dtype, shape, t["data"], rid, params, _requested_outputs(req.get("outputs")))


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _requested_outputs(outputs: Any) -> list[str] | None:
    if outputs is None:
        return None
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                for o in outputs):
        raise ApiError(400, "'outputs' must be a list of objects with a string 'name'")
    for o in outputs:
        if (o.get("parameters") or {}).get("binary_data"):
            raise ApiError(400, f"output '{o['name']}': binary_data is not supported; use JSON data")
    return [o["name"] for o in outputs]


def decode_inputs(req: InferRequest, model: LoadedModel, max_pixels: int) -> np.ndarray:
    """The request's tensor as the model's float32 (N, 3, S, S) input, preprocessing UINT8 images."""
    if req.outputs is not None:
        unknown = [o for o in req.outputs if o != model.output_name]
        if unknown:
            raise ApiError(400, f"unknown output {unknown[0]!r}; this model has only '{model.output_name}'")
    if req.input_name == TENSOR_INPUT:
        return _fp32_tensor(req, model)
    if req.input_name == IMAGE_INPUT:
        return _uint8_images(req, model, max_pixels)
    raise ApiError(400, f"unknown input {req.input_name!r}; send '{TENSOR_INPUT}' (FP32 {model.input_shape}) "
                        f"or '{IMAGE_INPUT}' (UINT8 [N,H,W,C] or [H,W,C])")


def _fp32_tensor(req: InferRequest, model: LoadedModel) -> np.ndarray:
    want = model.input_shape
    if req.datatype != "FP32":
        raise ApiError(400, f"input '{TENSOR_INPUT}' must have datatype FP32, got {req.datatype}")
    if len(req.shape) != 4 or req.shape[0] < 1 or req.shape[1:] != want[1:]:
        dims = ", ".join(map(str, want[1:]))
        raise ApiError(400, f"input '{TENSOR_INPUT}' has shape {req.shape}; expected [N, {dims}] with N >= 1")
    x = _to_array(req, np.float32)
    if not np.isfinite(x).all():
        raise ApiError(400, f"input '{TENSOR_INPUT}' contains NaN or infinity")
    return x


def _uint8_images(req: InferRequest, model: LoadedModel, max_pixels: int) -> np.ndarray:
    if req.datatype != "UINT8":
        raise ApiError(400, f"input '{IMAGE_INPUT}' must have datatype UINT8, got {req.datatype}")
    shape = [1, *req.shape] if len(req.shape) == 3 else req.shape
    if len(shape) != 4 or min(shape) < 1 or shape[3] not in CHANNELS:
        raise ApiError(400, f"input '{IMAGE_INPUT}' has shape {req.shape}; expected [N, H, W, C] or [H, W, C] "
                            f"with C in {CHANNELS} (HWC layout, RGB order)")
    if shape[1] * shape[2] > max_pixels:
        raise ApiError(400, f"input '{IMAGE_INPUT}' images are {shape[1]}x{shape[2]} pixels, over the limit of "
                            f"{max_pixels}", reason="too_many_pixels")
    a = _to_array(req, None).reshape(shape)
    if a.size and (a.dtype.kind not in "iu" or a.min() < 0 or a.max() > 255):
        raise ApiError(400, f"input '{IMAGE_INPUT}' data must be integers 0..255 for UINT8")
    a = a.astype(np.uint8)
    return np.stack([preprocess_uint8(img, model.spec) for img in a])


def _to_array(req: InferRequest, dtype: type | None) -> np.ndarray:
    """JSON data (flat row-major or nested, both allowed by the spec) -> array of req.shape."""
    if not isinstance(req.data, list):
        raise ApiError(400, f"input '{req.input_name}': 'data' must be a JSON array")
    try:
        a = np.asarray(req.data, dtype=dtype)
    except (ValueError, TypeError, OverflowError) as e:
        raise ApiError(400, f"input '{req.input_name}': 'data' is not a rectangular array of {req.datatype} "
                            f"numbers ({e})") from None
    if a.dtype == object or a.dtype.kind in "USb" and dtype is None:
        raise ApiError(400, f"input '{req.input_name}': 'data' must hold only numbers")
    expected = math.prod(req.shape)
    if a.size != expected:
        raise ApiError(400, f"input '{req.input_name}': 'data' has {a.size} elements but shape {req.shape} "
                            f"needs {expected}")
    return a.reshape(req.shape)


def infer_response(model: LoadedModel, req: InferRequest, logits: np.ndarray) -> dict:
    """The v2 inference response: output tensors flattened row-major, the request id echoed."""
    out = {"model_name": model.name, "model_version": model.version,
           "outputs": [{"name": model.output_name, "shape": list(logits.shape), "datatype": "FP32",
                        "data": logits.astype(np.float32).ravel().tolist()}]}
    if req.id is not None:
        out["id"] = req.id
    return out
