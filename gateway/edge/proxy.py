"""Sync pass-through: any /v1 or /v1beta call forwarded upstream, streamed both ways.

Method, path, query and body go upstream byte for byte, once the target has passed the checks
in `target.py` and the whole body has arrived (`uploads.py`); in key-injection mode only the
credentials change (`auth.py`). Status, end-to-end headers and body come back the same way. The
gateway adds only a deadline per model, kept-alive connections, and OpenAI-shaped errors for the
failures it alone can see.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Coroutine

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from gateway.admission import ADMISSION
from gateway.auth import AUTH
from gateway.config import CONFIG, Config
from gateway.context import RequestContext
from gateway.edge.boundary import count_disconnect
from gateway.errors import (
    GatewayError,
    RequestTimeout,
    UpstreamBroken,
    UpstreamTimeout,
)
from gateway.headers import answer_headers, caller_timeout_s, strip_hop_by_hop
from gateway.metrics import METRICS
from gateway.sniff import ModelScanner, model_from_body, model_from_path
from gateway.target import check_method, check_target, check_version
from gateway.uploads import Body, SpooledBody, arrived, receive
from gateway.upstream import UPSTREAM, Payload
from gateway.usage.answer import AnswerMeter
from gateway.usage.ask import Ask
from gateway.usage.meter import SENT_FAILURES, USAGE, Meter, Result, new_hold_id

logger = logging.getLogger(__name__)

# Bodies up to this size are decoded whole for their model, and answers up to this size are
# read whole: cheaper than streaming them.
SMALL_BODY = 64 * 1024


def _deadline(ctx: RequestContext, config: Config) -> float:
    return ctx.started + min(config.timeouts.for_model(ctx.model), ctx.caller_limit_s)


def admit(request: web.Request, ctx: RequestContext) -> str:
    """What the gateway checks before it reads a byte of the body: the method, the target,
    the caller's key and deadline. The target that may go upstream."""
    check_version(request.version)
    check_method(request.method)
    target = check_target(request.raw_path)
    request.app[AUTH].caller_key(request)
    ctx.caller_limit_s = caller_timeout_s(request.headers)
    ctx.model = model_from_path(request.path)
    return target


async def receive_body(request: web.Request, ctx: RequestContext) -> Body:
    """The whole body, within the call's deadline (the model's, as soon as the body names it)."""
    config = request.app[CONFIG]
    content_type = request.headers.get("Content-Type", "")
    scanner = None
    length = request.content_length
    if ctx.model is None and (length is None or length > SMALL_BODY):
        scanner = ModelScanner(content_type)

    def seen(chunk: bytes) -> None:
        nonlocal scanner
        if scanner is not None and (model := scanner.feed(chunk)):
            scanner = None
            ctx.model = model
            scope.reschedule(_deadline(ctx, config))

    body: Body | None = arrived(request, config.server)
    if body is None:
        try:
            async with asyncio.timeout_at(_deadline(ctx, config)) as scope:
                body = await receive(request, config.server, seen if scanner else None)
        except TimeoutError:
            raise RequestTimeout(
                "The deadline passed while the request body was arriving; nothing was sent "
                "upstream."
            ) from None
    ctx.bytes_in = body.size if isinstance(body, SpooledBody) else len(body)
    if ctx.model is None and isinstance(body, bytes) and body:
        ctx.model = model_from_body(content_type, body)
    return body


def forward(
    request: web.Request, ctx: RequestContext, target: str, body: Body
) -> Coroutine[None, None, web.StreamResponse]:
    """The call upstream, its answer streamed back to the caller; a counted call's usage
    counted (`gateway/usage/`), held against its client's budget first if it has one. Without
    [clients] the plain call pays one attribute read for it, not even a coroutine's frame."""
    meter = request.app[USAGE]
    if not meter.counting:
        return _forward(request, ctx, target, body, None)
    return _metered(request, ctx, target, body, meter)


async def _metered(
    request: web.Request, ctx: RequestContext, target: str, body: Body, meter: Meter
) -> web.StreamResponse:
    if (ask := _ask(meter, request, ctx, body)) is None:
        return await _forward(request, ctx, target, body, None)
    client = request.app[AUTH].client(request)
    # Held until the call's deadline and a minute more, if this replica dies mid-call.
    ttl_s = _deadline(ctx, request.app[CONFIG]) - asyncio.get_running_loop().time() + 60.0
    hold = await meter.hold(client, ask, new_hold_id(), ttl_s)
    seen = AnswerMeter()
    result: Result | None = None
    try:
        out = await _forward(request, ctx, target, body, seen)
        result = Result(out.status, True, seen.images, seen.tokens)
        return out
    except GatewayError as failure:
        # Refused here, or unsent: no call; sent but unanswered: billed all the same.
        result = Result(None) if failure.code in SENT_FAILURES else None
        raise
    except BaseException:
        # The caller gone (cancelled): a call already upstream is billed there (the estimate);
        # one still waiting for admission was never made.
        result = Result(None) if seen.sent else None
        raise
    finally:
        meter.settle_soon(client, ask, hold.id, result)


def _ask(meter: Meter, request: web.Request, ctx: RequestContext, body: Body) -> Ask | None:
    content_type = request.headers.get("Content-Type", "")
    if not isinstance(body, SpooledBody):
        return meter.ask(ctx.route, ctx.model, content_type, body)
    with body.view() as mapped:  # read from the page cache, never copied into the heap
        return meter.ask(ctx.route, ctx.model, content_type, mapped)


async def _forward(
    request: web.Request, ctx: RequestContext, target: str, body: Body, seen: AnswerMeter | None
) -> web.StreamResponse:
    auth = request.app[AUTH]
    headers = strip_hop_by_hop(request.headers)
    auth.upstream_headers(headers)
    headers["X-Request-ID"] = ctx.request_id
    data: Payload
    if isinstance(body, SpooledBody):
        headers["Content-Length"] = str(body.size)  # known now, even if it came chunked
        data = body.chunks
    else:
        data = body or None
    credential = auth.caller_key(request) or ""
    deadline = _deadline(ctx, request.app[CONFIG])
    admission = request.app[ADMISSION]
    target = auth.upstream_target(target)
    with admission.credential_slot(credential):
        if not admission.limited(ctx.model):
            return await _exchange(request, ctx, target, headers, data, deadline, seen)
        async with admission.slot(ctx.model, credential, deadline):
            return await _exchange(request, ctx, target, headers, data, deadline, seen)


async def _exchange(
    request: web.Request,
    ctx: RequestContext,
    target: str,
    headers: CIMultiDict[str],
    data: Payload,
    deadline: float,
    seen: AnswerMeter | None,
) -> web.StreamResponse:
    """The upstream call and its answer, streamed back (and fed to `seen`, if counted); an
    answer that already started when the call failed is cut, so the caller sees a broken body,
    never a short one."""
    out: web.StreamResponse | None = None
    upstream = request.app[UPSTREAM]
    if seen is not None:
        seen.sent = True
    try:
        async with upstream.call(
            request.method,
            target,
            headers,
            data,
            deadline=deadline,
            model=ctx.model,
            log_id=ctx.request_id,
        ) as exchange:
            up = exchange.response
            kept = answer_headers(up.headers, request.app[AUTH].injects)
            if request.method != "HEAD" and (up.content_length or math.inf) <= SMALL_BODY:
                kept.popall("Content-Length", None)
                answer = await up.read()
                if seen is not None:
                    seen.feed(answer)
                out = web.Response(status=up.status, reason=up.reason, headers=kept, body=answer)
            else:
                out = web.StreamResponse(status=up.status, reason=up.reason, headers=kept)
                await _stream(request, up, out, ctx, seen)
    except (UpstreamTimeout, UpstreamBroken):
        if out is None or not out.prepared:
            raise
        _abort(request)
        return out
    ctx.upstream_s = exchange.seconds
    return out


async def _stream(
    request: web.Request,
    up: aiohttp.ClientResponse,
    out: web.StreamResponse,
    ctx: RequestContext,
    seen: AnswerMeter | None,
) -> None:
    await out.prepare(request)
    async for chunk in up.content.iter_any():
        if seen is not None:
            seen.feed(chunk)
        try:
            await out.write(chunk)
        except ConnectionError:
            count_disconnect(request.app[METRICS], ctx)
            return
    await out.write_eof()


def _abort(request: web.Request) -> None:
    """End a response that already started: the caller must see a broken body, not a short one."""
    if request.transport is not None:
        request.transport.abort()
