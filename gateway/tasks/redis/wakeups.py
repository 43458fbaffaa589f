"""Wake-ups on one channel: `<task id> <status>` when a task changes, so whoever follows the task
hears of it at once instead of polling (and, from the status, whether there is anything to
read); and `queue` when a task starts waiting, which wakes one idle worker of each replica.
Only wake-ups: the streams and sets are the record, and a lost subscription wakes every waiter
to read again."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from redis.exceptions import RedisError

from gateway.logsafe import OncePer
from gateway.tasks.models import TERMINAL, Claim

logger = logging.getLogger(__name__)

# How many of the latest changes are remembered (`since`): far more than arrive between a write
# and its writer's next look, which is what they are for.
_RECENT = 4096
_V = TypeVar("_V")


def remember(latest: dict[str, _V], key: str, value: _V, most: int) -> None:
    """Keep `value` as the newest of `latest`, which holds the `most` newest (oldest first)."""
    latest.pop(key, None)
    latest[key] = value
    if len(latest) > most:
        del latest[next(iter(latest))]


class Watch:
    """One waiter's wake-ups of one task: `changed` is set on each change (with `ends_only`,
    only on its end, or on a change it cannot tell), and `status` is the status the last one
    announced (None: unknown, read it)."""

    __slots__ = ("changed", "ends_only", "status")

    def __init__(self, ends_only: bool) -> None:
        self.changed = asyncio.Event()
        self.ends_only = ends_only
        self.status: str | None = None

    async def next(self) -> str | None:
        await self.changed.wait()
        self.changed.clear()
        return self.status


class Wakeups:
    def __init__(self, redis: Any, channel: str) -> None:
        self._redis = redis
        self._channel = channel
        self._watches: dict[str, list[Watch]] = {}
        self._idle_workers: collections.deque[asyncio.Future[Claim | None]] = collections.deque()
        self._awaiting: set[asyncio.Future[Claim | None]] = set()  # workers in `wait`
        self._listener: asyncio.Task[None] | None = None
        # Workers and followers start at once: one of them subscribes, the rest wait for it.
        self._subscribing = asyncio.Lock()
        self._warned = OncePer(60.0)
        # The latest changes heard, by task (oldest first), and a count of them that jumps on a
        # lost subscription: a writer's `mark` says whether its task's changes since are here.
        self._recent: dict[str, str] = {}
        self._heard = 0
        self._listening = False
        # A `queue` wake-up that found no idle worker: the queue may hold work nobody took.
        self.missed = 0

    async def listen(self) -> None:
        """Subscribe, if not (again, after a lost subscription): before a read that a change
        after it must wake."""
        async with self._subscribing:
            if self._listener is None or self._listener.done():  # none yet, or lost with Redis
                pubsub = self._redis.pubsub()
                await pubsub.subscribe(self._channel)
                self._listener = asyncio.create_task(self._dispatch(pubsub))

    @contextlib.asynccontextmanager
    async def watch(self, task_id: str, *, ends_only: bool = False) -> AsyncIterator[Watch]:
        """The task's wake-ups while in the block (`ends_only`: for a waiter of its end, which
        a start need not wake). Open it before reading, so no change is missed."""
        await self.listen()
        watch = Watch(ends_only)
        watches = self._watches.setdefault(task_id, [])
        watches.append(watch)
        try:
            yield watch
        finally:
            watches.remove(watch)
            if not watches and self._watches.get(task_id) is watches:
                del self._watches[task_id]

    def mark(self) -> int | None:
        """Taken before a write: `since` then tells what the write's task became after it."""
        return self._heard if self._listening else None

    def since(self, task_id: str, mark: int | None) -> str | bool | None:
        """The status last announced for the task after `mark`; None if none was; False if
        that is not known (not listening then, a subscription lost, or too many changes)."""
        if mark is None or not self._listening or self._heard - mark >= _RECENT:
            return False
        heard = self._recent.get(task_id)
        return False if heard == "" else heard

    async def worker_waiter(self) -> asyncio.Future[Claim | None]:
        """Done when a task starts waiting (one idle worker per wake-up), or with a task
        started for this worker (`give`). Take it before looking at the queue, so no wake-up is
        missed; `pass_on` it if the look found work, else `wait` for it."""
        await self.listen()
        woken: asyncio.Future[Claim | None] = asyncio.get_running_loop().create_future()
        self._idle_workers.append(woken)
        return woken

    async def wait(self, woken: asyncio.Future[Claim | None], timeout_s: float) -> Claim | None:
        """A worker waits for its wake-up: None, or a task started for it (`give`). The timeout
        never cancels a future already given a task (asyncio.wait, not asyncio.timeout)."""
        self._awaiting.add(woken)
        try:
            await asyncio.wait((woken,), timeout=timeout_s)
        finally:
            self._awaiting.discard(woken)
            self._forget(woken)
        return None if woken.cancelled() else woken.result()

    def _forget(self, woken: asyncio.Future[Claim | None]) -> None:
        """A worker no longer waits on `woken`: out of the line, so the line stays short."""
        if not woken.done():
            woken.cancel()
        with contextlib.suppress(ValueError):
            self._idle_workers.remove(woken)

    def set_aside(self) -> asyncio.Future[Claim | None] | None:
        """A worker of this process that waits for work, kept for a task this process creates
        (no wake-up reaches it meanwhile); `give` it the task, or None to look at the queue."""
        for woken in self._awaiting:
            if not woken.done():
                self._awaiting.discard(woken)
                self._idle_workers.remove(woken)
                return woken
        return None

    @staticmethod
    def give(woken: asyncio.Future[Claim | None], claim: Claim | None) -> bool:
        """Hand a worker set aside its task (None: look at the queue). False if it stopped
        waiting meanwhile (timed out, or stopping)."""
        if woken.done():
            return False
        woken.set_result(claim)
        return True

    def pass_on(self, woken: asyncio.Future[Claim | None]) -> None:
        """A worker found work without its wake-up: a wake-up that came goes to the next."""
        if woken.done():
            self._wake_a_worker()
        else:
            self._forget(woken)

    def idle_here(self) -> bool:
        """Whether a worker of this process waits for work."""
        while self._idle_workers and self._idle_workers[0].done():
            self._idle_workers.popleft()
        return bool(self._idle_workers)

    def wake_here(self) -> bool:
        """Wake an idle worker of this process for a task queued here: False if none was."""
        return self.idle_here() and self._wake_a_worker()

    def _wake_a_worker(self) -> bool:
        while self._idle_workers:
            woken = self._idle_workers.popleft()
            if not woken.done():
                woken.set_result(None)
                return True
        self.missed += 1
        return False

    def _heard_of(self, task_id: str, status: str | None) -> None:
        self._heard += 1
        # "": it changed, to what the message did not say (an older gateway's).
        remember(self._recent, task_id, status or "", _RECENT)
        for watch in self._watches.get(task_id, ()):
            if watch.ends_only and status and status not in TERMINAL:
                continue
            watch.status = status
            watch.changed.set()

    async def _dispatch(self, pubsub: Any) -> None:
        try:
            async for message in pubsub.listen():
                if message["type"] == "subscribe":
                    self._listening = True
                if message["type"] != "message":
                    continue
                if message["data"] == b"queue":
                    self._wake_a_worker()
                else:
                    task_id, _, status = message["data"].decode().partition(" ")
                    self._heard_of(task_id, status or None)
        except (RedisError, OSError, RuntimeError):  # RuntimeError: a transport gone under it
            if self._warned():
                logger.warning("task wake-ups lost with Redis; resubscribing on next use")
        finally:
            self._listening = False
            self._heard += _RECENT  # what was heard before is no guide to what was missed
            self._recent.clear()
            for watches in self._watches.values():
                for watch in watches:
                    watch.status = None
                    watch.changed.set()
            while self._idle_workers:
                self._wake_a_worker()
            self.missed += 1
            # A connection a dead node left behind may fail to close in any way at all.
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
