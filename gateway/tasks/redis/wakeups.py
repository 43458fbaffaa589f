"""Wake-ups on one channel: a task's id when it changes, so whoever follows the task reads its
events at once instead of polling; and `queue` when a task starts waiting, which wakes one idle
worker of each replica. Only wake-ups: the streams and sets are the record, and a lost
subscription wakes every waiter to read again."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from typing import Any

from redis.exceptions import RedisError

from gateway.accesslog import OncePer

logger = logging.getLogger(__name__)


class Wakeups:
    def __init__(self, redis: Any, channel: str) -> None:
        self._redis = redis
        self._channel = channel
        self._waiting: dict[str, asyncio.Event] = {}
        self._idle_workers: collections.deque[asyncio.Future[None]] = collections.deque()
        self._listener: asyncio.Task[None] | None = None
        # Workers and followers start at once: one of them subscribes, the rest wait for it.
        self._subscribing = asyncio.Lock()
        self._warned = OncePer(60.0)

    async def _listen(self) -> None:
        async with self._subscribing:
            if self._listener is None or self._listener.done():  # none yet, or lost with Redis
                pubsub = self._redis.pubsub()
                await pubsub.subscribe(self._channel)
                self._listener = asyncio.create_task(self._dispatch(pubsub))

    async def waiter(self, task_id: str) -> asyncio.Event:
        """Set on the task's next change. Take it before reading, so no change is missed."""
        await self._listen()
        return self._waiting.setdefault(task_id, asyncio.Event())

    async def worker_waiter(self) -> asyncio.Future[None]:
        """Done when a task starts waiting (one idle worker per wake-up). Take it before
        looking at the queue, so no wake-up is missed; `pass_on` it if the look found work."""
        await self._listen()
        woken = asyncio.get_running_loop().create_future()
        self._idle_workers.append(woken)
        return woken

    def pass_on(self, woken: asyncio.Future[None]) -> None:
        """A worker found work without its wake-up: a wake-up that came goes to the next."""
        if woken.done():
            self._wake_a_worker()
        else:
            woken.cancel()

    def _wake_a_worker(self) -> None:
        while self._idle_workers:
            woken = self._idle_workers.popleft()
            if not woken.done():
                woken.set_result(None)
                return

    async def _dispatch(self, pubsub: Any) -> None:
        try:
            async for message in pubsub.listen():
                if message["type"] != "message":
                    continue
                if message["data"] == b"queue":
                    self._wake_a_worker()
                elif (waiter := self._waiting.pop(message["data"].decode(), None)) is not None:
                    waiter.set()
        except (RedisError, OSError, RuntimeError):  # RuntimeError: a transport gone under it
            if self._warned():
                logger.warning("task wake-ups lost with Redis; resubscribing on next use")
        finally:
            for waiter in self._waiting.values():
                waiter.set()
            self._waiting.clear()
            while self._idle_workers:
                self._wake_a_worker()
            # A connection a dead node left behind may fail to close in any way at all.
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
