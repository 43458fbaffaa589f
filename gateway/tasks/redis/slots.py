"""Concurrency slots across replicas: a task runs only while it holds every slot it needs
(its model's, its upstream credential's, its caller's).

A slot is a sorted set of the tasks holding it, scored by lease expiry, so a dead worker's hold
lapses by itself; running tasks renew theirs with their queue lease.
"""

from __future__ import annotations

from typing import Any

from gateway.tasks.redis.keys import Keys
from gateway.tasks.redis.scripts import script

_ACQUIRE, _RENEW = script("slots") + script("acquire"), script("renew_slots")


class Slots:
    def __init__(self, redis: Any, keys: Keys, lease_ms: int) -> None:
        self._redis = redis
        self._keys = keys
        self._lease_ms = lease_ms
        self._acquire = redis.register_script(_ACQUIRE)
        self._renew = redis.register_script(_RENEW)

    def keys(self, limits: list[tuple[str, int]]) -> list[str]:
        """The slots' keys, for `limits` ((name, limit) pairs)."""
        return [self._keys.slot(name) for name, _ in limits]

    def take_args(self, limits: list[tuple[str, int]]) -> list[int]:
        """What a script taking the slots (`slots.lua`) is told after its own arguments."""
        return [self._lease_ms, *(limit for _, limit in limits)]

    async def acquire(self, task_id: str, limits: list[tuple[str, int]]) -> list[str] | None:
        """Take every slot in `limits` or none: the slot keys held."""
        held = self.keys(limits)
        if not held:
            return held
        args = [task_id, *self.take_args(limits)]
        return held if await self._acquire(keys=held, args=args) else None

    async def renew(self, task_id: str, held: list[str]) -> None:
        if held:
            await self._renew(keys=held, args=[task_id, self._lease_ms])

    def release_call(self, pipe: Any, task_id: str, held: list[str]) -> None:
        """`release`'s commands, in a caller's pipeline."""
        for slot in held:
            pipe.zrem(slot, task_id)

    async def release(self, task_id: str, held: list[str]) -> None:
        if held:
            async with self._redis.pipeline(transaction=False) as pipe:
                self.release_call(pipe, task_id, held)
                await pipe.execute()
