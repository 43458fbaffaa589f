"""The one request boundary, for every route: the request context, in-flight and request
metrics, disconnect counting, browsers' preflights (`cors.py`), and errors rendered in the
OpenAI shape."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from gateway.context import REQUEST_CONTEXT, RequestContext
from gateway.edge.cors import preflight
from gateway.errors import GatewayError, Handler, from_aiohttp
from gateway.metrics import METRICS, Metrics

logger = logging.getLogger(__name__)

# Probes and scrapes are not traffic: counted, a load balancer's and Prometheus's own calls
# would make up the request rate of an idle gateway and pull its latencies toward zero.
_NOT_TRAFFIC = frozenset({"/healthz", "/readyz", "/metrics"})


@web.middleware
async def boundary(request: web.Request, handler: Handler) -> web.StreamResponse:
    ctx = request[REQUEST_CONTEXT] = RequestContext(request)
    if ctx.route in _NOT_TRAFFIC:
        return await handler(request)
    metrics = request.app[METRICS]
    inflight = metrics.inflight(ctx.route)
    inflight.inc()
    response: web.StreamResponse | None = None
    try:
        if request.method == "OPTIONS":
            response = await preflight(request, handler)
        else:
            response = await handler(request)
    except GatewayError as exc:
        response = exc.response()
    except web.HTTPException as exc:
        response = from_aiohttp(exc)
    except asyncio.CancelledError:
        if request.transport is None or request.transport.is_closing():
            count_disconnect(metrics, ctx)
            # aiohttp logs no access line for a handler it cancelled: the 499 gets one here.
            request.protocol.log_access(request, web.Response(status=499), ctx.started)
        raise
    except Exception:
        logger.exception("%s unexpected failure", ctx.request_id)
        response = GatewayError().response()
    finally:
        inflight.dec()
        model = metrics.model_label(ctx.model)
        # 499: the caller went away before any answer (nginx's convention).
        status = "499" if response is None else str(response.status)
        metrics.requests(ctx.route, model, status, ctx.mode).inc()
        metrics.request_duration(ctx.route, model, ctx.mode).observe(
            asyncio.get_running_loop().time() - ctx.started
        )
    return response


def count_disconnect(metrics: Metrics, ctx: RequestContext) -> None:
    metrics.client_disconnects(ctx.route).inc()
    if ctx.call_goes_on:
        logger.info("%s caller disconnected; the call goes on for its retry", ctx.request_id)
    else:
        logger.info("%s caller disconnected; upstream call cancelled", ctx.request_id)
