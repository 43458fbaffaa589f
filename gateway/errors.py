"""Errors the gateway itself produces, rendered in the OpenAI error shape.

Upstream errors are never rendered here: they pass through byte for byte.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping

import msgspec
from aiohttp import web


class _ErrorBody(msgspec.Struct, frozen=True):
    message: str
    type: str
    code: str


class _Envelope(msgspec.Struct, frozen=True):
    error: _ErrorBody


_encode = msgspec.json.Encoder().encode


class GatewayError(Exception):
    status = 500
    type = "server_error"
    code = "internal_error"
    # The OpenAI SDK obeys `x-should-retry` over its own status-based rule; None leaves it be.
    should_retry: bool | None = None
    # Seconds a caller should wait before that retry (`Retry-After`), when it may retry.
    retry_after_s: int | None = None
    default_message = "The gateway failed to handle the request."

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        # The OpenAI type of every caller error, unless the class or a parent between names
        # its own (a 429's rate_limit_error is inherited by its subclasses).
        if cls.status < 500 and cls.type == GatewayError.type:
            cls.type = "invalid_request_error"

    def __init__(
        self, message: str | None = None, *, headers: Mapping[str, str] | None = None
    ) -> None:
        message = message or self.default_message
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        headers = dict(self.headers)
        if self.should_retry is not None:
            headers["x-should-retry"] = "true" if self.should_retry else "false"
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(self.retry_after_s)
        body = _encode(_Envelope(_ErrorBody(self.message, self.type, self.code)))
        return web.Response(
            status=self.status, body=body, content_type="application/json", headers=headers
        )


class BadRequest(GatewayError):
    status = 400
    code = "invalid_request"


class Unauthorized(GatewayError):
    status = 401
    code = "invalid_api_key"


class NotFound(GatewayError):
    status = 404
    code = "not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    code = "method_not_allowed"

    def __init__(self, message: str, allowed: Iterable[str]) -> None:
        super().__init__(message, headers={"Allow": ", ".join(sorted(allowed))})


class BodyTooLarge(GatewayError):
    status = 413
    code = "request_too_large"
    default_message = "Request body is larger than this gateway accepts."


class StoreUnavailable(GatewayError):
    """The task store (Redis) cannot be reached: nothing was stored, so retrying is safe."""

    status = 503
    type = "server_error"
    code = "store_unavailable"
    should_retry = True
    retry_after_s = 1
    default_message = (
        "The task store is unreachable; calls that need it (async, Idempotency-Key) "
        "cannot be accepted right now."
    )

    def __init__(self, message: str | None = None, *, unsent: bool = False) -> None:
        super().__init__(message)
        # The command surely never reached the store: nothing of it can have been done.
        self.unsent = unsent


class QueueFull(GatewayError):
    """The caller has as much queued as one caller may: nothing was stored, retry later."""

    status = 429
    type = "rate_limit_error"
    code = "queue_full"
    should_retry = True
    retry_after_s = 5
    default_message = "This API key has as many tasks queued as the gateway allows one key."


QUEUE_FULL_FOR_ALL = "The gateway has as many tasks queued as it allows in all; retry later."


class BudgetExceeded(GatewayError):
    """A client's budget for the day or month would be passed: nothing was sent. Retrying
    before the reset is refused the same way, so the SDK must not retry."""

    status = 429
    type = "insufficient_quota"
    code = "budget_exceeded"
    should_retry = False

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UpstreamUnreachable(GatewayError):
    """Nothing reached the upstream, so nothing was billed: retrying is safe."""

    status = 502
    type = "upstream_error"
    code = "upstream_unreachable"
    should_retry = True

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class UpstreamBroken(GatewayError):
    """The request was sent; the upstream may be generating (and billing) still."""

    status = 502
    type = "upstream_error"
    code = "upstream_connection_broken"
    should_retry = False
    default_message = (
        "The connection to the upstream broke after the request was sent; it may have been billed."
    )


class ResultTooLarge(GatewayError):
    """The upstream's answer exceeds what a task may keep; it was paid for, so do not retry."""

    status = 502
    type = "upstream_error"
    code = "result_too_large"
    should_retry = False


class IdempotencyMismatch(GatewayError):
    status = 422
    code = "idempotency_key_reused"
    default_message = (
        "This Idempotency-Key was used with a different request; use a new key for a new request."
    )


class TaskCancelled(GatewayError):
    status = 409
    code = "task_cancelled"
    default_message = "The task was cancelled; it has no result."


class RequestTimeout(GatewayError):
    """The deadline or the body's idle limit passed before anything went upstream: nothing
    was sent and nothing billed, so retrying is safe."""

    status = 408
    code = "request_timeout"
    should_retry = True
    default_message = (
        "The request did not arrive in time; nothing was sent upstream and nothing was billed."
    )


class UpstreamTimeout(GatewayError):
    """The deadline passed; the upstream may still finish and bill, so a blind retry pays twice."""

    status = 504
    type = "upstream_error"
    code = "upstream_timeout"
    should_retry = False
    default_message = (
        "The upstream did not answer within this model's deadline. It may still be generating "
        "(and billing); retrying starts a new generation."
    )


def from_aiohttp(exc: web.HTTPException) -> web.Response:
    """One of aiohttp's own refusals (its router's 404, say), in the OpenAI shape too."""
    kept = {
        k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")
    }
    error = GatewayError(exc.reason, headers=kept)
    error.status = exc.status
    error.type = "invalid_request_error"
    error.code = exc.reason.lower().replace(" ", "_")
    return error.response()


async def not_found(request: web.Request) -> web.Response:
    """Paths outside /v1 and /v1beta that the gateway does not serve, in the OpenAI shape."""
    return NotFound(f"Unknown path: {request.method} {request.path}").response()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
