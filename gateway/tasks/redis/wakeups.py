"""Wake-ups: a task's id published on one channel when it changes, so that whoever follows the
task reads its events at once instead of polling. Only a wake-up: the events are the record,
and a lost subscription wakes every waiter to read again."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from redis.exceptions import RedisError

logger = logging.getLogger(__name__)


class Wakeups:
    def __init__(self, redis: Any, channel: str) -> None:
        self._redis = redis
        self._channel = channel
        self._waiting: dict[str, asyncio.Event] = {}
        self._listener: asyncio.Task[None] | None = None

    async def waiter(self, task_id: str) -> asyncio.Event:
        """Set on the task's next change. Take it before reading, so no change is missed."""
        if self._listener is None or self._listener.done():  # none yet, or lost with Redis
            pubsub = self._redis.pubsub()
            await pubsub.subscribe(self._channel)
            self._listener = asyncio.create_task(self._dispatch(pubsub))
        return self._waiting.setdefault(task_id, asyncio.Event())

    async def _dispatch(self, pubsub: Any) -> None:
        try:
            async for message in pubsub.listen():
                if message["type"] == "message":
                    waiter = self._waiting.pop(message["data"].decode(), None)
                    if waiter is not None:
                        waiter.set()
        except RedisError:
            logger.warning("task wake-ups lost with Redis; resubscribing on next use")
        finally:
            for waiter in self._waiting.values():
                waiter.set()
            self._waiting.clear()
            with contextlib.suppress(RedisError):
                await pubsub.aclose()

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
