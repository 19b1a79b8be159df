"""Who may call, and what reaches the log: API keys per route group, Host and Origin checks, TLS, redaction.

Security is configuration (serve.*), off by default on loopback, as Triton's restricted APIs and TLS flags are:
- serve.api_key_env / api_key_file: the key by reference; `Authorization: Bearer <key>` on HTTP and the same
  `authorization` metadata on gRPC (what tritonclient's `headers=` sends), compared in constant time; the groups in
  serve.api_key_routes (inference, metadata, metrics, drift) require it, health never does (orchestrator probes).
- serve.allowed_hosts: the Host header must name the service (DNS rebinding: a page on another name resolving to
  127.0.0.1 gets 421). None: localhost names when bound to loopback, any name otherwise.
- A browser's cross-origin call (an Origin header that is neither the service itself nor in serve.cors_origins) is
  refused (403): a web page cannot make a visitor's browser post to a service on their machine, even with the
  "simple" requests that need no CORS preflight.
- serve.tls_cert/tls_key (+ tls_client_ca for mutual TLS) on both HTTP and gRPC.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tlops.core.config import ServeParams
from tlops.core.errors import ConfigError
from tlops.core.secrets import read_keys, redact

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
HEALTH = "health"  # never guarded


class Guard:
    """The service's access rules, built once from serve.* (keys are read at startup)."""

    def __init__(self, params: ServeParams) -> None:
        self.keys = tuple(k.encode() for k in read_keys(params.api_key_env, params.api_key_file))
        self.guarded = frozenset(params.api_key_routes) if self.keys else frozenset()
        self.hosts = _allowed_hosts(params)
        self.origins = frozenset(o.rstrip("/").lower() for o in params.cors_origins)

    def requires_key(self, group: str) -> bool:
        return group in self.guarded

    def authorized(self, authorization: str | None) -> bool:
        """Whether an Authorization value (HTTP header or gRPC metadata) carries one of the keys."""
        if not authorization:
            return False
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        given = token.strip().encode("utf-8", "surrogateescape")
        # Every key compared, in constant time each: neither which key nor how much of one matched leaks by timing.
        return any([hmac.compare_digest(given, k) for k in self.keys])

    def host_allowed(self, host: str | None) -> bool:
        if self.hosts is None:
            return True
        return host is not None and _hostname(host) in self.hosts

    def origin_allowed(self, origin: str | None, host: str | None) -> bool:
        """A request without Origin (not from a browser page) passes; a page's call passes when it comes from the
        service's own origin (its page) or one in serve.cors_origins."""
        if origin is None:
            return True
        origin = origin.rstrip("/").lower()
        if origin in self.origins:
            return True
        try:
            netloc = urlsplit(origin).netloc
        except ValueError:
            return False
        return bool(host) and netloc == host.lower()


def _allowed_hosts(params: ServeParams) -> frozenset[str] | None:
    if params.allowed_hosts is not None:
        return frozenset(h.lower().strip("[]") for h in params.allowed_hosts)
    if is_loopback(params.host):
        return frozenset(LOOPBACK_NAMES)
    return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _hostname(host: str) -> str:
    """The name of a Host header value, without its port: example.org:8080 -> example.org, [::1]:80 -> ::1."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


# ---------------------------------------------------------------- TLS


def tls_files(params: ServeParams) -> dict[str, str] | None:
    """The PEM files TLS needs, checked to be readable before anything starts (ConfigError naming the setting)."""
    if params.tls_cert is None:
        return None
    files = {"tls_cert": params.tls_cert, "tls_key": params.tls_key}
    if params.tls_client_ca is not None:
        files["tls_client_ca"] = params.tls_client_ca
    for key, path in files.items():
        try:
            Path(path).read_bytes()
        except OSError as e:
            raise ConfigError(f"serve.{key}: cannot read it ({e.strerror or type(e).__name__})") from None
    return files


def grpc_credentials(params: ServeParams) -> Any:
    """grpc.ServerCredentials for serve.tls_* (mutual when tls_client_ca is set), or None for plaintext."""
    files = tls_files(params)
    if files is None:
        return None
    import grpc

    ca = Path(files["tls_client_ca"]).read_bytes() if "tls_client_ca" in files else None
    pair = (Path(files["tls_key"]).read_bytes(), Path(files["tls_cert"]).read_bytes())
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


# ---------------------------------------------------------------- the log


class RedactingFilter(logging.Filter):
    """Strips credentials from URIs in every record a handler writes (a load error quoting a tracking URI with
    user:password, a library logging its connection string)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


def redact_handlers(logger: logging.Logger | None = None) -> None:
    """Install RedactingFilter on every handler of `logger` (default: the root logger)."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
