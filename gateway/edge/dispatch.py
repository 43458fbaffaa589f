"""Which way a call goes: the plain pass-through, or a task (async when the caller prefers it,
run once when it carries an Idempotency-Key or comes from the OpenAI SDK)."""

from __future__ import annotations

import msgspec
from aiohttp import web

from gateway.admission import HELD
from gateway.auth import AUTH
from gateway.config import CONFIG
from gateway.context import REQUEST_CONTEXT, RequestContext
from gateway.edge.proxy import SMALL_BODY, admit, forward, receive_body
from gateway.edge.submit import ASYNC_ROUTES, submit
from gateway.tasks.idempotency import RunOnce, run_once
from gateway.tasks.prefer import Preferences, parse_prefer
from gateway.uploads import Body, SpooledBody


async def dispatch(request: web.Request) -> web.StreamResponse:
    """Every path under /v1 and /v1beta that is not the task API."""
    ctx = request[REQUEST_CONTEXT]
    target = admit(request, ctx)
    body = await receive_body(request, ctx)
    try:
        if (as_task := _as_task(request, ctx, body)) is None:
            return await forward(request, ctx, target, body)
        prefs, once = as_task
        ctx.mode = "async" if prefs is not None else "sync"
        auth = request.app[AUTH]
        caller = auth.caller_key(request) or ""
        ctx.client = auth.client(request)
        with request.app[HELD].body_bytes.hold(caller, amount=ctx.bytes_in):
            answer = await submit(request, ctx, target, body, prefs, once)
            return answer if answer is not None else await forward(request, ctx, target, body)
    finally:
        if isinstance(body, SpooledBody):
            body.close()


def _as_task(
    request: web.Request, ctx: RequestContext, body: Body
) -> tuple[Preferences | None, RunOnce | None] | None:
    """Whether the call runs as a task, and how: async when the caller prefers it, sync but
    once when it carries an Idempotency-Key, or comes from the OpenAI SDK (whose retries must
    attach, not pay again). Any other call is a plain pass-through and pays nothing here."""
    if request.method != "POST" or ctx.route not in ASYNC_ROUTES:
        return None
    prefs = parse_prefer(request.headers.getall("Prefer")) if "Prefer" in request.headers else None
    prefs = prefs if prefs is not None and prefs.respond_async else None
    once = run_once(request.headers)
    if prefs is not None or (once is not None and once.key is not None):
        return prefs, once
    if once is None or not request.app[CONFIG].idempotency.sdk_calls_as_tasks:
        return None
    # An SDK call runs as a task only if its answer can wait whole: a small body that asks for
    # no stream.
    if (
        not isinstance(body, bytes)
        or len(body) > SMALL_BODY
        or request.content_type != "application/json"
    ):
        return None
    try:
        streamed = _decode_stream_flag(body).stream
    except (msgspec.DecodeError, RecursionError):
        return None  # the upstream will say what is wrong with it
    return None if streamed else (None, once)


class _StreamFlag(msgspec.Struct):
    stream: bool | None = False


_decode_stream_flag = msgspec.json.Decoder(_StreamFlag).decode
