"""Prometheus metrics: one registry per app, so tests and replicas never share state."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Generic, TypeVar

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from gateway.errors import StoreUnavailable
from gateway.tasks.service import TASKS

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
    def __init__(self, models: Iterable[str]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._models = frozenset(models)
        r = self.registry
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

    def model_label(self, model: str | None) -> str:
        """Bounded label values: a caller cannot mint new series with made-up model names."""
        return model if model in self._models else "other"


METRICS = web.AppKey("metrics", Metrics)


async def metrics_view(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    with contextlib.suppress(StoreUnavailable):  # the scrape still shows everything else
        metrics.task_queue_depth.set(await request.app[TASKS].store.queue_depth())
    body = generate_latest(metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
