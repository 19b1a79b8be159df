"""Open Inference Protocol (KServe v2), transport-free: the request and its tensors, the outputs, the metadata.

Both wire formats convert here and only here: serving.rest_codec (JSON, with Triton's binary tensor data extension)
and serving.grpc_codec (grpc_predict_v2.proto) each turn a request into an InferRequest of numpy Tensors, and the
requested outputs back. serving.inputs makes the model's input of an InferRequest. Every problem with a request
raises ApiError with a 4xx status and a message naming the field and what would be right.
Spec: https://github.com/kserve/open-inference-protocol (inference_rest.md, inference_grpc.md); binary data:
https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_binary_data.md
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import tlops
from serving.served_model import LoadedModel, Outputs
from tlops.onnx.runtime import softmax

PLATFORM = "onnxruntime_onnx"  # Triton's name for this backend; v2 clients display it as is
TENSOR_INPUT = "input"         # FP32 [N, 3, S, S], already preprocessed
IMAGE_INPUT = "image"          # UINT8 (or any integer type, values 0..255) [N, H, W, C] or [H, W, C]; preprocessed here
FILE_INPUT = "image_bytes"     # BYTES [N]: encoded image files (PNG, JPEG, ...), decoded and preprocessed here
TEXT_INPUT = "text"            # text models: BYTES [N] of UTF-8 texts, tokenised here ('input' is then INT64 token ids)
INPUT_NAMES = (TENSOR_INPUT, IMAGE_INPUT, FILE_INPUT, TEXT_INPUT)
MAX_TEXT_CHARS = 100_000  # serve.max_text_chars' default
CHANNELS = (1, 3, 4)
MAX_INPUTS = 16
MAX_SAMPLES = 256  # per request, over all its inputs, as /predict's MAX_IMAGES: bounds the decoded floats in memory
MAX_DIM = 2**31 - 1  # no dimension of a real tensor is larger; a larger one is refused before any arithmetic on it

LOGITS, PROBABILITIES, LABEL, LABEL_INDEX, EMBEDDING = "logits", "probabilities", "label", "label_index", "embedding"
OOD_SCORE, UNKNOWN, EXPLANATION = "ood_score", "unknown", "explanation"  # the explanation: computed when asked
DEFAULT_OUTPUTS = (LOGITS,)
HEADER_LENGTH = "inference-header-content-length"
# The extensions of the v2 protocol this server implements (GET /v2 lists them, as Triton does).
EXTENSIONS = ["binary_tensor_data", "classification_outputs", "model_repository_metadata"]

DTYPES: dict[str, np.dtype] = {name: np.dtype(t) for name, t in {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}.items()}
BYTES = "BYTES"


class ApiError(Exception):
    """A request the service refuses: HTTP status, message, an optional stable reason code and response headers."""

    def __init__(self, status: int, message: str, reason: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.reason = status, message, reason
        self.headers = headers or ({"Retry-After": "1"} if status == 503 else {})

    def body(self) -> dict:
        return {"error": self.message, **({"reason": self.reason} if self.reason else {})}


@dataclass
class Tensor:
    """A named tensor: numeric data as an array of `shape`; BYTES as a flat object array of bytes."""

    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray


@dataclass
class RequestedOutput:
    name: str
    binary: bool | None = None  # None: as the request's binary_data_output says


@dataclass
class InferRequest:
    inputs: list[Tensor]
    id: str | None = None
    parameters: dict = field(default_factory=dict)
    outputs: list[RequestedOutput] | None = None  # None: DEFAULT_OUTPUTS
    binary_output: bool = False

    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs] if self.outputs else list(DEFAULT_OUTPUTS)

    def declared_samples(self) -> int:
        """How many samples the inputs' shapes declare (their batch axes; an [H, W, C] image is one)."""
        return sum(1 if t.name == IMAGE_INPUT and len(t.shape) == 3 else t.shape[0] for t in self.inputs)


# ---------------------------------------------------------------- metadata


def server_metadata() -> dict:
    return {"name": "tlops", "version": tlops.__version__, "extensions": EXTENSIONS}


def output_specs(model: LoadedModel) -> list[dict]:
    """Every output a client may ask for: logits (the default), probabilities, top-1 label and index, embedding,
    and when the model has them the OOD score with its unknown verdict and the explanation (computed only when
    requested)."""
    classes = len(model.labels)
    specs = [{"name": LOGITS, "datatype": "FP32", "shape": [-1, classes]},
             {"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, classes]},
             {"name": LABEL, "datatype": BYTES, "shape": [-1]},
             {"name": LABEL_INDEX, "datatype": "INT64", "shape": [-1]}]
    if model.embedding_dim:
        specs.append({"name": EMBEDDING, "datatype": "FP32", "shape": [-1, model.embedding_dim]})
    if model.ood_name:
        specs += [{"name": OOD_SCORE, "datatype": "FP32", "shape": [-1]},
                  {"name": UNKNOWN, "datatype": "BOOL", "shape": [-1]}]
    if model.explanation_name:
        out = next(o for o in model.session.get_outputs() if o.name == model.explanation_name)
        specs.append({"name": EXPLANATION, "datatype": "FP32",
                      "shape": [-1] + [d if isinstance(d, int) else -1 for d in out.shape[1:]]})
    return specs


def input_specs(model: LoadedModel) -> list[dict]:
    if model.is_text:
        return [{"name": TEXT_INPUT, "datatype": BYTES, "shape": [-1]},
                {"name": TENSOR_INPUT, "datatype": "INT64", "shape": model.input_shape}]
    return [{"name": TENSOR_INPUT, "datatype": "FP32", "shape": model.input_shape},
            {"name": IMAGE_INPUT, "datatype": "UINT8", "shape": [-1, -1, -1, 3]},
            {"name": FILE_INPUT, "datatype": BYTES, "shape": [-1]}]


def model_metadata(model: LoadedModel) -> dict:
    """GET /v2/models/{name}: the tensors a client may send and will get back."""
    return {
        "name": model.name,
        "versions": [model.version],
        "platform": PLATFORM,
        "inputs": input_specs(model),
        "outputs": output_specs(model),
        "parameters": {
            "labels": list(model.labels),
            "preprocess": model.spec.identity(),  # a text model's tokenizer by its sha256 (it is in the file)
            "sha256": model.sha256,
            "default_outputs": list(DEFAULT_OUTPUTS),
            **{k.removeprefix("tlops."): v for k, v in model.metadata.items()
               if k.startswith("tlops.") and k not in ("tlops.labels", "tlops.preprocess", "tlops.drift_reference",
                                                       "tlops.tokenizer")},
        },
    }


# ---------------------------------------------------------------- checks both wire formats share


def check_shape(name: str, shape: list[Any]) -> list[int]:
    """A tensor's shape: a non-empty list of non-negative integers, none past MAX_DIM; ApiError(400) naming it."""
    if (not isinstance(shape, list) or not shape
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM for d in shape)):
        raise ApiError(400, f"input {shown(name)}: 'shape' must be a non-empty list of integers 0..{MAX_DIM}")
    return shape


def checked_outputs(outputs: list[RequestedOutput]) -> list[RequestedOutput] | None:
    """Each output at most once: a repeated name would multiply the response at no cost to the client."""
    seen: set[str] = set()
    for o in outputs:
        if o.name in seen:
            raise ApiError(400, f"'outputs' names {shown(o.name)} more than once; ask for each output once",
                           reason="repeated_output")
        seen.add(o.name)
    return outputs or None


def shown(value: Any, limit: int = 64) -> str:
    """A client's value as an error message may quote it: repr, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def checked_inputs(tensors: list[Tensor]) -> list[Tensor]:
    """1..MAX_INPUTS tensors of distinct names, each holding at least one sample."""
    if not tensors or len(tensors) > MAX_INPUTS:
        raise ApiError(400, f"a request holds 1 to {MAX_INPUTS} input tensors, got {len(tensors)}")
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ApiError(400, f"input names must be unique, got {shown(names)}; several samples go in one tensor's "
                            "batch axis")
    empty = [t.name for t in tensors if 0 in t.shape]
    if empty:
        raise ApiError(400, f"input {shown(empty[0])} has a zero dimension: it holds no sample")
    return tensors


# ---------------------------------------------------------------- tensors from JSON, raw bytes


def tensor_from_json(name: str, datatype: str, shape: list[int], data: Any) -> Tensor:
    """JSON data (flat row-major or nested, both allowed by the spec) -> Tensor of `shape`."""
    if not isinstance(data, list):
        raise ApiError(400, f"input '{name}': 'data' must be a JSON array")
    if datatype == BYTES:
        flat = _flatten(data, name)
        if not all(isinstance(x, str) for x in flat):
            raise ApiError(400, f"input '{name}': BYTES data in JSON must be strings")
        check_count(name, len(flat), shape)
        return Tensor(name, datatype, shape, object_array([x.encode("utf-8") for x in flat]))
    dtype = _dtype(name, datatype)
    try:
        a = np.asarray(data)
    except (ValueError, TypeError, OverflowError) as e:
        raise ApiError(400, f"input '{name}': 'data' is not a rectangular array of {datatype} numbers ({e})") from None
    if a.size and a.dtype.kind not in "biuf":
        raise ApiError(400, f"input '{name}': 'data' must hold only numbers")
    if a.size and dtype.kind in "iu" and a.dtype.kind == "f":
        raise ApiError(400, f"input '{name}': {datatype} data must be integers, got floats")
    if dtype.kind in "iu" and a.size and (a.min() < np.iinfo(dtype).min or a.max() > np.iinfo(dtype).max):
        raise ApiError(400, f"input '{name}': values out of the {datatype} range")
    check_count(name, a.size, shape)
    return Tensor(name, datatype, shape, a.astype(dtype, copy=False).reshape(shape))


def tensor_from_raw(name: str, datatype: str, shape: list[int], raw: bytes) -> Tensor:
    """Binary tensor data (little-endian, row-major; BYTES as 4-byte-length-prefixed elements) -> Tensor."""
    count = math.prod(shape)
    if datatype == BYTES:
        return Tensor(name, datatype, shape, deserialize_bytes(raw, count, name))
    dtype = _dtype(name, datatype)
    if len(raw) != count * dtype.itemsize:
        raise ApiError(400, f"input '{name}': {len(raw)} bytes of binary data, but {datatype} {shape} needs "
                            f"{count * dtype.itemsize}")
    return Tensor(name, datatype, shape, np.frombuffer(raw, dtype.newbyteorder("<")).astype(dtype).reshape(shape))


def deserialize_bytes(raw: bytes, count: int, name: str = "tensor") -> np.ndarray:
    """Triton's BYTES serialisation: each element a uint32 little-endian length, then that many bytes."""
    out, pos = [], 0
    for i in range(count):
        if pos + 4 > len(raw):
            raise ApiError(400, f"input '{name}': BYTES data ends at element {i} of {count}")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise ApiError(400, f"input '{name}': BYTES element {i} declares {n} bytes, past the end of the data")
        out.append(raw[pos:pos + n])
        pos += n
    if pos != len(raw):
        raise ApiError(400, f"input '{name}': {len(raw) - pos} bytes left after the {count} BYTES elements")
    return object_array(out)


def serialize_bytes(items: np.ndarray) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items.ravel())


def object_array(items: list[bytes]) -> np.ndarray:
    a = np.empty(len(items), dtype=object)
    a[:] = items
    return a


def _flatten(data: list, name: str, depth: int = 0) -> list:
    if depth > 8:
        raise ApiError(400, f"input '{name}': 'data' is nested too deeply")
    out: list = []
    for x in data:
        out.extend(_flatten(x, name, depth + 1) if isinstance(x, list) else [x])
    return out


def _dtype(name: str, datatype: str) -> np.dtype:
    if datatype not in DTYPES:
        raise ApiError(400, f"input '{name}': unknown datatype {datatype!r}; one of {[*DTYPES, BYTES]}")
    return DTYPES[datatype]


def check_count(name: str, size: int, shape: list[int]) -> None:
    if size != math.prod(shape):
        raise ApiError(400, f"input '{name}': 'data' has {size} elements but shape {shape} needs {math.prod(shape)}")


# ---------------------------------------------------------------- outputs


def check_output_names(req: InferRequest, model: LoadedModel) -> None:
    """ApiError(400) for an output the model does not have."""
    known = {s["name"] for s in output_specs(model)}
    for name in req.output_names():
        if name not in known:
            raise ApiError(400, f"unknown output {shown(name)}; this model has {sorted(known)}")


def output_tensors(model: LoadedModel, names: list[str], outputs: Outputs) -> list[Tensor]:
    """The requested outputs (names checked by check_output_names) of one model run."""
    logits, embedding = outputs.logits, outputs.embedding
    n = len(logits)
    out = []
    for name in names:
        if name == LOGITS:
            out.append(Tensor(name, "FP32", list(logits.shape), logits.astype(np.float32, copy=False)))
        elif name == PROBABILITIES:
            out.append(Tensor(name, "FP32", list(logits.shape), softmax(logits).astype(np.float32)))
        elif name == LABEL:
            out.append(Tensor(name, BYTES, [n], object_array([model.labels[i].encode() for i in logits.argmax(1)])))
        elif name == LABEL_INDEX:
            out.append(Tensor(name, "INT64", [n], logits.argmax(1).astype(np.int64)))
        elif name == EMBEDDING and embedding is not None:
            out.append(Tensor(name, "FP32", list(embedding.shape), embedding.astype(np.float32, copy=False)))
        elif name == OOD_SCORE and outputs.ood_score is not None:
            out.append(Tensor(name, "FP32", [n], outputs.ood_score.astype(np.float32, copy=False)))
        elif name == UNKNOWN and outputs.ood_score is not None:
            out.append(Tensor(name, "BOOL", [n], model.unknown(outputs.ood_score)))
        elif name == EXPLANATION and outputs.explanation is not None:
            e = outputs.explanation.astype(np.float32, copy=False)
            out.append(Tensor(name, "FP32", list(e.shape), e))
    return out


def wants_explanation(req: InferRequest) -> bool:
    """Whether a v2 request asks for the explanation (the only way the model computes it)."""
    return EXPLANATION in req.output_names()


def raw_bytes(t: Tensor) -> bytes:
    """A tensor's binary form: little-endian row-major, or serialised BYTES."""
    if t.datatype == BYTES:
        return serialize_bytes(t.data)
    return np.ascontiguousarray(t.data, t.data.dtype.newbyteorder("<")).tobytes()
