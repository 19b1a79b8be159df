"""Secrets by reference and credentials kept out of text: API keys read from an environment variable or a file (never
from params.yaml), and URIs with their user:password stripped before they reach a log line or a response. Torch-free.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from tlops.core.errors import ConfigError

MIN_KEY_CHARS = 16  # a key shorter than this is guessable; refuse it rather than serve behind it

# scheme://user:password@host, scheme://token@host: everything between :// and @ is a credential.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/@\s'\"]+)@")
# key=value pairs that carry secrets in DSNs and query strings (password=..., access_key=..., token=...).
_SECRET_PARAM = re.compile(
    r"(?i)(?P<key>password|passwd|pwd|secret|token|access_key|api_key|apikey)=(?P<value>[^&\s'\"]+)")


def redact(text: str) -> str:
    """`text` with the credentials of every URI in it replaced by ***: postgresql://u:p@h/db -> postgresql://***@h/db."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}***@", text)
    return _SECRET_PARAM.sub(lambda m: f"{m['key']}=***", text)


def without_credentials(uri: str) -> str:
    """A URI with its user:password@ removed, for a link shown to people: http://u:p@host/x -> http://host/x."""
    return _USERINFO.sub(lambda m: m["scheme"], uri)


def without_password(uri: str) -> str:
    """A URI with its password dropped and its user kept, for a process that authenticates by other means (libpq's
    PGPASSWORD or ~/.pgpass): postgresql://u:p@h/db?password=p&sslmode=x -> postgresql://u@h/db?sslmode=x."""
    uri = re.sub(r"(://[^/@:\s]+):[^/@\s]*@", r"\1@", uri)
    return re.sub(r"(?i)([?&])(?:password|passwd|pwd)=[^&\s]*&?", r"\1", uri).rstrip("?&")


def read_keys(env: str | None, file: str | os.PathLike | None, what: str = "serve.api_key_env") -> tuple[str, ...]:
    """The accepted keys: the value of environment variable `env`, or the lines of `file` (several keys let one
    be rotated out while the next is in use). ConfigError naming the setting when it is set but gives no key, or a
    key shorter than MIN_KEY_CHARS; () when neither is set."""
    raw: list[str] = []
    if env:
        value = os.environ.get(env)
        if value is None:
            raise ConfigError(f"{what}: environment variable {env} is not set (it must hold the API key)")
        raw += value.split()
    if file:
        try:
            raw += Path(file).read_text(encoding="utf-8").split()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"serve.api_key_file: cannot read the key file ({type(e).__name__})") from None
    keys = tuple(k for k in raw if k)
    if (env or file) and not keys:
        raise ConfigError(f"{what}: no key found (the variable or file is empty)")
    short = [k for k in keys if len(k) < MIN_KEY_CHARS]
    if short:
        raise ConfigError(f"{what}: a key has {len(short[0])} characters; use at least {MIN_KEY_CHARS} "
                          "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return keys
