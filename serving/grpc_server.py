"""The gRPC adapter: the Open Inference Protocol's RPCs over the data plane, beside the HTTP API in one process.

A grpc.aio server on serve.grpc_port runs in the service's event loop and calls the same Service as the HTTP routes:
the same model, budget, micro-batcher, limits, timeout and metrics (route label /inference.GRPCInferenceService/<RPC>,
method GRPC, status the HTTP equivalent). The wire conversion is serving.grpc_codec's. ModelInfer needs the API key
when the inference group is guarded, ServerMetadata and ModelMetadata when metadata is; the health RPCs never do.
TLS (and mutual TLS) by serve.tls_*; limits on message sizes, concurrent RPCs and connection age by serve.*.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from serving import grpc_codec, protocol
from serving.dataplane import Job, Service, TensorJob
from serving.protocol import ApiError
from serving.security import Guard, grpc_credentials
from serving.served_model import LoadedModel, Outputs
from tlops.core.config import ServeParams

log = logging.getLogger("serving.grpc")

MAX_SEND_BYTES = 64 * 1024 * 1024  # Triton's cap; the largest real answer (256 samples, every output) is far below
GROUPS = {"ModelInfer": "inference", "ServerMetadata": "metadata", "ModelMetadata": "metadata",
          "ServerLive": "health", "ServerReady": "health", "ModelReady": "health"}


class Handlers:
    """The RPCs, each an async function of (request message, context) over the shared Service."""

    def __init__(self, service: Service) -> None:
        self.service = service

    async def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: N802 - the protocol's RPC names
        return grpc_codec.messages()["ServerLiveResponse"](live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        return grpc_codec.messages()["ServerReadyResponse"](ready=self.service.ready)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        return grpc_codec.messages()["ServerMetadataResponse"](**protocol.server_metadata())

    async def ModelReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        try:
            self.service.model_for(request.name, request.version or None)
        except ApiError as e:
            if e.status != 503:
                raise
            return grpc_codec.messages()["ModelReadyResponse"](ready=False)
        return grpc_codec.messages()["ModelReadyResponse"](ready=True)

    async def ModelMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        return grpc_codec.metadata_response(self.service.model_for(request.name, request.version or None))

    async def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802
        model = self.service.model_for(request.model_name, request.model_version or None)

        def respond(job: Job, used: LoadedModel, y: Outputs) -> Any:
            req = job.req
            return grpc_codec.infer_response(used, req, protocol.output_tensors(used, req.output_names(), y))

        return await self.service.run(model, lambda: TensorJob(grpc_codec.infer_request(request)), respond)


def _wrap(service: Service, guard: Guard, name: str, fn: Callable[[Any, Any], Awaitable[Any]]) -> Callable:
    """An RPC with the HTTP routes' bookkeeping: the key check, metrics by route and status, ApiError -> its gRPC
    status."""
    route = f"/{grpc_codec.SERVICE}/{name}"
    group = GROUPS[name]

    async def rpc(request: Any, context: Any) -> Any:
        t0, status = time.perf_counter(), 200
        service.metrics.in_flight.inc()
        try:
            if guard.requires_key(group) and not guard.authorized(dict(context.invocation_metadata() or ()).get(
                    "authorization")):
                raise ApiError(401, "this RPC needs the service's API key: send metadata authorization: Bearer <key>")
            return await fn(request, context)
        except ApiError as e:
            status = e.status
            await context.abort(grpc_codec.status_code(e.status), e.message)
        except Exception:
            status = 500
            log.exception("unexpected error in %s", name)
            raise
        finally:
            service.metrics.in_flight.dec()
            service.metrics.observe_request(route, "GRPC", status, time.perf_counter() - t0)

    return rpc


async def start(service: Service, guard: Guard, params: ServeParams) -> tuple[Any, int]:
    """Start the gRPC server in the running event loop; return (server, the port it bound)."""
    import grpc
    from grpc import aio

    m, handlers = grpc_codec.messages(), Handlers(service)
    rpcs = {}
    for name in GROUPS:
        rpcs[name] = grpc.unary_unary_rpc_method_handler(
            _wrap(service, guard, name, getattr(handlers, name)), request_deserializer=m[f"{name}Request"].FromString,
            response_serializer=m[f"{name}Response"].SerializeToString)
    options = [("grpc.max_receive_message_length", params.max_body_bytes),
               ("grpc.max_send_message_length", MAX_SEND_BYTES),
               ("grpc.max_metadata_size", 16 * 1024),
               ("grpc.max_connection_age_ms", int(params.grpc_max_connection_age_s * 1000)),
               ("grpc.max_connection_age_grace_ms", int(params.timeout_ms) + 5000),
               ("grpc.max_connection_idle_ms", int(params.grpc_max_connection_idle_s * 1000)),
               ("grpc.so_reuseport", 0)]
    server = aio.server(options=options, maximum_concurrent_rpcs=params.grpc_max_concurrent_rpcs)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(grpc_codec.SERVICE, rpcs),))
    address = f"{params.host}:{params.grpc_port}"
    credentials = grpc_credentials(params)
    try:
        bound = (server.add_secure_port(address, credentials) if credentials is not None
                 else server.add_insecure_port(address))
    except RuntimeError as e:
        raise OSError(f"gRPC cannot listen on {address} ({e}); free the port or set serve.grpc_port") from None
    if not bound:
        raise OSError(f"gRPC cannot listen on {address}; free the port or set serve.grpc_port")
    await server.start()
    log.info("gRPC (Open Inference Protocol%s) on %s:%d", ", TLS" if credentials is not None else "", params.host,
             bound)
    return server, bound
