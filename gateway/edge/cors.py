"""CORS, answered by the gateway itself: the policy is the operator's (`[cors]`), never the
upstream's, and a browser's preflight never leaves the gateway (it would reach the upstream as
a call of its own, and its answer would speak for the gateway)."""

from __future__ import annotations

from aiohttp import web

from gateway.config import CONFIG, CorsConfig
from gateway.errors import GatewayError, Handler

# What the gateway's callers send from a page: the OpenAI SDK's headers (its `x-stainless-*`
# are matched by prefix), Google's key header, the gateway's own (`Prefer`, deadlines, retries).
_REQUEST_HEADERS = frozenset(
    (
        "authorization",
        "content-type",
        "prefer",
        "idempotency-key",
        "x-request-timeout",
        "last-event-id",
        "x-goog-api-key",
        "x-goog-api-client",
        "openai-organization",
        "openai-project",
        "openai-beta",
    )
)
_SDK_PREFIX = "x-stainless-"
_METHODS = "GET, POST, DELETE"
# Answer headers a page's script may read: without this list it sees only the CORS-safelisted
# few, so neither where a task lives nor when to retry.
_EXPOSED = ", ".join(
    (
        "Location",
        "Retry-After",
        "X-Request-ID",
        "Idempotent-Replayed",
        "Preference-Applied",
        "x-should-retry",
        "openai-processing-ms",
    )
)


class OriginNotAllowed(GatewayError):
    status = 403
    code = "origin_not_allowed"
    default_message = "This origin may not call the gateway from a browser (see [cors])."


def is_preflight(request: web.BaseRequest) -> bool:
    headers = request.headers
    return (
        request.method == "OPTIONS"
        and "Origin" in headers
        and "Access-Control-Request-Method" in headers
    )


async def preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
    """An `OPTIONS` request: a preflight is answered here, on every path: 204 with the policy
    to an allowed origin, 403 (no CORS header, so the browser refuses) to any other. Any other
    `OPTIONS` goes on to `handler`. Called by `boundary` for `OPTIONS` only, so other calls pay
    nothing for it (a middleware of its own is a frame more on every call)."""
    if not is_preflight(request):
        return await handler(request)
    cors = request.app[CONFIG].cors
    origin = request.headers["Origin"]
    if origin not in cors.allowed_origins:
        raise OriginNotAllowed()
    asked = request.headers.get("Access-Control-Request-Headers", "")
    names = (name.strip().lower() for name in asked.split(","))
    allowed = [n for n in names if n in _REQUEST_HEADERS or n.startswith(_SDK_PREFIX)]
    headers = {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Methods": _METHODS,
        "Access-Control-Max-Age": str(cors.preflight_max_age_s),
        "Vary": "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
    }
    if allowed:
        headers["Access-Control-Allow-Headers"] = ", ".join(allowed)
    return web.Response(status=204, headers=headers)


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare hook, with origins configured (without, answers pass as the upstream
    gave them): the upstream's own `Access-Control-*` headers are dropped (they are not the
    gateway's policy), and an allowed origin's answer says it may read it."""
    cors: CorsConfig = request.app[CONFIG].cors
    if is_preflight(request):
        return  # answered by `preflight`, with its own headers
    for name in {k for k in response.headers if k.lower().startswith("access-control-")}:
        response.headers.popall(name, None)
    vary = response.headers.get("Vary")
    response.headers["Vary"] = f"{vary}, Origin" if vary else "Origin"
    origin = request.headers.get("Origin")
    if origin is not None and origin in cors.allowed_origins:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = _EXPOSED
