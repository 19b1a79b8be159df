"""Pure ASGI middleware: the Host and Origin checks, a request-body size and time limit enforced while streaming,
and per-route request metrics."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.prometheus import Metrics
from serving.protocol import ApiError
from serving.security import Guard

UNMATCHED = "<unmatched>"


class Gate:
    """Refuse, before any route runs, a Host the service does not answer to (421: DNS rebinding) and a browser
    page's call from a foreign origin (403)."""

    def __init__(self, app: ASGIApp, guard: Guard) -> None:
        self.app, self.guard = app, guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = _header(scope, b"host")
        if not self.guard.host_allowed(host):
            return await send_json(send, 421, {"error": "this service does not answer to that Host name "
                                                        "(serve.allowed_hosts)", "reason": "host_not_allowed"})
        if not self.guard.origin_allowed(_header(scope, b"origin"), host):
            return await send_json(send, 403, {"error": "cross-origin calls are refused (serve.cors_origins)",
                                               "reason": "origin_not_allowed"})
        await self.app(scope, receive, send)


class BodyLimit:
    """Answer 413 for a body over max_bytes: at once from Content-Length, else as soon as the stream passes it;
    408 when the whole body has not arrived within timeout_s of the first read (a slow sender holds a connection
    and a worker, not the service).

    Counting the streamed bytes covers chunked uploads that declare no length; the app reads bodies only
    through `receive`, so raising there stops the read before the body is ever held whole.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = 30.0) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > self.max_bytes:
            error = self.too_large(f"Content-Length {int(declared)}")
            return await send_json(send, error.status, error.body())
        received, complete = 0, False
        deadline: float | None = None
        loop = asyncio.get_running_loop()

        async def limited() -> Message:
            nonlocal received, complete, deadline
            if complete:  # after the body only a disconnect can come: no time limit on waiting for it
                return await receive()
            deadline = deadline or loop.time() + self.timeout_s
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise ApiError(408, f"the request body did not arrive within serve.body_timeout_s="
                                    f"{self.timeout_s:g}", reason="body_timeout") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received > self.max_bytes:
                    raise self.too_large(f"over {received} bytes received")
            return message

        await self.app(scope, limited, send)

    def too_large(self, what: str) -> ApiError:
        return ApiError(413, f"request body too large: {what}, limit serve.max_body_bytes={self.max_bytes}",
                        reason="body_too_large")


class RequestMetrics:
    """Count every request by route template and status and time it, including errors raised past the app."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 500  # unless a response starts

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, record_status)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.observe_request(route_of(scope), scope["method"], status, time.perf_counter() - t0)


def route_of(scope: Scope) -> str:
    """The route template (/v2/models/{name}/infer), never the raw path, so label values stay few."""
    route = scope.get("route")
    if route is not None and hasattr(route, "path"):
        return route.path
    app = scope.get("app")
    for r in getattr(getattr(app, "router", None), "routes", ()):
        match, _ = r.matches(scope)
        if match is Match.FULL:
            return r.path
    return UNMATCHED


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def send_json(send: Send, status: int, body: Any) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})
