"""The webhooks' series, made on the app's registry only when a client has a webhook: a
gateway without webhooks shows none. The client label takes only names from the config."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

Outcome = Literal["delivered", "failed_attempt", "gave_up"]
_OUTCOMES: tuple[Outcome, ...] = ("delivered", "failed_attempt", "gave_up")
# A receiver answers in milliseconds; the tail up to the longest timeout_s worth setting.
_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class WebhookMetrics:
    def __init__(self, registry: CollectorRegistry, clients: Iterable[str]) -> None:
        self._deliveries = Counter(
            "gateway_webhook_deliveries",
            "Webhook delivery tries by outcome: delivered (a 2xx), failed_attempt (retried "
            "later), gave_up (the last retry failed).",
            ("client", "outcome"),
            registry=registry,
        )
        self._seconds = Histogram(
            "gateway_webhook_delivery_seconds",
            "Time of one webhook delivery try, from sending to the receiver's answer.",
            ("client",),
            buckets=_BUCKETS_S,
            registry=registry,
        )
        self.pending = Gauge(
            "gateway_webhook_pending",
            "Task ends still to announce, over all replicas: tasks of webhook clients not yet "
            "ended, and events not yet delivered (retries waiting included).",
            registry=registry,
        )
        # Every series from the start, at 0: an alert on a rate needs the series before its
        # first increment.
        for client in clients:
            for outcome in _OUTCOMES:
                self._deliveries.labels(client, outcome)
            self._seconds.labels(client)

    def tried(self, client: str, outcome: Outcome, seconds: float | None) -> None:
        self._deliveries.labels(client, outcome).inc()
        if seconds is not None:
            self._seconds.labels(client).observe(seconds)
