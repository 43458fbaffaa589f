"""Sync pass-through: any /v1 or /v1beta call forwarded upstream, streamed both ways.

Method, path, query and body go upstream byte for byte; status, end-to-end headers and body come
back the same way. The gateway adds only a deadline per model, kept-alive connections, and
OpenAI-shaped errors for the failures it alone can see.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator

import aiohttp
import msgspec
from aiohttp import web

from gateway.accesslog import CALL, Call
from gateway.admission import ADMISSION, Overloaded
from gateway.auth import AUTH, presented_key
from gateway.config import CONFIG, Config
from gateway.errors import (
    BodyTooLarge,
    GatewayError,
    UpstreamBroken,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from gateway.headers import caller_timeout_s, strip_hop_by_hop
from gateway.metrics import METRICS, Metrics
from gateway.sniff import ModelScanner, model_from_body, model_from_path
from gateway.tasks.idempotency import Once, once
from gateway.tasks.prefer import Preferences, parse_prefer
from gateway.tasks.views import ASYNC_ROUTES, submit
from gateway.upstream import UPSTREAM

logger = logging.getLogger(__name__)

# Bodies up to this size are read whole: cheaper than streaming, and they hold the model.
_SMALL_BODY = 64 * 1024
_CHUNK = 64 * 1024


class _Body:
    """A caller's large body on its way upstream: size-checked and scanned for the model, whose
    deadline replaces the default as soon as the model is seen."""

    def __init__(
        self, request: web.Request, call: Call, config: Config, scope: asyncio.Timeout
    ) -> None:
        self._content = request.content
        self._call = call
        self._config = config
        self._scope = scope
        self._scanner = (
            ModelScanner(request.headers.get("Content-Type", "")) if call.model is None else None
        )
        self.too_large = False

    async def stream(self) -> AsyncIterator[bytes]:
        limit = self._config.server.max_body_bytes
        async for chunk in self._content.iter_chunked(_CHUNK):
            self._call.bytes_in += len(chunk)
            if self._call.bytes_in > limit:
                self.too_large = True
                raise BodyTooLarge()
            if self._scanner is not None and (model := self._scanner.feed(chunk)):
                self._scanner = None
                self._call.model = model
                self._scope.reschedule(_deadline(self._call, self._config))
            yield chunk


def _deadline(call: Call, config: Config) -> float:
    return call.started + min(config.timeouts.for_model(call.model), call.caller_limit_s)


async def proxy(request: web.Request) -> web.StreamResponse:
    metrics = request.app[METRICS]
    call = request[CALL] = Call(request)
    inflight = metrics.inflight(call.route)
    inflight.inc()
    response: web.StreamResponse | None = None
    mode = "sync"
    try:
        if (how := await _as_task(request, call)) is not None:
            prefs, once = how
            mode = "async" if prefs is not None else "sync"
            response = await submit(request, call, prefs, once)
        else:
            response = await _forward(request, call, metrics)
    except GatewayError as exc:
        response = exc.response()
    except asyncio.CancelledError:
        if request.transport is None or request.transport.is_closing():
            _count_disconnect(metrics, call)
        raise
    except Exception:
        logger.exception("%s unexpected failure", call.request_id)
        response = GatewayError("The gateway failed to handle the request.").response()
    finally:
        inflight.dec()
        model = metrics.model_label(call.model)
        # 499: the caller went away before any answer (nginx's convention).
        status = "499" if response is None else str(response.status)
        metrics.requests(call.route, model, status, mode).inc()
        metrics.request_duration(call.route, model, mode).observe(
            asyncio.get_running_loop().time() - call.started
        )
    return response


def _count_disconnect(metrics: Metrics, call: Call) -> None:
    metrics.client_disconnects(call.route).inc()
    logger.info("%s caller disconnected; upstream call cancelled", call.request_id)


async def _as_task(
    request: web.Request, call: Call
) -> tuple[Preferences | None, Once | None] | None:
    """Whether the call runs as a task, and how: async when the caller prefers it, sync but
    once when it carries an Idempotency-Key, or comes from the OpenAI SDK (whose retries must
    attach, not pay again). Any other call is a plain pass-through and pays nothing here."""
    if request.method != "POST" or call.route not in ASYNC_ROUTES:
        return None
    prefs = parse_prefer(request.headers.getall("Prefer")) if "Prefer" in request.headers else None
    prefs = prefs if prefs is not None and prefs.respond_async else None
    how = once(request.headers)
    if prefs is not None or (how is not None and how.key is not None):
        return prefs, how
    if how is None or not request.app[CONFIG].idempotency.sdk_calls_as_tasks:
        return None
    # An SDK call runs as a task only if its answer can wait whole: a small body that asks for
    # no stream. Reading it here costs nothing more, since the pass-through reads small bodies
    # whole too (aiohttp keeps them for the second read).
    length = request.content_length
    if length is None or length > _SMALL_BODY or request.content_type != "application/json":
        return None
    try:
        streamed = _decode_stream_flag(await request.read()).stream
    except msgspec.DecodeError:
        return None  # the upstream will say what is wrong with it
    return None if streamed else (None, how)


class _StreamFlag(msgspec.Struct):
    stream: bool | None = False


_decode_stream_flag = msgspec.json.Decoder(_StreamFlag).decode


async def _forward(request: web.Request, call: Call, metrics: Metrics) -> web.StreamResponse:
    config = request.app[CONFIG]
    headers = strip_hop_by_hop(request.headers)
    request.app[AUTH].apply(headers)
    headers["X-Request-ID"] = call.request_id
    call.caller_limit_s = caller_timeout_s(request.headers)
    length = request.content_length
    if length is not None and length > config.server.max_body_bytes:
        raise BodyTooLarge()
    call.model = model_from_path(request.path)
    upstream = request.app[UPSTREAM]
    data: bytes | _Body | None = None
    out: web.StreamResponse | None = None
    queued = False  # waiting for an upstream slot: a deadline passing there is a 429
    try:
        async with (
            contextlib.AsyncExitStack() as held,
            asyncio.timeout_at(_deadline(call, config)) as scope,
        ):
            if not request.body_exists:
                pass
            elif length is not None and length <= _SMALL_BODY:
                data = await request.read()
                call.bytes_in = len(data)
                if call.model is None:
                    call.model = model_from_body(request.headers.get("Content-Type", ""), data)
                    if (when := _deadline(call, config)) != scope.when():
                        scope.reschedule(when)
            else:
                data = _Body(request, call, config, scope)
            admission = request.app[ADMISSION]
            if admission.limited(call.model):
                queued = True
                caller = presented_key(request.headers) or ""
                await held.enter_async_context(admission.slot(call.model, caller))
                queued = False

            sent_at = asyncio.get_running_loop().time()
            try:
                up = await upstream.send(
                    request.method,
                    request.raw_path,
                    headers,
                    data.stream if isinstance(data, _Body) else data,
                    retries=config.upstream.connect_retries,
                    log_id=call.request_id,
                )
            except UpstreamUnreachable as exc:
                if exc.timed_out:
                    metrics.upstream_timeouts(metrics.model_label(call.model), "connect").inc()
                raise
            async with up:
                if request.method != "HEAD" and (up.content_length or math.inf) <= _SMALL_BODY:
                    out_headers = strip_hop_by_hop(up.headers)
                    out_headers.popall("Content-Length", None)
                    out = web.Response(
                        status=up.status,
                        reason=up.reason,
                        headers=out_headers,
                        body=await up.read(),
                    )
                else:
                    out = web.StreamResponse(
                        status=up.status, reason=up.reason, headers=strip_hop_by_hop(up.headers)
                    )
                    await out.prepare(request)
                    async for chunk in up.content.iter_any():
                        try:
                            await out.write(chunk)
                        except ConnectionError:
                            _count_disconnect(metrics, call)
                            return out
                    await out.write_eof()
            call.upstream_s = asyncio.get_running_loop().time() - sent_at
            model = metrics.model_label(call.model)
            metrics.upstream_duration(model, str(up.status)).observe(call.upstream_s)
            return out
    except TimeoutError:
        if queued:
            raise Overloaded("The deadline passed while waiting for this model.") from None
        streaming = out is not None and out.prepared
        phase = "read" if streaming else "total"
        metrics.upstream_timeouts(metrics.model_label(call.model), phase).inc()
        if out is None or not streaming:
            raise UpstreamTimeout() from None
        _abort(request)
        return out
    except aiohttp.ClientError as exc:
        if isinstance(data, _Body) and data.too_large:
            raise BodyTooLarge() from None
        logger.warning("%s upstream connection broken: %s", call.request_id, type(exc).__name__)
        if out is None or not out.prepared:
            raise UpstreamBroken() from None
        _abort(request)
        return out


def _abort(request: web.Request) -> None:
    """End a response that already started: the caller must see a broken body, not a short one."""
    if request.transport is not None:
        request.transport.abort()
