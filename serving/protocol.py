"""Open Inference Protocol (KServe v2) bodies, shared by REST and gRPC: tensors in, the model's input, tensors out.

Transport-free: REST (JSON, with Triton's binary tensor data extension) and gRPC (serving.grpc_server) both turn
their request into an InferRequest of numpy Tensors, `decode_inputs` makes the model's float32 batch of it, and
`output_tensors` gives back the requested outputs. Every problem with a request raises ApiError with a 4xx status
and a message naming the field and what would be right.
Spec: https://github.com/kserve/open-inference-protocol (inference_rest.md, inference_grpc.md); binary data:
https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_binary_data.md
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

import tlops
from serving.model import LoadedModel
from tlops.preprocess import ImageError, PreprocessSpec, load_and_preprocess, preprocess_uint8
from tlops.runtime import softmax
from tlops.text import TextError, TextSpec

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

LOGITS, PROBABILITIES, LABEL, LABEL_INDEX, EMBEDDING = "logits", "probabilities", "label", "label_index", "embedding"
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
    """A request the service refuses: HTTP status, message, and an optional stable reason code."""

    def __init__(self, status: int, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.reason = status, message, reason

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


# ---------------------------------------------------------------- metadata


def server_metadata() -> dict:
    return {"name": "tlops", "version": tlops.__version__, "extensions": EXTENSIONS}


def output_specs(model: LoadedModel) -> list[dict]:
    """Every output a client may ask for: logits (the default), probabilities, top-1 label and index, embedding."""
    classes = len(model.labels)
    specs = [{"name": LOGITS, "datatype": "FP32", "shape": [-1, classes]},
             {"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, classes]},
             {"name": LABEL, "datatype": BYTES, "shape": [-1]},
             {"name": LABEL_INDEX, "datatype": "INT64", "shape": [-1]}]
    if model.embedding_dim:
        specs.append({"name": EMBEDDING, "datatype": "FP32", "shape": [-1, model.embedding_dim]})
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


# ---------------------------------------------------------------- REST requests


def parse_rest_request(body: bytes, header_length: str | None = None) -> InferRequest:
    """POST .../infer: a JSON body, or with Inference-Header-Content-Length a JSON header followed by the binary
    data of the inputs that declare `binary_data_size`, in input order. ApiError(400) naming the first problem."""
    binary = b""
    if header_length is not None:
        size = _header_size(header_length, len(body))
        body, binary = body[:size], body[size:]
    try:
        req = orjson.loads(body)  # 5-10x the standard library on tensors of numbers; rejects NaN and Infinity
    except orjson.JSONDecodeError as e:
        raise ApiError(400, f"request body is not valid JSON ({e})") from None
    if not isinstance(req, dict):
        raise ApiError(400, f"request body must be a JSON object with an 'inputs' list, got {type(req).__name__}")
    rid, params = req.get("id"), req.get("parameters") or {}
    if rid is not None and not isinstance(rid, str):
        raise ApiError(400, f"'id' must be a string, got {type(rid).__name__}")
    if not isinstance(params, dict):
        raise ApiError(400, "'parameters' must be a JSON object")
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or not inputs or not all(isinstance(t, dict) for t in inputs):
        raise ApiError(400, f"'inputs' must be a non-empty list of tensor objects: '{TENSOR_INPUT}' (FP32 "
                            f"[N,3,S,S]), '{IMAGE_INPUT}' (UINT8 [N,H,W,C] or [H,W,C]) or '{FILE_INPUT}' (BYTES [N])")
    offset, tensors = 0, []
    for t in inputs[:MAX_INPUTS + 1]:
        name, dtype, shape = _tensor_header(t)
        tparams = t.get("parameters") or {}
        if not isinstance(tparams, dict):
            raise ApiError(400, f"input '{name}': 'parameters' must be a JSON object")
        size = tparams.get("binary_data_size")
        if size is not None:
            if "data" in t:
                raise ApiError(400, f"input '{name}': has both 'data' and binary_data_size; send one")
            if header_length is None:
                raise ApiError(400, f"input '{name}': binary_data_size without an Inference-Header-Content-Length "
                                    "header")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ApiError(400, f"input '{name}': binary_data_size must be a non-negative integer, got {size!r}")
            if offset + size > len(binary):
                raise ApiError(400, f"input '{name}': binary_data_size {size} runs past the end of the body "
                                    f"({len(binary) - offset} binary bytes left)")
            tensors.append(tensor_from_raw(name, dtype, shape, binary[offset:offset + size]))
            offset += size
        elif "data" in t:
            tensors.append(tensor_from_json(name, dtype, shape, t["data"]))
        else:
            raise ApiError(400, f"input '{name}': 'data' is missing (send JSON 'data' or binary data with "
                                "parameters.binary_data_size)")
    if offset != len(binary):
        raise ApiError(400, f"the body has {len(binary)} bytes of binary data after the JSON header but the inputs "
                            f"declare {offset} (binary_data_size)")
    binary_output = params.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise ApiError(400, "parameters.binary_data_output must be true or false")
    return InferRequest(checked_inputs(tensors), rid, params, _requested_outputs(req.get("outputs")), binary_output)


def _header_size(raw: str, body_size: int) -> int:
    if not (raw.strip().isascii() and raw.strip().isdigit()):
        raise ApiError(400, f"Inference-Header-Content-Length must be a non-negative integer, got {raw!r}")
    size = int(raw)
    if size == 0 or size > body_size:
        raise ApiError(400, f"Inference-Header-Content-Length {size} does not fit the body of {body_size} bytes "
                            "(it is the length of the JSON header that starts the body)")
    return size


def _tensor_header(t: dict) -> tuple[str, str, list[int]]:
    name, dtype, shape = t.get("name"), t.get("datatype"), t.get("shape")
    if not isinstance(name, str) or not isinstance(dtype, str):
        raise ApiError(400, "each input needs a string 'name' and 'datatype'")
    if (not isinstance(shape, list) or not shape
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise ApiError(400, f"input '{name}': 'shape' must be a non-empty list of non-negative integers")
    return name, dtype, shape


def _requested_outputs(outputs: Any) -> list[RequestedOutput] | None:
    if outputs is None:
        return None
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                for o in outputs):
        raise ApiError(400, "'outputs' must be a list of objects with a string 'name'")
    requested = []
    for o in outputs:
        binary = (o.get("parameters") or {}).get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise ApiError(400, f"output '{o['name']}': parameters.binary_data must be true or false")
        requested.append(RequestedOutput(o["name"], binary))
    return requested or None


def checked_inputs(tensors: list[Tensor]) -> list[Tensor]:
    if len(tensors) > MAX_INPUTS:
        raise ApiError(400, f"at most {MAX_INPUTS} inputs per request")
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ApiError(400, f"input names must be unique, got {names}; several samples go in one tensor's batch axis")
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


# ---------------------------------------------------------------- the model's input


def decode_inputs(req: InferRequest, model: LoadedModel, max_pixels: int, max_text_chars: int = MAX_TEXT_CHARS
                  ) -> np.ndarray:
    """The request's samples as the model's input, every input tensor's batch in order: float32 (N, 3, S, S) for an
    image model, int64 token ids (N, L) padded to the longest text for a text model."""
    known = {s["name"] for s in output_specs(model)}
    for name in req.output_names():
        if name not in known:
            raise ApiError(400, f"unknown output {name!r}; this model has {sorted(known)}")
    declared = sum(_declared_samples(t) for t in req.inputs)
    if declared > MAX_SAMPLES:  # before decoding: each sample becomes a 3 x S x S float input, however small it came
        raise ApiError(400, f"the request holds {declared} samples; at most {MAX_SAMPLES} per request",
                       reason="too_many_samples")
    if model.is_text:
        parts = [_text_samples(t, model, max_text_chars) for t in req.inputs]
    else:
        parts = [_samples(t, model, max_pixels) for t in req.inputs]
    return parts[0] if len(parts) == 1 else model.join(parts)


def _declared_samples(t: Tensor) -> int:
    """How many samples a tensor's shape declares: its batch axis ([H, W, C] images: one)."""
    if t.name == IMAGE_INPUT and len(t.shape) == 3:
        return 1
    return t.shape[0] if t.shape else 0


def _samples(t: Tensor, model: LoadedModel, max_pixels: int) -> np.ndarray:
    if t.name == TENSOR_INPUT:
        return _fp32_tensor(t, model)
    if t.name == IMAGE_INPUT:
        return _pixel_images(t, model, max_pixels)
    if t.name == FILE_INPUT:
        return _image_files(t, model, max_pixels)
    raise ApiError(400, f"unknown input {t.name!r}; send '{TENSOR_INPUT}' (FP32 {model.input_shape}), "
                        f"'{IMAGE_INPUT}' (UINT8 [N,H,W,C] or [H,W,C]) or '{FILE_INPUT}' (BYTES [N] of image files)")


def _text_samples(t: Tensor, model: LoadedModel, max_text_chars: int) -> np.ndarray:
    if t.name == TEXT_INPUT:
        if t.datatype != BYTES:
            raise ApiError(400, f"input '{TEXT_INPUT}' must have datatype BYTES (UTF-8 texts), got {t.datatype}")
        if len(t.shape) not in (1, 2) or (len(t.shape) == 2 and t.shape[1] != 1) or t.shape[0] < 1:
            raise ApiError(400, f"input '{TEXT_INPUT}' has shape {t.shape}; expected [N] or [N, 1], one text each")
        return decode_texts([(f"input '{TEXT_INPUT}' element {i}", bytes(data))
                             for i, data in enumerate(t.data.ravel())], model.spec, max_text_chars)
    if t.name == TENSOR_INPUT:
        return _token_tensor(t, model)
    raise ApiError(400, f"input {t.name!r}: this model reads text; send '{TEXT_INPUT}' (BYTES [N] of UTF-8 texts) "
                        f"or '{TENSOR_INPUT}' (INT64 [N, L] token ids of its tokenizer)")


def _token_tensor(t: Tensor, model: LoadedModel) -> np.ndarray:
    spec = model.spec
    if t.datatype not in ("INT64", "INT32"):
        raise ApiError(400, f"input '{TENSOR_INPUT}' of a text model holds token ids: datatype INT64, got {t.datatype}")
    if len(t.shape) != 2 or min(t.shape) < 1 or t.shape[1] > spec.max_tokens:
        raise ApiError(400, f"input '{TENSOR_INPUT}' has shape {t.shape}; expected [N, L] with N >= 1 and "
                            f"1 <= L <= {spec.max_tokens} (model.max_tokens)")
    ids = np.ascontiguousarray(t.data, np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= spec.vocab_size):
        raise ApiError(400, f"input '{TENSOR_INPUT}': token ids must be 0..{spec.vocab_size - 1} (the tokenizer's "
                            "vocabulary)")
    return ids


def decode_texts(texts: list[tuple[str, bytes]], spec: TextSpec, max_text_chars: int) -> np.ndarray:
    """(what to call it in an error, UTF-8 bytes) -> token ids (N, L) padded to the longest, tokenised as in training
    (tlops.text); 400 for a text that is not UTF-8 or empty, 413 for one over max_text_chars."""
    cleaned = []
    for label, data in texts:
        try:
            raw = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise ApiError(400, f"{label}: not_utf8: byte {e.start} is not UTF-8", reason="not_utf8") from None
        if len(raw) > max_text_chars:
            raise ApiError(413, f"{label}: {len(raw)} characters, over serve.max_text_chars = {max_text_chars}",
                           reason="text_too_long")
        try:
            cleaned.append(spec.clean(raw))
        except TextError as e:
            raise ApiError(400, f"{label}: {e.reason}: {e.detail}", reason=e.reason) from None
    return spec.pad(spec.encode(cleaned))


def _fp32_tensor(t: Tensor, model: LoadedModel) -> np.ndarray:
    want = model.input_shape
    if t.datatype != "FP32":
        raise ApiError(400, f"input '{TENSOR_INPUT}' must have datatype FP32, got {t.datatype}")
    if len(t.shape) != 4 or t.shape[0] < 1 or t.shape[1:] != want[1:]:
        dims = ", ".join(map(str, want[1:]))
        raise ApiError(400, f"input '{TENSOR_INPUT}' has shape {t.shape}; expected [N, {dims}] with N >= 1")
    if not np.isfinite(t.data).all():
        raise ApiError(400, f"input '{TENSOR_INPUT}' contains NaN or infinity")
    return np.ascontiguousarray(t.data, np.float32)


def _pixel_images(t: Tensor, model: LoadedModel, max_pixels: int) -> np.ndarray:
    if t.datatype not in ("UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"):
        raise ApiError(400, f"input '{IMAGE_INPUT}' must have datatype UINT8 (or another integer type with values "
                            f"0..255), got {t.datatype}")
    shape = [1, *t.shape] if len(t.shape) == 3 else t.shape
    if len(shape) != 4 or min(shape) < 1 or shape[3] not in CHANNELS:
        raise ApiError(400, f"input '{IMAGE_INPUT}' has shape {t.shape}; expected [N, H, W, C] or [H, W, C] "
                            f"with C in {CHANNELS} (HWC layout, RGB order)")
    if shape[1] * shape[2] > max_pixels:
        raise ApiError(400, f"input '{IMAGE_INPUT}' images are {shape[1]}x{shape[2]} pixels, over the limit of "
                            f"{max_pixels}", reason="too_many_pixels")
    a = t.data.reshape(shape)
    if a.dtype != np.uint8 and a.size and (a.min() < 0 or a.max() > 255):
        raise ApiError(400, f"input '{IMAGE_INPUT}' data must be integers 0..255 (pixel values)")
    a = a.astype(np.uint8, copy=False)
    return np.stack([preprocess_uint8(img, model.spec) for img in a])


def _image_files(t: Tensor, model: LoadedModel, max_pixels: int) -> np.ndarray:
    if t.datatype != BYTES:
        raise ApiError(400, f"input '{FILE_INPUT}' must have datatype BYTES, got {t.datatype}")
    if len(t.shape) not in (1, 2) or (len(t.shape) == 2 and t.shape[1] != 1) or t.shape[0] < 1:
        raise ApiError(400, f"input '{FILE_INPUT}' has shape {t.shape}; expected [N] or [N, 1], one image file each")
    return decode_files([(f"input '{FILE_INPUT}' element {i}", bytes(data)) for i, data in enumerate(t.data.ravel())],
                        model.spec, max_pixels)


def decode_files(files: list[tuple[str, bytes]], spec: PreprocessSpec, max_pixels: int) -> np.ndarray:
    """(what to call it in an error, encoded image) -> the model's input, one image decoded at a time (so one
    full-size image is in memory at once); ApiError 415 for a file that is no image, 400 for a broken one."""
    arrays = []
    for label, data in files:
        try:
            arrays.append(load_and_preprocess(data, spec, max_pixels))
        except ImageError as e:
            status = 415 if e.reason == "not_an_image" else 400
            raise ApiError(status, f"{label}: {e.reason}: {e.detail}", reason=e.reason) from None
    return np.stack(arrays)


# ---------------------------------------------------------------- outputs


def output_tensors(model: LoadedModel, names: list[str], logits: np.ndarray,
                   embedding: np.ndarray | None) -> list[Tensor]:
    """The requested outputs (names checked by decode_inputs) for a batch of logits (and embeddings)."""
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
    return out


def raw_bytes(t: Tensor) -> bytes:
    """A tensor's binary form: little-endian row-major, or serialised BYTES."""
    if t.datatype == BYTES:
        return serialize_bytes(t.data)
    return np.ascontiguousarray(t.data, t.data.dtype.newbyteorder("<")).tobytes()


def rest_response(model: LoadedModel, req: InferRequest, tensors: list[Tensor]) -> tuple[bytes, dict[str, str]]:
    """The v2 inference response body and its headers: JSON, or a JSON header + binary outputs when asked for."""
    binary_of = {o.name: o.binary for o in req.outputs or ()}
    outputs, chunks = [], []
    for t in tensors:
        entry: dict[str, Any] = {"name": t.name, "shape": t.shape, "datatype": t.datatype}
        binary = binary_of.get(t.name)
        if binary if binary is not None else req.binary_output:
            raw = raw_bytes(t)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif t.datatype == BYTES:
            entry["data"] = [b.decode("utf-8", "replace") for b in t.data.ravel()]
        else:
            entry["data"] = np.ascontiguousarray(t.data).ravel()
        outputs.append(entry)
    head: dict[str, Any] = {"model_name": model.name, "model_version": model.version, "outputs": outputs}
    if req.id is not None:
        head["id"] = req.id
    header = orjson.dumps(head, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return header, {"content-type": "application/json"}
    return b"".join([header, *chunks]), {"content-type": "application/octet-stream",
                                         "inference-header-content-length": str(len(header))}
