"""The service's process: the REST app and the gRPC server over one data plane, under uvicorn, torch-free.

create_app builds the ASGI app (routes from serving.rest, the data plane's lifecycle, the gRPC server beside it on
serve.grpc_port); serve() runs it with the connection limits and TLS of serve.*. See serving.dataplane for what a
request goes through and serving.security for who may send one.
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import socket
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from serving import rest
from serving.dataplane import Service
from serving.middleware import BodyLimit, Gate, RequestMetrics
from serving.security import Guard, redact_handlers, tls_files
from serving.served_model import ModelSource
from tlops.core.config import ServeParams
from tlops.core.errors import ConfigError

log = logging.getLogger("serving")


def create_app(params: ServeParams, model: str | None = None) -> FastAPI:
    """The ASGI app serving `model` (default: params.model); app.state.service holds its Service."""
    guard = Guard(params)  # keys are read now: a missing key file fails before anything starts
    service = Service(params, ModelSource(model or params.model, allow_unverified=params.allow_unverified))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        grpc_server = None
        if params.grpc_port is not None:
            from serving import grpc_server as grpc_adapter

            grpc_server, app.state.grpc_port = await grpc_adapter.start(service, guard, params)
        sighup = _install_sighup(service)
        try:
            yield
        finally:
            if sighup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            if grpc_server is not None:  # in-flight RPCs get the same grace as HTTP requests
                await grpc_server.stop(math.ceil(params.timeout_ms / 1000) + 5)
            await service.stop()  # uvicorn has finished in-flight requests by now; the batcher drains what is left
            log.info("stopped")

    app = FastAPI(title="tlops inference", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service, app.state.guard, app.state.grpc_port = service, guard, None
    rest.add_routes(app, service, guard)
    rest.add_error_handlers(app, log.error)
    app.add_middleware(BodyLimit, max_bytes=params.max_body_bytes, timeout_s=params.body_timeout_s)
    if params.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=params.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type", "inference-header-content-length"])
    app.add_middleware(Gate, guard=guard)
    app.add_middleware(RequestMetrics, metrics=service.metrics)  # outermost: also counts 4xx before routing, 500s
    return app


def _install_sighup(service: Service) -> bool:
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGHUP"):
        return False  # signals reach only the main thread (tests run the server in a thread)
    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP,
                                                      lambda: service.spawn(service.reload(force=True)))
    except (NotImplementedError, RuntimeError, ValueError):
        return False
    return True


def uvicorn_config(app: Any, params: ServeParams, log_level: str = "info") -> Any:
    """uvicorn's Config for the service: TLS, connection limits and the header timeout of serve.*."""
    import ssl

    import uvicorn

    files = tls_files(params) or {}
    return uvicorn.Config(
        app, host=params.host, port=params.port, access_log=False, log_level=log_level,
        http=header_timeout_protocol(params.header_timeout_s), limit_concurrency=params.limit_concurrency,
        timeout_keep_alive=math.ceil(params.keep_alive_s), server_header=False,
        ssl_certfile=files.get("tls_cert"), ssl_keyfile=files.get("tls_key"), ssl_ca_certs=files.get("tls_client_ca"),
        ssl_cert_reqs=ssl.CERT_REQUIRED if "tls_client_ca" in files else ssl.CERT_NONE,
        # after SIGTERM, in-flight requests get their full timeout to finish
        timeout_graceful_shutdown=math.ceil(params.timeout_ms / 1000) + 5)


def header_timeout_protocol(seconds: float) -> type:
    """uvicorn's HTTP protocol (httptools' parser when installed, else h11's), closing a connection whose request
    line and headers have not all arrived within `seconds` of its start (or of the previous response): uvicorn itself
    waits for them forever (slowloris)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base

    class HeaderTimeout(Base):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(seconds, self._expire)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expire(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self.transport.close()

    if hasattr(Base, "on_headers_complete"):  # httptools: a callback when a request's headers are parsed
        class Protocol(HeaderTimeout):
            def on_headers_complete(self) -> None:
                super().on_headers_complete()
                self._disarm()
    else:  # h11: a new request cycle starts once its headers are parsed
        class Protocol(HeaderTimeout):
            def handle_events(self) -> None:
                before = self.cycle
                super().handle_events()
                if self.cycle is not before:
                    self._disarm()

    return Protocol


def serve(params: ServeParams, model: str | None = None) -> None:
    """Run the service under uvicorn on params.host:params.port until SIGINT/SIGTERM (blocking)."""
    import uvicorn

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    redact_handlers()
    for what, port in (("serve.port", params.port), ("serve.grpc_port", params.grpc_port)):
        _check_free(params.host, port, what)
    app = create_app(params, model)
    server = uvicorn.Server(uvicorn_config(app, params))
    redact_handlers(logging.getLogger("uvicorn"))
    server.run()


def _check_free(host: str, port: int | None, what: str) -> None:
    """ConfigError naming the setting when `port` is taken: one line, before anything starts."""
    if not port:
        return
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no obstacle
            s.bind((host, port))
    except OSError as e:
        raise ConfigError(f"{what}={port}: cannot listen on {host}:{port} ({e.strerror or e}); "
                          f"free it or choose another port") from None
