"""The v2 protocol's REST wire format: a JSON body, or a JSON header followed by binary tensor data (Triton's
binary_data extension: Inference-Header-Content-Length, per-tensor binary_data_size), to and from InferRequest.

Spec: https://github.com/kserve/open-inference-protocol (inference_rest.md); binary data:
https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_binary_data.md
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from serving.protocol import (
    BYTES,
    FILE_INPUT,
    IMAGE_INPUT,
    MAX_INPUTS,
    TENSOR_INPUT,
    ApiError,
    InferRequest,
    RequestedOutput,
    Tensor,
    check_shape,
    checked_inputs,
    checked_outputs,
    raw_bytes,
    shown,
    tensor_from_json,
    tensor_from_raw,
)
from serving.served_model import LoadedModel

HEADER_LENGTH = "inference-header-content-length"


def parse_request(body: bytes, header_length: str | None = None) -> InferRequest:
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
    if len(inputs) > MAX_INPUTS:
        raise ApiError(400, f"at most {MAX_INPUTS} inputs per request")
    outputs = _requested_outputs(req.get("outputs"))  # before any tensor is converted: a bad request costs little
    binary_output = params.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise ApiError(400, "parameters.binary_data_output must be true or false")
    offset, tensors = 0, []
    for t in inputs:
        name, dtype, shape = _tensor_header(t)
        tparams = t.get("parameters") or {}
        if not isinstance(tparams, dict):
            raise ApiError(400, f"input {shown(name)}: 'parameters' must be a JSON object")
        size = tparams.get("binary_data_size")
        if size is not None:
            if "data" in t:
                raise ApiError(400, f"input {shown(name)}: has both 'data' and binary_data_size; send one")
            if header_length is None:
                raise ApiError(400, f"input {shown(name)}: binary_data_size without an Inference-Header-Content-Length "
                                    "header")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ApiError(400, f"input {shown(name)}: binary_data_size must be a non-negative integer, "
                                    f"got {shown(size)}")
            if offset + size > len(binary):
                raise ApiError(400, f"input {shown(name)}: binary_data_size {size} runs past the end of the body "
                                    f"({len(binary) - offset} binary bytes left)")
            tensors.append(tensor_from_raw(name, dtype, shape, binary[offset:offset + size]))
            offset += size
        elif "data" in t:
            tensors.append(tensor_from_json(name, dtype, shape, t["data"]))
        else:
            raise ApiError(400, f"input {shown(name)}: 'data' is missing (send JSON 'data' or binary data with "
                                "parameters.binary_data_size)")
    if offset != len(binary):
        raise ApiError(400, f"the body has {len(binary)} bytes of binary data after the JSON header but the inputs "
                            f"declare {offset} (binary_data_size)")
    return InferRequest(checked_inputs(tensors), rid, params, outputs, binary_output)


def _header_size(raw: str, body_size: int) -> int:
    if not (raw.strip().isascii() and raw.strip().isdigit()) or len(raw.strip()) > 18:
        raise ApiError(400, "Inference-Header-Content-Length must be a non-negative integer")
    size = int(raw)
    if size == 0 or size > body_size:
        raise ApiError(400, f"Inference-Header-Content-Length {size} does not fit the body of {body_size} bytes "
                            "(it is the length of the JSON header that starts the body)")
    return size


def _tensor_header(t: dict) -> tuple[str, str, list[int]]:
    name, dtype, shape = t.get("name"), t.get("datatype"), t.get("shape")
    if not isinstance(name, str) or not isinstance(dtype, str):
        raise ApiError(400, "each input needs a string 'name' and 'datatype'")
    return name, dtype, check_shape(name, shape)


def _requested_outputs(outputs: Any) -> list[RequestedOutput] | None:
    if outputs is None:
        return None
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                for o in outputs):
        raise ApiError(400, "'outputs' must be a list of objects with a string 'name'")
    requested = []
    for o in outputs:
        params = o.get("parameters") or {}
        if not isinstance(params, dict):
            raise ApiError(400, f"output {shown(o['name'])}: 'parameters' must be a JSON object")
        binary = params.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise ApiError(400, f"output {shown(o['name'])}: parameters.binary_data must be true or false")
        requested.append(RequestedOutput(o["name"], binary))
    return checked_outputs(requested)


def response(model: LoadedModel, req: InferRequest, tensors: list[Tensor]) -> tuple[bytes, dict[str, str]]:
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
                                         HEADER_LENGTH: str(len(header))}
