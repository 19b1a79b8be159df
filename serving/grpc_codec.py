"""The v2 protocol's gRPC wire format (KServe grpc_predict_v2.proto) to and from InferRequest. Tensors arrive raw
(`raw_input_contents`, what Triton's and KServe's clients send) or typed (`contents`); outputs go back raw.

The messages come from the compiled descriptor serving/proto/grpc_predict_v2.binpb, built into a pool of our own:
no generated code, and no clash with a client library (tritonclient, kserve) that registers the same message names
in protobuf's default pool of the same process.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serving import protocol
from serving.protocol import ApiError, InferRequest, RequestedOutput, Tensor, shown
from serving.served_model import LoadedModel

if TYPE_CHECKING:
    import grpc

DESCRIPTOR = Path(__file__).parent / "proto" / "grpc_predict_v2.binpb"
SERVICE = "inference.GRPCInferenceService"
CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
            "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
            "FP64": "fp64_contents", "BYTES": "bytes_contents"}


@functools.cache
def messages() -> dict[str, type]:
    """The protocol's message classes by name (ModelInferRequest, ...), from the compiled descriptor."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR.read_bytes()).file
    pool = descriptor_pool.DescriptorPool()
    for f in files:
        pool.Add(f)
    return {name.removeprefix("inference."): cls for name, cls in message_factory.GetMessages(files, pool=pool).items()}


def status_code(http_status: int) -> grpc.StatusCode:
    """The gRPC status of an ApiError's HTTP status."""
    import grpc

    codes = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
             403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
             413: grpc.StatusCode.RESOURCE_EXHAUSTED, 415: grpc.StatusCode.INVALID_ARGUMENT,
             503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED}
    return codes.get(http_status, grpc.StatusCode.INTERNAL)


def infer_request(msg: Any) -> InferRequest:
    """A ModelInferRequest as the transport-free InferRequest; ApiError(400) naming the first problem."""
    raw = list(msg.raw_input_contents)
    if raw and len(raw) != len(msg.inputs):
        raise ApiError(400, f"raw_input_contents has {len(raw)} entries for {len(msg.inputs)} inputs; send one per "
                            "input, or none and use contents")
    if len(msg.inputs) > protocol.MAX_INPUTS:
        raise ApiError(400, f"at most {protocol.MAX_INPUTS} inputs per request")
    outputs = protocol.checked_outputs([RequestedOutput(o.name) for o in msg.outputs])
    tensors = []
    for i, t in enumerate(msg.inputs):
        shape = protocol.check_shape(t.name, list(t.shape))
        if raw:
            tensors.append(protocol.tensor_from_raw(t.name, t.datatype, shape, raw[i]))
        else:
            tensors.append(_from_contents(t, shape))
    return InferRequest(protocol.checked_inputs(tensors), msg.id or None, {}, outputs)


def _from_contents(t: Any, shape: list[int]) -> Tensor:
    field = CONTENTS.get(t.datatype)
    if field is None:
        raise ApiError(400, f"input {shown(t.name)}: datatype {shown(t.datatype)} must be sent in raw_input_contents")
    values = list(getattr(t.contents, field))
    if t.datatype == protocol.BYTES:
        protocol.check_count(t.name, len(values), shape)
        return Tensor(t.name, t.datatype, shape, protocol.object_array(values))
    return protocol.tensor_from_json(t.name, t.datatype, shape, values)  # the same checks as JSON numbers


def infer_response(model: LoadedModel, req: InferRequest, tensors: list[Tensor]) -> Any:
    m = messages()
    out = m["ModelInferResponse"](model_name=model.name, model_version=model.version, id=req.id or "")
    for t in tensors:
        out.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        out.raw_output_contents.append(protocol.raw_bytes(t))
    return out


def metadata_response(model: LoadedModel) -> Any:
    m, meta = messages(), protocol.model_metadata(model)
    out = m["ModelMetadataResponse"](name=meta["name"], versions=meta["versions"], platform=meta["platform"])
    for spec in meta["inputs"]:
        out.inputs.add(**spec)
    for spec in meta["outputs"]:
        out.outputs.add(**spec)
    return out
