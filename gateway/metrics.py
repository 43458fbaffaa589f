"""Prometheus metrics: one registry per app, so tests and replicas never share state."""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Awaitable, Callable, Mapping
from typing import Generic, TypeVar

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from gateway import __version__
from gateway.errors import StoreUnavailable

# Image calls take 10-600 s; resolve 1 s to 15 min, with a few sub-second buckets for the
# models list and errors.
LATENCY_BUCKETS_S = (
    0.05,
    0.25,
    1,
    2.5,
    5,
    10,
    20,
    30,
    45,
    60,
    90,
    120,
    180,
    240,
    300,
    420,
    600,
    900,
)


_M = TypeVar("_M", Counter, Gauge, Histogram)


class _Labelled(Generic[_M]):
    """A metric's children by label values, cached: `labels()` validates and locks on every
    call, which costs more than the gateway's whole routing."""

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: _M) -> None:
        self._metric: _M = metric
        self._children: dict[tuple[str, ...], _M] = {}

    def __call__(self, *values: str) -> _M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


class Metrics:
    def __init__(self, deadlines: Mapping[str, float], default_deadline_s: float = 300.0) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._models = frozenset(deadlines)
        r = self.registry
        # The configured deadlines beside the observed latencies (the timeout-tuning board).
        deadline = Gauge(
            "gateway_model_deadline_seconds",
            "Configured end-to-end deadline per model ('other': the default).",
            ["model"],
            registry=r,
        )
        for model, seconds in deadlines.items():
            deadline.labels(model).set(seconds)
        deadline.labels("other").set(default_deadline_s)
        self.requests = _Labelled(
            Counter(
                "gateway_requests",
                "Requests answered.",
                ["route", "model", "status", "mode"],
                registry=r,
            )
        )
        self.request_duration = _Labelled(
            Histogram(
                "gateway_request_duration_seconds",
                "Time from request to last byte of the answer.",
                ["route", "model", "mode"],
                buckets=LATENCY_BUCKETS_S,
                registry=r,
            )
        )
        self.upstream_duration = _Labelled(
            Histogram(
                "gateway_upstream_duration_seconds",
                "Time from sending upstream to its last byte.",
                ["model", "status"],
                buckets=LATENCY_BUCKETS_S,
                registry=r,
            )
        )
        self.upstream_timeouts = _Labelled(
            Counter(
                "gateway_upstream_timeouts",
                "Upstream calls cut by a deadline.",
                ["model", "phase"],
                registry=r,
            )
        )
        self.client_disconnects = _Labelled(
            Counter(
                "gateway_client_disconnects",
                "Callers that went away before their answer.",
                ["route"],
                registry=r,
            )
        )
        self.inflight = _Labelled(
            Gauge(
                "gateway_inflight_requests",
                "Requests being handled.",
                ["route"],
                registry=r,
            )
        )

        self.tasks = _Labelled(
            Counter("gateway_tasks", "Tasks ended, by outcome.", ["model", "status"], registry=r)
        )
        self.task_wait = _Labelled(
            Histogram(
                "gateway_task_wait_seconds",
                "Time from submit to a worker starting the task.",
                ["model"],
                buckets=LATENCY_BUCKETS_S,
                registry=r,
            )
        )
        self.task_duration = _Labelled(
            Histogram(
                "gateway_task_duration_seconds",
                "Time from a worker starting a task to its end.",
                ["model", "status"],
                buckets=LATENCY_BUCKETS_S,
                registry=r,
            )
        )
        self.task_queue_depth = Gauge(
            "gateway_task_queue_depth",
            "Tasks waiting for a worker (all replicas', when on Redis); read at scrape time.",
            registry=r,
        )
        self.sse_clients = Gauge("gateway_sse_clients", "Open task event streams.", registry=r)
        self.task_workers = Gauge(
            "gateway_task_workers", "Task worker loops alive in this process.", registry=r
        )
        self.worker_heartbeat = Gauge(
            "gateway_task_worker_heartbeat_timestamp_seconds",
            "When a worker of this process last asked the store for work (Unix time).",
            registry=r,
        )
        self.store_duration = _Labelled(
            Histogram(
                "gateway_store_duration_seconds",
                "Task store (Redis) calls, by operation.",
                ["op"],
                buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
                registry=r,
            )
        )
        self.store_errors = _Labelled(
            Counter(
                "gateway_store_errors",
                "Task store (Redis) calls that failed to reach it, by operation.",
                ["op"],
                registry=r,
            )
        )
        self.pool_in_use = Gauge(
            "gateway_upstream_connections_in_use",
            "Upstream connections carrying a call.",
            registry=r,
        )
        self.pool_idle = Gauge(
            "gateway_upstream_connections_idle",
            "Upstream connections kept alive, idle.",
            registry=r,
        )
        self.pool_size = Gauge(
            "gateway_upstream_pool_size",
            "Most upstream connections at once (0: no limit).",
            registry=r,
        )
        Info("gateway_build", "The running gateway.", registry=r).info(
            {"version": __version__, "python": platform.python_version()}
        )

        # Gauges read from elsewhere (the task store's queue) just before each scrape.
        self.before_scrape: list[Callable[[], Awaitable[None]]] = []

    def store_call(self, op: str, seconds: float, reached: bool) -> None:
        self.store_duration(op).observe(seconds)
        if not reached:
            self.store_errors(op).inc()

    def watch_pool(self, connector: aiohttp.TCPConnector, size: int) -> None:
        """Pool use, read at scrape time. aiohttp has no public count of connections in use, so
        this reads its bookkeeping; a future aiohttp that renames it reads as 0, not a crash."""
        self.pool_size.set(size)
        self.pool_in_use.set_function(lambda: len(getattr(connector, "_acquired", ())))
        self.pool_idle.set_function(
            lambda: sum(len(conns) for conns in getattr(connector, "_conns", {}).values())
        )

    def model_label(self, model: str | None) -> str:
        """Bounded label values: a caller cannot mint new series with made-up model names."""
        return model if model in self._models else "other"


METRICS = web.AppKey("metrics", Metrics)


async def metrics_view(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    for refresh in metrics.before_scrape:
        with contextlib.suppress(StoreUnavailable):  # the scrape still shows everything else
            await refresh()
    body = generate_latest(metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
