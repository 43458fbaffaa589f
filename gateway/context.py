"""What one request did, filled in as it goes (`RequestContext`), and its request id.

Every layer of the edge reads and fills the same context; the access line and the request
metrics are made from it when the request ends.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import re
import secrets

from aiohttp import web

# Caller-chosen ids are echoed and logged, so only a plain token is accepted (no log injection).
_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Request ids made here: unique, not secret (they only tie log lines together), so a random
# per-process prefix and a counter, without a system call per request as uuid4 makes.
_ID_PREFIX = secrets.token_hex(8)
_next_id = itertools.count(1).__next__


class RequestContext:
    """What one request did, filled in as it goes, for the log line and the metrics."""

    __slots__ = (
        "bytes_in",
        "call_goes_on",
        "caller_limit_s",
        "client",
        "mode",
        "model",
        "request_id",
        "route",
        "started",
        "upstream_s",
    )

    def __init__(self, request: web.Request) -> None:
        self.started = asyncio.get_running_loop().time()
        given = request.headers.get("X-Request-ID", "")
        self.request_id = given if _SAFE_ID.fullmatch(given) else f"{_ID_PREFIX}{_next_id():016x}"
        resource = request.match_info.route.resource
        self.route = resource.canonical if resource is not None else "other"
        self.model: str | None = None
        self.mode = "sync"  # "async" once the call runs as a task the caller does not wait on
        self.caller_limit_s = math.inf
        self.upstream_s: float | None = None
        self.bytes_in = 0
        # The caller's client name (`[clients.<name>]`), once a call needs it: empty until then.
        self.client = ""
        # A call run once goes on when its caller leaves (a retry attaches to it).
        self.call_goes_on = False

    def time_upstream(self, seconds: float) -> None:
        """The upstream's time of a call made elsewhere for this request (a call run once)."""
        self.upstream_s = seconds


REQUEST_CONTEXT = web.RequestKey("request_context", RequestContext)


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare hook: every proxied response, streamed or not, names its request id."""
    ctx = request.get(REQUEST_CONTEXT)
    if ctx is not None:
        response.headers["X-Request-ID"] = ctx.request_id
