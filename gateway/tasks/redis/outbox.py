"""The outbox (`tasks/outbox.py`) in Redis: a sorted set of task ids by when due and a hash of
their state, on one Cluster slot (`{outbox}`), changed by Lua scripts on Redis's clock. It
survives any replica: whichever replica is alive delivers what is due."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Protocol

from redis.exceptions import RedisError

from gateway.tasks.outbox import UNENDED_RECHECK_S, Announcement, Doorbell
from gateway.tasks.redis.clock import RedisClock
from gateway.tasks.redis.keys import Keys
from gateway.tasks.redis.observed import Observer, giving_up_at, store_call
from gateway.tasks.redis.scripts import script

_TAKE = script("outbox_take")
_SETTLE = script("outbox_settle")
_SCHEDULE = script("outbox_schedule")


class _Owner(Protocol):
    """The store whose client the outbox shares (its readiness: a cluster learnt once)."""

    observe: Observer
    deadline_s: float
    ready: bool

    async def get_ready(self) -> None: ...


class RedisOutbox:
    def __init__(self, redis: Any, keys: Keys, owner: _Owner, clock: RedisClock) -> None:
        self._keys = [keys.outbox, keys.outbox_state]
        self._owner = owner
        self._clock = clock
        self._take = redis.register_script(_TAKE)
        self._settle = redis.register_script(_SETTLE)
        self._schedule = redis.register_script(_SCHEDULE)
        self.doorbell = Doorbell()

    # What `store_call` reads of the object it wraps a method of: the owner's.
    @property
    def observe(self) -> Observer:
        return self._owner.observe

    @property
    def deadline_s(self) -> float:
        return self._owner.deadline_s

    @property
    def ready(self) -> bool:
        return self._owner.ready

    async def get_ready(self) -> None:
        await self._owner.get_ready()

    async def expect(self, task_id: str) -> None:
        """Before the task is created (inside its creation's own bounded store call): an entry
        that a creation that fails leaves is dropped when it comes due (no such task)."""
        await self._schedule(keys=self._keys[:1], args=[task_id, _ms(UNENDED_RECHECK_S), "NX"])

    async def nudge(self, task_id: str) -> None:
        """The task ended: its entry is due now. Best effort, bounded: a store that fails here
        must not hold the worker that ended the task, nor fail an end that happened; the entry
        comes due by itself (`UNENDED_RECHECK_S`)."""
        with contextlib.suppress(RedisError, OSError):  # a timeout is an OSError too
            async with asyncio.timeout(self._owner.deadline_s):
                await self._schedule(keys=self._keys[:1], args=[task_id, 0, "XX"])
                self.doorbell.ring()

    @store_call
    async def take(self, limit: int, lease_s: float) -> tuple[list[Announcement], int]:
        # A quarter of the deadline for the error of reading Redis's clock (`creation.py`).
        cutoff_ms = await self._clock.fence_ms(giving_up_at.get() - self.deadline_s / 4)
        got = await self._take(keys=self._keys, args=[_ms(lease_s), limit, cutoff_ms])
        held, entries = int(got[0]), got[1:]
        return [
            Announcement(
                task_id=task_id.decode(),
                lease=int(lease),
                attempts=int(attempts),
                client=client.decode(),
                body=bytes(body),
            )
            for task_id, lease, attempts, client, body in entries
        ], held

    @store_call
    async def keep(self, taken: Announcement, client: str, body: bytes) -> bool:
        return await self._settled(taken, "keep", client, body)

    @store_call
    async def later(self, taken: Announcement, delay_s: float, *, failed: bool) -> bool:
        return await self._settled(taken, "later", _ms(delay_s), "1" if failed else "0")

    @store_call
    async def drop(self, taken: Announcement) -> bool:
        return await self._settled(taken, "drop")

    async def _settled(self, taken: Announcement, action: str, *args: bytes | str | int) -> bool:
        done = await self._settle(keys=self._keys, args=[taken.task_id, taken.lease, action, *args])
        return bool(done)


def _ms(seconds: float) -> int:
    return int(seconds * 1000)
