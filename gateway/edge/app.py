"""create_app(config): the one place the gateway is wired together."""

from __future__ import annotations

from aiohttp import web

from gateway.admission import ADMISSION, HELD, Admission, HeldConnections
from gateway.auth import AUTH, Auth
from gateway.config import CONFIG, Config
from gateway.context import add_request_id
from gateway.edge.boundary import boundary
from gateway.edge.cors import add_cors_headers
from gateway.edge.dispatch import dispatch
from gateway.edge.health import READINESS, Readiness, healthz, readyz
from gateway.edge.replay import image_view
from gateway.edge.task_api import cancel_view, events_view, result_view, task_view
from gateway.edge.usage import USAGE_ROUTE, usage_view
from gateway.errors import not_found
from gateway.metrics import METRICS, Metrics, metrics_view
from gateway.tasks.images import IMAGE_ROUTE
from gateway.tasks.service import (
    TASKS,
    TaskService,
    open_results,
    open_store,
    results_ctx,
    tasks_ctx,
)
from gateway.tasks.worker import WORKER_POOL, WorkerPool
from gateway.upstream import upstream_ctx
from gateway.usage.meter import USAGE, Meter
from gateway.usage.redis_ledger import open_ledger
from gateway.webhooks.delivery import webhooks_ctx

# The rest of a path, line breaks included: with `.*` a decoded %0a would fall through to
# aiohttp's plain-text 404 instead of the gateway's checks.
_ANY = r"{tail:[\s\S]*}"
# Named routes give metrics and logs a bounded `route` label; anything else under /v1 or
# /v1beta still goes through, labelled by the catch-all.
PROXY_ROUTES = (
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/images/variations",
    "/v1/chat/completions",
    "/v1/models",
    # google-genai calls Gemini under /v1 too: before `/v1/models/{model}`, which would match.
    "/v1/models/{model}:generateContent",
    "/v1/models/{model}:streamGenerateContent",
    "/v1/models/{model}",
    "/v1/videos",
    "/v1/videos/{video_id}",
    "/v1/videos/{video_id}/content",
    "/v1beta/models/{model}:generateContent",
    "/v1beta/models/{model}:streamGenerateContent",
    f"/v1/{_ANY}",
    f"/v1beta/{_ANY}",
)


def create_app(config: Config) -> web.Application:
    app = web.Application(client_max_size=config.server.max_body_bytes, middlewares=[boundary])
    app[CONFIG] = config
    app[AUTH] = Auth(config)
    app[METRICS] = Metrics(config.timeouts.models, config.timeouts.default_s)
    app[READINESS] = Readiness()
    app[ADMISSION] = Admission(config.admission, config.upstream.per_credential)
    app[HELD] = HeldConnections.from_config(config.server, app[METRICS])
    _add_tasks(app, config)
    app.on_response_prepare.append(add_request_id)
    if config.cors.allowed_origins:  # else answers pass untouched, at no cost per call
        app.on_response_prepare.append(add_cors_headers)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if config.metrics_on_main_port:
        app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/v1/tasks/{task_id}", task_view)
    app.router.add_delete("/v1/tasks/{task_id}", cancel_view)
    app.router.add_get("/v1/tasks/{task_id}/result", result_view)
    app.router.add_get("/v1/tasks/{task_id}/events", events_view)
    app.router.add_get(IMAGE_ROUTE, image_view)  # before /v1/..., which would forward it
    app.router.add_route("*", USAGE_ROUTE, usage_view)  # the gateway's own: never forwarded
    for path in PROXY_ROUTES:
        app.router.add_route("*", path, dispatch)
    app.router.add_route("*", f"/{_ANY}", not_found)
    return app


def create_worker_app(config: Config) -> web.Application:
    """`gateway worker`: the task workers alone; HTTP only on the metrics port, if set."""
    app = web.Application()
    app[CONFIG] = config
    app[AUTH] = Auth(config)
    app[METRICS] = Metrics(config.timeouts.models, config.timeouts.default_s)
    app[READINESS] = Readiness()
    _add_tasks(app, config)
    return app


def create_metrics_app(main: web.Application) -> web.Application:
    """The operators' port: /metrics, /healthz and /readyz of `main`, out of tenants' reach."""
    app = web.Application()
    app[METRICS] = main[METRICS]
    app[TASKS] = main[TASKS]
    app[READINESS] = main[READINESS]
    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


def _add_tasks(app: web.Application, config: Config) -> None:
    """The upstream, the results store, the task store and the workers. Cleanup contexts start
    in this order and stop in the reverse one: workers need the upstream session, the results
    store and the task store (its owner key read at start), so they start last and stop first,
    handing their tasks over while the others are still open."""
    store = open_store(config, app[METRICS])
    link_ttl_s = config.cors.signed_link_ttl_s
    app[TASKS] = TaskService(store, app[AUTH], open_results(config), link_ttl_s)
    tasks = app[TASKS]
    ledger = open_ledger(store, config.tasks.key_prefix)
    app[USAGE] = Meter(config, app[METRICS], ledger, lambda: tasks.reachable)
    app[WORKER_POOL] = WorkerPool(config)
    app.cleanup_ctx.append(upstream_ctx(config))
    app.cleanup_ctx.append(results_ctx)
    app.cleanup_ctx.append(tasks_ctx)
    # After the task store it reads; it stops after the workers, whose ends it announces.
    app.cleanup_ctx.append(webhooks_ctx)
    # Usage settles under way are waited for once the workers stop, before the store closes.
    app.cleanup_ctx.append(app[USAGE].ctx)
    app.cleanup_ctx.append(app[WORKER_POOL].ctx)
    # Runs when the drain starts, before in-flight requests are awaited.
    app.on_shutdown.append(shutdown_tasks)


async def shutdown_tasks(app: web.Application) -> None:
    app[WORKER_POOL].stop()
    app[TASKS].closing.set()
