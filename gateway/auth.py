"""Who is calling, and what of their credentials goes upstream.

`caller_key` is the one answer to "who is calling": authentication, task ownership, per-caller
limits and idempotency scopes all use it. Without an upstream key configured the gateway is
transparent: the caller's own credentials go upstream untouched. With one (key-injection mode),
callers present gateway client keys (kept in the config only as SHA-256 digests), and no caller
credential in any form reaches the upstream: it only ever sees the gateway's key.
"""

from __future__ import annotations

import hashlib
import re
from urllib.parse import unquote_plus

from aiohttp import web
from multidict import CIMultiDict

from gateway.config import UNNAMED, Config
from gateway.errors import BadRequest, Unauthorized
from gateway.headers import drop_caller_side

# Where SDKs put a key: OpenAI's bearer token, Google's GenAI header, Azure's `api-key`, and
# the `X-Api-Key` many gateways take. Google also accepts `?key=` (see `_query_params`).
_KEY_HEADERS = ("x-goog-api-key", "api-key", "x-api-key")
# Also dropped in key-injection mode: a session cookie is a credential too.
_CREDENTIAL_HEADERS = ("authorization", *_KEY_HEADERS, "cookie")
_QUERY_KEY = frozenset(("key",))
# Query parameters that look like credentials, refused in key-injection mode: stripped, the
# call would change silently; passed, the upstream would see a caller's secret.
_CREDENTIAL_PARAMS = frozenset(("api_key", "api-key", "apikey", "access_token", "token"))
_CALLER_KEY = web.RequestKey("caller_key", str)
_CLIENT = web.RequestKey("client", str)
_TWO_KEYS = "The request carries two different API keys; send one."


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _presented_keys(request: web.BaseRequest) -> list[str]:
    """Every credential the caller sent, from the request as it arrived."""
    headers = request.headers
    # Every value of a repeated header: a second `Authorization` must not slip past the check
    # while the upstream (which may read the last one) bills it.
    keys = _authorization_keys(request)
    keys.extend(
        v for name in _KEY_HEADERS for raw in headers.getall(name, ()) if (v := raw.strip())
    )
    _, mark, query = request.raw_path.partition("?")
    if mark:
        keys.extend(value for _, _, value in _query_params(query, _QUERY_KEY))
    return keys


def _authorization_keys(request: web.BaseRequest) -> list[str]:
    """The credential of every `Authorization` header: a bearer's token, or the whole value
    for any other scheme (`Basic ...`, `Token ...`), which the upstream may accept as well."""
    found = (_credential(value) for value in request.headers.getall("Authorization", ()))
    return [credential for credential in found if credential]


def _credential(authorization: str) -> str:
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else authorization.strip()


# Pairs split on `&` and `;` (some servers take either), separators kept to rebuild the rest.
_QUERY_PARTS = re.compile(r"([&;])")


def _query_params(query: str, names: frozenset[str]) -> list[tuple[int, str, str]]:
    """(index among the parts, decoded name, decoded value) of each parameter in `names`,
    however it is spelt (`key`, `KEY`, `%6Bey`)."""
    lowered = query.lower()
    if "%" not in query and not any(name in lowered for name in names):  # the hot path
        return []
    parts = _QUERY_PARTS.split(query)
    found = []
    for index, part in enumerate(parts[::2]):
        raw_name, _, value = part.partition("=")
        name = unquote_plus(raw_name).strip().lower()
        if name in names:
            found.append((index * 2, name, unquote_plus(value)))
    return found


def without_query_keys(target: str) -> str:
    """`target` with every `key` query parameter removed, the rest byte for byte."""
    path, mark, query = target.partition("?")
    found = _query_params(query, _QUERY_KEY) if mark else []
    if not found:
        return target
    parts = _QUERY_PARTS.split(query)
    for index, _, _ in reversed(found):
        # The pair and the separator before it (or after it, for the first pair).
        del parts[max(index - 1, 0) : index + 1 if index else 2]
    kept = "".join(parts)
    return f"{path}?{kept}" if kept else path


def _refuse_credential_params(target: str) -> None:
    _, mark, query = target.partition("?")
    found = _query_params(query, _CREDENTIAL_PARAMS) if mark else []
    if found:
        raise BadRequest(
            f"The query parameter `{found[0][1]}` looks like a credential and is not forwarded; "
            "send this gateway's key in the Authorization header."
        )


class Auth:
    def __init__(self, cfg: Config) -> None:
        self._upstream_key = cfg.auth.upstream_api_key
        # Client key digest -> the client name its calls are counted under.
        self._digests = cfg.client_digests

    @property
    def injects(self) -> bool:
        return self._upstream_key is not None

    def caller_key(self, request: web.Request) -> str | None:
        """The caller's credential, checked against the client keys in key-injection mode.
        Decided once per request, from the headers and query as they arrived."""
        known: str | None = request.get(_CALLER_KEY)
        if known is not None:
            return known
        if self._upstream_key is not None:
            _refuse_credential_params(request.raw_path)
        # Passing through, the first key found names the caller (the upstream checks it); in
        # either mode, keys that differ, wherever they are, would let one be charged here while
        # the upstream bills another.
        keys = _presented_keys(request)
        key = keys[0] if keys else None
        if self._upstream_key is not None and (key is None or key_digest(key) not in self._digests):
            raise Unauthorized("Invalid or missing API key for this gateway.")
        if any(other != key for other in keys):
            raise Unauthorized(_TWO_KEYS)
        if key is not None:
            request[_CALLER_KEY] = key
        return key

    def client(self, request: web.Request) -> str:
        """The name of the client calling (`[clients.<name>]`), for usage, budgets and
        webhooks: "unnamed" for a key no client lists. A bounded label value."""
        known: str | None = request.get(_CLIENT)
        if known is None:
            key = self.caller_key(request)
            known = UNNAMED if key is None else self.client_of(key)
            request[_CLIENT] = known
        return known

    def client_of(self, key: str) -> str:
        return self._digests.get(key_digest(key), UNNAMED)

    def strip_credentials(self, headers: CIMultiDict[str]) -> None:
        """In key-injection mode, drop every caller credential from `headers` (in place), and
        what would pick the account billed or tell of the network (`drop_caller_side`): what is
        stored for a task never holds one, and the gateway's own key is added only when the
        call is sent (`upstream_headers`)."""
        if self._upstream_key is None:
            return
        for name in _CREDENTIAL_HEADERS:
            headers.popall(name, None)
        drop_caller_side(headers)

    def upstream_headers(self, headers: CIMultiDict[str]) -> None:
        """In key-injection mode, replace every caller credential in `headers` (end-to-end
        headers, changed in place) with the gateway's own key."""
        if self._upstream_key is None:
            return
        self.strip_credentials(headers)
        headers["Authorization"] = f"Bearer {self._upstream_key}"

    def upstream_credential(self, caller_key: str | None) -> str:
        """The key a call of this caller sends upstream: the unit APIYI's limits count in."""
        return self._upstream_key or caller_key or ""

    def upstream_target(self, target: str) -> str:
        """The target to send upstream: in key-injection mode, without `?key=`."""
        return target if self._upstream_key is None else without_query_keys(target)


AUTH = web.AppKey("auth", Auth)
