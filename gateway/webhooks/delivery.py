"""The delivery loop every replica runs when a client has a webhook: take due entries from the
task store's outbox under a lease, build each task's event once, POST it signed, settle it.

At least once: an entry goes only after a 2xx (or the last retry), so a replica killed mid-try
leaves it to come due again when its lease ends, on whichever replica takes it; the same
webhook-id on every try lets the receiver drop repeats.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping

import aiohttp
from aiohttp import web

from gateway.config import CONFIG, Config
from gateway.errors import StoreUnavailable
from gateway.logsafe import OncePer
from gateway.metrics import METRICS
from gateway.tasks.models import TERMINAL, TaskStore
from gateway.tasks.outbox import UNENDED_RECHECK_S, Announcement, Outbox
from gateway.tasks.service import TASKS
from gateway.webhooks.events import event_body, event_id
from gateway.webhooks.metrics import WebhookMetrics
from gateway.webhooks.signing import secret_key, signed_headers

logger = logging.getLogger(__name__)

# Between two looks at the outbox when nothing was due: how late an event another replica made
# due may start (one this replica ended rings its doorbell, and starts at once).
_POLL_S = 1.0
_USER_AGENT = "gateway-webhooks/1"
# The most a delivery waits for one of its client's tries to end (a receiver that answers frees
# one in milliseconds) before its event goes back to the outbox for a while; past it the
# receiver counts as slow.
_SLOW_ANSWER_S = 1.0


class Hook:
    """A client's webhook: where its events go and the key they are signed with."""

    def __init__(self, url: str, secret: str) -> None:
        self.url = url
        self.key = secret_key(secret)


def hooks(config: Config) -> dict[str, Hook]:
    """The clients with a webhook, by name."""
    return {
        name: Hook(client.webhook_url, client.webhook_secret)
        for name, client in config.clients.items()
        if client.webhook_url
    }


class Deliverer:
    def __init__(
        self,
        store: TaskStore,
        hooks: Mapping[str, Hook],
        config: Config,
        metrics: WebhookMetrics,
        session: aiohttp.ClientSession,
    ) -> None:
        self._store = store
        self._outbox: Outbox = store.outbox
        self._hooks = hooks
        self._delays_s = config.webhooks.retry_delays_s
        self._timeout_s = config.webhooks.timeout_s
        self._concurrency = config.webhooks.concurrency
        # concurrency_per_client tries at once to each client's receiver, and when each of
        # those under way began.
        self._turns = {
            name: asyncio.Semaphore(config.webhooks.concurrency_per_client) for name in hooks
        }
        self._posting: dict[str, list[float]] = {name: [] for name in hooks}
        # A try's whole step (its task read, its event kept, its turn, the POST, its settling)
        # ends before its lease: no two replicas deliver one event at once.
        self._step_s = self._timeout_s + _SLOW_ANSWER_S + 3 * config.tasks.store_timeout_s
        self._lease_s = self._step_s + 5.0
        self._metrics = metrics
        self._session = session
        self._running: set[asyncio.Task[None]] = set()
        self._store_down_said = OncePer(60.0)

    async def run(self) -> None:
        try:
            while True:
                free = self._concurrency - len(self._running)
                taken = await self._take(free) if free else []
                for announcement in taken:
                    delivery = asyncio.create_task(self._deliver(announcement))
                    self._running.add(delivery)
                    delivery.add_done_callback(self._delivered)
                # Every slot busy, or nothing more due: until a delivery ends, a task ends
                # here, or the poll. Else more may be due: look again at once.
                if not free or len(taken) < free:
                    await self._outbox.doorbell.wait(_POLL_S)
        finally:
            # Cut tries are left to their leases: another replica (or this one, restarted)
            # delivers them once the leases end.
            for delivery in self._running:
                delivery.cancel()
            await asyncio.gather(*self._running, return_exceptions=True)

    def _delivered(self, delivery: asyncio.Task[None]) -> None:
        self._running.discard(delivery)
        self._outbox.doorbell.ring()  # a slot is free

    async def _take(self, free: int) -> list[Announcement]:
        try:
            taken, held = await self._outbox.take(free, self._lease_s)
        except StoreUnavailable:
            if self._store_down_said():
                logger.warning("task store unreachable: webhooks wait until it is back")
            return []
        except Exception:  # a bug must not silently stop this replica's webhooks
            logger.exception("webhook outbox take failed")
            return []
        self._metrics.pending.set(held)
        return taken

    async def _deliver(self, taken: Announcement) -> None:
        try:
            async with asyncio.timeout(self._step_s):
                await self._try(taken)
        except (StoreUnavailable, TimeoutError):
            pass  # its lease ends, and it is tried again
        except Exception:
            logger.exception("%s: webhook delivery failed", taken.task_id)

    async def _try(self, taken: Announcement) -> None:
        event = (taken.client, taken.body) if taken.body else await self._event(taken)
        if event is None:
            return
        client, body = event
        hook = self._hooks.get(client)
        if hook is None:  # its client's webhook was removed from the config since
            await self._outbox.drop(taken)
            return
        if not await self._turn(client):
            # Its receiver has had concurrency_per_client tries unanswered for a while (it is
            # slow, or hangs): this event waits its turn in the outbox, not in one of this
            # replica's deliveries, and other clients' go meanwhile. Not a failed try.
            await self._outbox.later(taken, self._waited_s(client), failed=False)
            return
        started = time.monotonic()
        self._posting[client].append(started)
        try:
            answer = await self._post(hook, taken.task_id, body)
        finally:
            self._posting[client].remove(started)
            self._turns[client].release()
        await self._settle(taken, client, answer, time.monotonic() - started)

    async def _turn(self, client: str) -> bool:
        """One of the client's tries at once, if one is free or frees soon: a receiver that
        answers frees one in milliseconds."""
        turn = self._turns[client]
        if turn.locked() and self._unanswered_s(client) >= _SLOW_ANSWER_S:
            return False
        try:
            async with asyncio.timeout(_SLOW_ANSWER_S):
                await turn.acquire()
        except TimeoutError:
            return False
        return True

    def _unanswered_s(self, client: str) -> float:
        """How long the client's oldest try under way has waited for an answer."""
        posting = self._posting[client]
        return time.monotonic() - min(posting) if posting else 0.0

    def _waited_s(self, client: str) -> float:
        """About when one of the client's tries frees: from _SLOW_ANSWER_S to timeout_s."""
        return min(max(self._unanswered_s(client), _SLOW_ANSWER_S), self._timeout_s)

    async def _event(self, taken: Announcement) -> tuple[str, bytes] | None:
        """A first try's client and event, built from the task and kept (every later try sends
        it unchanged); None when there is nothing to send now."""
        record = await self._store.get(taken.task_id)
        if record is None:  # gone past retention, or never made (its creation failed)
            await self._outbox.drop(taken)
            return None
        if record.task.status not in TERMINAL:
            await self._outbox.later(taken, UNENDED_RECHECK_S, failed=False)
            return None
        client, body = record.client, event_body(record.task, int(time.time()))
        if client in self._hooks and not await self._outbox.keep(taken, client, body):
            return None  # its lease ended: another replica has it
        return client, body

    async def _settle(
        self, taken: Announcement, client: str, answer: str | None, seconds: float
    ) -> None:
        """After a try: gone if delivered or if it was the last; else due after its delay."""
        if answer is None:
            await self._outbox.drop(taken)
            self._metrics.tried(client, "delivered", seconds)
            return
        attempts = taken.attempts + 1
        if attempts > len(self._delays_s):
            await self._outbox.drop(taken)
            self._metrics.tried(client, "gave_up", seconds)
            logger.warning(
                "%s: webhook to client %s given up after %d tries (%s)",
                taken.task_id,
                client,
                attempts,
                answer,
            )
            return
        delay_s = self._delays_s[attempts - 1]
        await self._outbox.later(taken, delay_s, failed=True)
        self._metrics.tried(client, "failed_attempt", seconds)
        logger.info(
            "%s: webhook to client %s failed (%s), try %d; next in %g s",
            taken.task_id,
            client,
            answer,
            attempts,
            delay_s,
        )

    async def _post(self, hook: Hook, task_id: str, body: bytes) -> str | None:
        """None when the receiver took the event (a 2xx), else why not (for the log: never
        the URL, which may hold a token)."""
        headers = signed_headers(hook.key, event_id(task_id), int(time.time()), body)
        headers |= {"Content-Type": "application/json", "User-Agent": _USER_AGENT}
        timeout = aiohttp.ClientTimeout(total=self._timeout_s)
        try:
            async with self._session.post(
                hook.url, data=body, headers=headers, allow_redirects=False, timeout=timeout
            ) as response:
                return None if 200 <= response.status < 300 else f"status {response.status}"
        except TimeoutError:
            return f"no answer within {self._timeout_s:g} s"
        except aiohttp.ClientError as failure:
            return type(failure).__name__


async def webhooks_ctx(app: web.Application) -> AsyncIterator[None]:
    """Delivers the outbox's due events on this replica, when a client has a webhook: a
    gateway without webhooks runs nothing for them."""
    config: Config = app[CONFIG]
    by_client = hooks(config)
    if not by_client:
        yield
        return
    metrics = WebhookMetrics(app[METRICS].registry, by_client)
    connector = aiohttp.TCPConnector(limit=config.webhooks.concurrency)
    async with aiohttp.ClientSession(
        connector=connector, cookie_jar=aiohttp.DummyCookieJar()
    ) as session:
        deliverer = Deliverer(app[TASKS].store, by_client, config, metrics, session)
        loop = asyncio.create_task(deliverer.run())
        yield
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
