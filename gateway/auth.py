"""Who is calling, and what of their credentials goes upstream.

`caller_key` is the one answer to "who is calling": authentication, task ownership, per-caller
limits and idempotency scopes all use it. Without an upstream key configured the gateway is
transparent: the caller's own credentials go upstream untouched. With one (key-injection mode),
callers present gateway client keys (kept in the config only as SHA-256 digests), and no caller
credential in any form reaches the upstream: it only ever sees the gateway's key.
"""

from __future__ import annotations

import hashlib
from urllib.parse import unquote_plus

from aiohttp import web
from multidict import CIMultiDict

from gateway.config import AuthConfig
from gateway.errors import Unauthorized

# Where SDKs put a key: OpenAI's bearer token, Google's GenAI header, Azure's `api-key`, and
# the `X-Api-Key` many gateways take. Google also accepts `?key=` (see `_query_keys`).
_KEY_HEADERS = ("x-goog-api-key", "api-key", "x-api-key")
_QUERY_KEY = "key"
_CALLER_KEY = web.RequestKey("caller_key", str)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _presented_keys(request: web.BaseRequest) -> list[str]:
    """Every credential the caller sent, from the request as it arrived."""
    headers = request.headers
    keys = []
    scheme, _, token = headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        keys.append(token.strip())
    keys.extend(v for name in _KEY_HEADERS if (v := headers.get(name, "").strip()))
    keys.extend(_query_keys(request.query_string))
    return keys


def _query_pairs(query: str) -> list[tuple[str, str]]:
    """(decoded name, raw pair) for each pair of a raw query string."""
    return [(unquote_plus(pair.partition("=")[0]), pair) for pair in query.split("&")]


def _query_keys(query: str) -> list[str]:
    if _QUERY_KEY not in query:  # the hot path: no query, or no key in it
        return []
    return [
        value
        for name, pair in _query_pairs(query)
        if name == _QUERY_KEY and (value := unquote_plus(pair.partition("=")[2]))
    ]


def without_query_keys(target: str) -> str:
    """`target` with every `key` query parameter removed, the rest byte for byte."""
    path, mark, query = target.partition("?")
    if not mark or _QUERY_KEY not in query:
        return target
    kept = [pair for name, pair in _query_pairs(query) if name != _QUERY_KEY]
    return f"{path}?{'&'.join(kept)}" if kept else path


class Auth:
    def __init__(self, cfg: AuthConfig) -> None:
        self._upstream_key = cfg.upstream_api_key
        self._digests = cfg.client_key_sha256

    @property
    def injects(self) -> bool:
        return self._upstream_key is not None

    def caller_key(self, request: web.Request) -> str | None:
        """The caller's credential, checked against the client keys in key-injection mode.
        Decided once per request, from the headers and query as they arrived."""
        known: str | None = request.get(_CALLER_KEY)
        if known is not None:
            return known
        keys = _presented_keys(request)
        key = keys[0] if keys else None
        if self._upstream_key is not None:
            if key is None or key_digest(key) not in self._digests:
                raise Unauthorized("Invalid or missing API key for this gateway.")
            if any(other != key for other in keys):
                raise Unauthorized("The request carries two different API keys; send one.")
        if key is not None:
            request[_CALLER_KEY] = key
        return key

    def upstream_headers(self, headers: CIMultiDict[str]) -> None:
        """In key-injection mode, replace every caller credential in `headers` (end-to-end
        headers, changed in place) with the gateway's own key."""
        if self._upstream_key is None:
            return
        for name in _KEY_HEADERS:
            headers.popall(name, None)
        headers["Authorization"] = f"Bearer {self._upstream_key}"

    def upstream_credential(self, caller_key: str | None) -> str:
        """The key a call of this caller sends upstream: the unit APIYI's limits count in."""
        return self._upstream_key or caller_key or ""

    def upstream_target(self, target: str) -> str:
        """The target to send upstream: in key-injection mode, without `?key=`."""
        return target if self._upstream_key is None else without_query_keys(target)


AUTH = web.AppKey("auth", Auth)
