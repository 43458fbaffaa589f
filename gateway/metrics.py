"""Prometheus metrics: one registry per app, so tests and replicas never share state."""

from __future__ import annotations

import platform
from collections.abc import Mapping, Sequence
from typing import Generic, TypeVar

import aiohttp
from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from gateway import __version__

# No `_created` series: one more series per counter and histogram child, whose value (when this
# process first saw the label set) no board or alert reads. prometheus_client has no per-registry
# switch, only this process-wide one, read at every scrape; this module is where the gateway's
# metrics are made, so importing it is what turns them off (for embedders too).
disable_created_metrics()  # type: ignore[no-untyped-call]

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
        if not values:  # a metric without labels is its own only child
            return self._metric
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


class Metrics:
    def __init__(self, deadlines: Mapping[str, float], default_deadline_s: float = 300.0) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._models = frozenset(deadlines)
        # The configured deadlines beside the observed latencies (the timeout-tuning board).
        deadline = self._gauge(
            "model_deadline_seconds",
            "Configured end-to-end deadline per model ('other': the default).",
            "model",
        )
        for model, seconds in deadlines.items():
            deadline(model).set(seconds)
        deadline("other").set(default_deadline_s)
        self._request_metrics()
        self._task_metrics()
        self._pool_metrics()
        self._usage_metrics()
        Info("gateway_build", "The running gateway.", registry=self.registry).info(
            {"version": __version__, "python": platform.python_version()}
        )

    def _counter(self, name: str, help: str, *labels: str) -> _Labelled[Counter]:
        return _Labelled(Counter(f"gateway_{name}", help, labels, registry=self.registry))

    def _gauge(self, name: str, help: str, *labels: str) -> _Labelled[Gauge]:
        return _Labelled(Gauge(f"gateway_{name}", help, labels, registry=self.registry))

    def _histogram(
        self, name: str, help: str, *labels: str, buckets: Sequence[float] = LATENCY_BUCKETS_S
    ) -> _Labelled[Histogram]:
        return _Labelled(
            Histogram(f"gateway_{name}", help, labels, buckets=buckets, registry=self.registry)
        )

    def _request_metrics(self) -> None:
        self.requests = self._counter(
            "requests", "Requests answered.", "route", "model", "status", "mode"
        )
        self.request_duration = self._histogram(
            "request_duration_seconds",
            "Time from request to last byte of the answer.",
            "route",
            "model",
            "mode",
        )
        self.upstream_duration = self._histogram(
            "upstream_duration_seconds",
            "Time from sending upstream to its last byte.",
            "model",
            "status",
        )
        self.upstream_timeouts = self._counter(
            "upstream_timeouts", "Upstream calls cut by a deadline.", "model", "phase"
        )
        self.client_disconnects = self._counter(
            "client_disconnects", "Callers that went away before their answer.", "route"
        )
        self.inflight = self._gauge("inflight_requests", "Requests being handled.", "route")
        self.body_bytes_refused = self._counter(
            "body_bytes_refused",
            "Calls run as tasks refused with 429: their request bodies over a cap on bytes "
            "held at once (per_caller, total).",
            "reason",
        )
        self.held_refused = self._counter(
            "held_connections_refused",
            "Held connections refused with 429 by a cap: per_caller, total, result_readers.",
            "reason",
        )

    def _task_metrics(self) -> None:
        self.tasks = self._counter("tasks", "Tasks ended, by outcome.", "model", "status")
        self.task_wait = self._histogram(
            "task_wait_seconds", "Time from submit to a worker starting the task.", "model"
        )
        self.task_duration = self._histogram(
            "task_duration_seconds",
            "Time from a worker starting a task to its end.",
            "model",
            "status",
        )
        self.task_queue_depth = self._gauge(
            "task_queue_depth",
            "Tasks waiting for a worker (all replicas', when on Redis); read every second.",
        )()
        self.sse_clients = self._gauge("sse_clients", "Open task event streams.")()
        self.task_workers = self._gauge(
            "task_workers", "Task worker loops alive in this process."
        )()
        self.worker_heartbeat = self._gauge(
            "task_worker_heartbeat_timestamp_seconds",
            "When a worker of this process last asked the store for work (Unix time).",
        )()
        self.store_duration = self._histogram(
            "store_duration_seconds",
            "Task store (Redis) calls, by operation.",
            "op",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
        )
        self.run_once_bypassed = self._counter(
            "run_once_bypassed",
            "SDK calls sent as plain calls because the task store was unreachable.",
        )()
        self.result_store_errors = self._counter(
            "result_store_errors",
            "Task results the results store (GATEWAY_RESULTS_URL) failed to keep.",
        )()
        self.image_copies = self._counter(
            "image_copies",
            "Image addresses in kept answers copied to the results store, by outcome: copied, "
            "refused (host or address not allowed), too_large, timeout, failed.",
            "outcome",
        )
        self.store_wait_skipped = self._counter(
            "store_wait_skipped",
            "Task writes not waited for on a replica (WAIT): their Redis node had none connected "
            "(a primary promoted by a failover, say); a failover of that node now would lose them.",
        )()
        self.store_errors = self._counter(
            "store_errors",
            "Task store (Redis) calls that failed, by operation and reason: unreachable, "
            "timeout, failover (a node not primary, a slot without one), out_of_memory, loading.",
            "op",
            "reason",
        )

    def _pool_metrics(self) -> None:
        self.pool_in_use = self._gauge(
            "upstream_connections_in_use", "Upstream connections carrying a call."
        )()
        self.pool_idle = self._gauge(
            "upstream_connections_idle", "Upstream connections kept alive, idle."
        )()
        self.pool_size = self._gauge(
            "upstream_pool_size", "Most upstream connections at once (0: no limit)."
        )()

    def _usage_metrics(self) -> None:
        # `client` is a configured client's name or "unnamed": bounded by the config.
        self.client_calls = self._counter(
            "client_calls",
            "Counted calls (image routes, Gemini, chat) per client.",
            "client",
            "model",
        )
        self.client_images = self._counter(
            "client_images",
            "Images made per client (the answer's, else the request's n).",
            "client",
            "model",
        )
        self.client_tokens = self._counter(
            "client_tokens",
            "Upstream usage tokens per client, where the answer has them (kind: input, output).",
            "client",
            "model",
            "kind",
        )
        self.client_cost = self._counter(
            "client_cost_usd", "Estimated spend per client ([prices]), in USD.", "client", "model"
        )
        self.budget_refusals = self._counter(
            "budget_refusals",
            "Calls refused with 429 budget_exceeded, by client and period (day, month).",
            "client",
            "period",
        )
        self.budget_unchecked = self._counter(
            "budget_unchecked",
            "Calls of budgeted clients let through unchecked: the task store did not answer "
            "(usage.budget_store_down = open).",
            "client",
        )
        self.usage_unrecorded = self._counter(
            "usage_unrecorded",
            "Settled calls the usage ledger failed to record (task store unreachable).",
            "client",
        )
        self.unpriced_images = self._counter(
            "unpriced_images",
            "Images of models missing from [prices], estimated at usage.unpriced_image_usd.",
            "model",
        )

    def store_call(self, op: str, seconds: float, failure: str) -> None:
        self.store_duration(op).observe(seconds)
        if failure:
            self.store_errors(op, failure).inc()

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
    # Nothing here waits on the task store: what it reads is refreshed in the background.
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
