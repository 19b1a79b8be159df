"""The Open Inference Protocol over gRPC (KServe grpc_predict_v2.proto), beside the HTTP API in the same process.

A grpc.aio server on serve.grpc_port runs in the service's event loop and calls the same Service as the HTTP
routes: the same model, micro-batcher, queue and size limits, timeout and metrics (route label
/inference.GRPCInferenceService/<RPC>, method GRPC, status the HTTP equivalent). Tensors arrive raw
(`raw_input_contents`, what Triton's and KServe's clients send) or typed (`contents`); outputs go back raw.

The messages come from the compiled descriptor serving/proto/grpc_predict_v2.binpb, built into a pool of our own:
no generated code, and no clash with a client library (tritonclient, kserve) that registers the same message names
in protobuf's default pool of the same process.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from serving import protocol
from serving.protocol import ApiError, InferRequest, RequestedOutput, Tensor

if TYPE_CHECKING:
    import grpc

    from serving.app import Service

log = logging.getLogger("serving.grpc")

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

    codes = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
             413: grpc.StatusCode.RESOURCE_EXHAUSTED, 415: grpc.StatusCode.INVALID_ARGUMENT,
             503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED}
    return codes.get(http_status, grpc.StatusCode.INTERNAL)


# ---------------------------------------------------------------- requests and responses


def infer_request(msg: Any) -> InferRequest:
    """A ModelInferRequest as the transport-free InferRequest; ApiError(400) naming the first problem."""
    raw = list(msg.raw_input_contents)
    if raw and len(raw) != len(msg.inputs):
        raise ApiError(400, f"raw_input_contents has {len(raw)} entries for {len(msg.inputs)} inputs; send one per "
                            "input, or none and use contents")
    tensors = []
    for i, t in enumerate(msg.inputs[:protocol.MAX_INPUTS + 1]):
        shape = list(t.shape)
        if not shape or any(d < 0 for d in shape):
            raise ApiError(400, f"input '{t.name}': 'shape' must be a non-empty list of non-negative integers")
        if raw:
            tensors.append(protocol.tensor_from_raw(t.name, t.datatype, shape, raw[i]))
        else:
            tensors.append(_from_contents(t, shape))
    outputs = [RequestedOutput(o.name) for o in msg.outputs] or None
    return InferRequest(protocol.checked_inputs(tensors), msg.id or None, {}, outputs)


def _from_contents(t: Any, shape: list[int]) -> Tensor:
    field = CONTENTS.get(t.datatype)
    if field is None:
        raise ApiError(400, f"input '{t.name}': datatype {t.datatype!r} must be sent in raw_input_contents")
    values = list(getattr(t.contents, field))
    if t.datatype == protocol.BYTES:
        protocol.check_count(t.name, len(values), shape)
        return Tensor(t.name, t.datatype, shape, protocol.object_array(values))
    return protocol.tensor_from_json(t.name, t.datatype, shape, values)  # the same checks as JSON numbers


def infer_response(model: Any, req: InferRequest, tensors: list[Tensor]) -> Any:
    m = messages()
    out = m["ModelInferResponse"](model_name=model.name, model_version=model.version, id=req.id or "")
    for t in tensors:
        out.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        out.raw_output_contents.append(protocol.raw_bytes(t))
    return out


def metadata_response(model: Any) -> Any:
    m, meta = messages(), protocol.model_metadata(model)
    out = m["ModelMetadataResponse"](name=meta["name"], versions=meta["versions"], platform=meta["platform"])
    for spec in meta["inputs"]:
        out.inputs.add(**spec)
    for spec in meta["outputs"]:
        out.outputs.add(**spec)
    return out


# ---------------------------------------------------------------- the server


class Handlers:
    """The RPCs, each an async function of (request message, context) over the shared Service."""

    def __init__(self, service: Service) -> None:
        self.service = service

    async def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: N802 - the protocol's RPC names
        return messages()["ServerLiveResponse"](live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        return messages()["ServerReadyResponse"](ready=self.service.ready)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        meta = protocol.server_metadata()
        return messages()["ServerMetadataResponse"](**meta)

    async def ModelReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        try:
            self.service.model_for(request.name, request.version or None)
        except ApiError as e:
            if e.status != 503:
                raise
            return messages()["ModelReadyResponse"](ready=False)
        return messages()["ModelReadyResponse"](ready=True)

    async def ModelMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        return metadata_response(self.service.model_for(request.name, request.version or None))

    async def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802
        service = self.service
        model = service.model_for(request.model_name, request.model_version or None)

        def prepare() -> tuple[InferRequest, np.ndarray]:
            req = infer_request(request)
            x = protocol.decode_inputs(req, model, service.params.max_pixels,
                                          service.params.max_text_chars)
            service.keep_inputs(req)
            return req, x

        req, out, used = await service.infer(model, prepare)
        tensors = protocol.output_tensors(used, req.output_names(), out.logits, out.embedding)
        return infer_response(used, req, tensors)


def _wrap(service: Service, name: str, fn: Callable[[Any, Any], Awaitable[Any]]) -> Callable:
    """An RPC with the HTTP routes' bookkeeping: metrics by route and status, ApiError -> its gRPC status."""
    route = f"/{SERVICE}/{name}"

    async def rpc(request: Any, context: Any) -> Any:
        t0, status = time.perf_counter(), 200
        service.metrics.in_flight.inc()
        try:
            return await fn(request, context)
        except ApiError as e:
            status = e.status
            await context.abort(status_code(e.status), e.message)
        except Exception:
            status = 500
            log.exception("unexpected error in %s", name)
            raise
        finally:
            service.metrics.in_flight.dec()
            service.metrics.observe_request(route, "GRPC", status, time.perf_counter() - t0)

    return rpc


async def start(service: Service, host: str, port: int, max_message_bytes: int) -> tuple[Any, int]:
    """Start the gRPC server in the running event loop; return (server, the port it bound)."""
    import grpc
    from grpc import aio

    m, handlers = messages(), Handlers(service)
    rpcs = {}
    for name in ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer"):
        rpcs[name] = grpc.unary_unary_rpc_method_handler(
            _wrap(service, name, getattr(handlers, name)), request_deserializer=m[f"{name}Request"].FromString,
            response_serializer=m[f"{name}Response"].SerializeToString)
    server = aio.server(options=[("grpc.max_receive_message_length", max_message_bytes),
                                 ("grpc.max_send_message_length", -1), ("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, rpcs),))
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as e:
        raise OSError(f"gRPC cannot listen on {host}:{port} ({e}); free the port or set serve.grpc_port") from None
    if not bound:
        raise OSError(f"gRPC cannot listen on {host}:{port}; free the port or set serve.grpc_port")
    await server.start()
    log.info("gRPC (Open Inference Protocol) on %s:%d", host, bound)
    return server, bound
