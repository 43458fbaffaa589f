"""Caller authentication in key-injection mode.

Without an upstream key configured, the gateway is transparent: the caller's own
`Authorization` goes upstream untouched. With one, callers present gateway client keys (kept in
the config only as SHA-256 digests) and the upstream only ever sees the gateway's key.
"""

from __future__ import annotations

import hashlib

from aiohttp import web
from multidict import CIMultiDict, MultiMapping

from gateway.config import AuthConfig
from gateway.errors import Unauthorized

_GOOGLE_KEY = "x-goog-api-key"


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def presented_key(headers: MultiMapping[str]) -> str | None:
    """The caller's key: OpenAI SDKs send a bearer token, Google's GenAI SDK `x-goog-api-key`."""
    auth = headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get(_GOOGLE_KEY) or None


class Auth:
    def __init__(self, cfg: AuthConfig) -> None:
        self._upstream_key = cfg.upstream_api_key
        self._digests = cfg.client_key_sha256

    @property
    def injects(self) -> bool:
        return self._upstream_key is not None

    def apply(self, headers: CIMultiDict[str]) -> None:
        """Check the caller's key and put the upstream credential in `headers` (in place)."""
        if self._upstream_key is None:
            return
        key = presented_key(headers)
        if key is None or key_digest(key) not in self._digests:
            raise Unauthorized("Invalid or missing API key for this gateway.")
        headers.popall(_GOOGLE_KEY, None)
        headers["Authorization"] = f"Bearer {self._upstream_key}"


AUTH = web.AppKey("auth", Auth)
