"""Sync pass-through: any /v1 or /v1beta call forwarded upstream, streamed both ways.

Method, path, query and body go upstream byte for byte, once the target has passed the checks
in `target.py` and the whole body has arrived (`uploads.py`); in key-injection mode only the
credentials change (`auth.py`). Status, end-to-end headers and body come back the same way. The
gateway adds only a deadline per model, kept-alive connections, and OpenAI-shaped errors for the
failures it alone can see.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math

import aiohttp
import msgspec
from aiohttp import web
from multidict import CIMultiDict

from gateway.accesslog import REQUEST_CONTEXT, RequestContext
from gateway.admission import ADMISSION, Overloaded
from gateway.auth import AUTH
from gateway.config import CONFIG, Config
from gateway.errors import (
    GatewayError,
    RequestTimeout,
    UpstreamBroken,
    UpstreamTimeout,
)
from gateway.headers import caller_timeout_s, strip_hop_by_hop
from gateway.metrics import METRICS, Metrics
from gateway.sniff import ModelScanner, model_from_body, model_from_path
from gateway.target import check_method, check_target
from gateway.tasks.idempotency import RunOnce, run_once
from gateway.tasks.prefer import Preferences, parse_prefer
from gateway.tasks.views import ASYNC_ROUTES, submit
from gateway.uploads import Body, SpooledBody, arrived, receive
from gateway.upstream import UPSTREAM, Payload

logger = logging.getLogger(__name__)

# SDK calls with bodies up to this size may run as tasks (their answer can wait whole);
# answers up to this size are read whole, which is cheaper than streaming them.
_SMALL_BODY = 64 * 1024


def _deadline(ctx: RequestContext, config: Config) -> float:
    return ctx.started + min(config.timeouts.for_model(ctx.model), ctx.caller_limit_s)


async def proxy(request: web.Request) -> web.StreamResponse:
    metrics = request.app[METRICS]
    ctx = request[REQUEST_CONTEXT] = RequestContext(request)
    inflight = metrics.inflight(ctx.route)
    inflight.inc()
    response: web.StreamResponse | None = None
    mode = "sync"
    body: Body = b""
    try:
        target = _admit(request, ctx)
        body = await _receive(request, ctx)
        if (as_task := _as_task(request, ctx, body)) is not None:
            prefs, once = as_task
            mode = "async" if prefs is not None else "sync"
            whole = body.read() if isinstance(body, SpooledBody) else body
            response = await submit(request, ctx, target, whole, prefs, once)
        else:
            response = await _forward(request, ctx, target, body, metrics)
    except GatewayError as exc:
        response = exc.response()
    except asyncio.CancelledError:
        if request.transport is None or request.transport.is_closing():
            _count_disconnect(metrics, ctx)
        raise
    except Exception:
        logger.exception("%s unexpected failure", ctx.request_id)
        response = GatewayError("The gateway failed to handle the request.").response()
    finally:
        if isinstance(body, SpooledBody):
            body.close()
        inflight.dec()
        model = metrics.model_label(ctx.model)
        # 499: the caller went away before any answer (nginx's convention).
        status = "499" if response is None else str(response.status)
        metrics.requests(ctx.route, model, status, mode).inc()
        metrics.request_duration(ctx.route, model, mode).observe(
            asyncio.get_running_loop().time() - ctx.started
        )
    return response


def _admit(request: web.Request, ctx: RequestContext) -> str:
    """What the gateway checks before it reads a byte of the body: the method, the target,
    the caller's key and deadline. The target that may go upstream."""
    check_method(request.method)
    target = check_target(request.raw_path)
    request.app[AUTH].caller_key(request)
    ctx.caller_limit_s = caller_timeout_s(request.headers)
    ctx.model = model_from_path(request.path)
    return target


async def _receive(request: web.Request, ctx: RequestContext) -> Body:
    """The whole body, within the call's deadline (the model's, as soon as the body names it)."""
    config = request.app[CONFIG]
    content_type = request.headers.get("Content-Type", "")
    scanner = None
    length = request.content_length
    if ctx.model is None and (length is None or length > _SMALL_BODY):
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


def _count_disconnect(metrics: Metrics, ctx: RequestContext) -> None:
    metrics.client_disconnects(ctx.route).inc()
    logger.info("%s caller disconnected; upstream call cancelled", ctx.request_id)


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
        or len(body) > _SMALL_BODY
        or request.content_type != "application/json"
    ):
        return None
    try:
        streamed = _decode_stream_flag(body).stream
    except msgspec.DecodeError:
        return None  # the upstream will say what is wrong with it
    return None if streamed else (None, once)


class _StreamFlag(msgspec.Struct):
    stream: bool | None = False


_decode_stream_flag = msgspec.json.Decoder(_StreamFlag).decode


async def _forward(
    request: web.Request, ctx: RequestContext, target: str, body: Body, metrics: Metrics
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
    async with contextlib.AsyncExitStack() as held:
        held.enter_context(admission.credential_slot(credential))
        if admission.limited(ctx.model):
            try:
                async with asyncio.timeout_at(deadline):
                    await held.enter_async_context(admission.slot(ctx.model, credential))
            except TimeoutError:
                raise Overloaded("The deadline passed while waiting for this model.") from None
        target = auth.upstream_target(target)
        return await _exchange(request, ctx, target, headers, data, deadline, metrics)


async def _exchange(
    request: web.Request,
    ctx: RequestContext,
    target: str,
    headers: CIMultiDict[str],
    data: Payload,
    deadline: float,
    metrics: Metrics,
) -> web.StreamResponse:
    """The upstream call and its answer, streamed back; an answer that already started when
    the call failed is cut, so the caller sees a broken body, never a short one."""
    out: web.StreamResponse | None = None
    upstream = request.app[UPSTREAM]
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
            if request.method != "HEAD" and (up.content_length or math.inf) <= _SMALL_BODY:
                out = _whole(up, await up.read())
            else:
                out = web.StreamResponse(
                    status=up.status, reason=up.reason, headers=strip_hop_by_hop(up.headers)
                )
                await _stream(request, up, out, metrics, ctx)
    except (UpstreamTimeout, UpstreamBroken):
        if out is None or not out.prepared:
            raise
        _abort(request)
        return out
    ctx.upstream_s = exchange.seconds
    return out


def _whole(up: aiohttp.ClientResponse, body: bytes) -> web.Response:
    headers = strip_hop_by_hop(up.headers)
    headers.popall("Content-Length", None)
    return web.Response(status=up.status, reason=up.reason, headers=headers, body=body)


async def _stream(
    request: web.Request,
    up: aiohttp.ClientResponse,
    out: web.StreamResponse,
    metrics: Metrics,
    ctx: RequestContext,
) -> None:
    await out.prepare(request)
    async for chunk in up.content.iter_any():
        try:
            await out.write(chunk)
        except ConnectionError:
            _count_disconnect(metrics, ctx)
            return
    await out.write_eof()


def _abort(request: web.Request) -> None:
    """End a response that already started: the caller must see a broken body, not a short one."""
    if request.transport is not None:
        request.transport.abort()
