"""The work queue: a Redis stream read through one consumer group.

An entry stays pending (in the group's list of delivered, unacknowledged entries) while its
task runs, so the entries of a worker that died are found again by XAUTOCLAIM once its lease
lapses. An entry is acknowledged and deleted when its task needs no worker any more, so the
stream holds only the work waiting or running.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgspec
from redis.exceptions import ResponseError

_GROUP = b"workers"
logger = logging.getLogger(__name__)


class Entry(msgspec.Struct, frozen=True):
    id: bytes
    task_id: str
    # Whether the task may be in progress already: reclaimed from a lost worker, or handed
    # over by one shutting down. Any other entry of a running task is a duplicate.
    takeover: bool


class Queue:
    def __init__(
        self, redis: Any, key: str, consumer: bytes, lease_ms: int, max_deliveries: int
    ) -> None:
        self._redis = redis
        self.key = key
        self._consumer = consumer
        self._lease_ms = lease_ms
        self._max_deliveries = max_deliveries
        self._group_ready = False
        self._next_reclaim = 0.0
        self._reclaim_from: bytes | str = "0-0"

    @staticmethod
    def fields(task_id: str, takeover: bool = False) -> dict[bytes, bytes]:
        """An entry's fields, for XADD (alone or in a caller's pipeline)."""
        return {b"task": task_id.encode(), b"takeover": b"1" if takeover else b"0"}

    async def ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            await self._redis.xgroup_create(self.key, _GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def lost_group(self, exc: ResponseError) -> bool:
        """Whether Redis lost its data (and with it the group), which is then made again."""
        if "NOGROUP" not in str(exc):
            return False
        self._group_ready = False
        return True

    async def next(self, timeout_s: float) -> Entry | None:
        got = await self._redis.xreadgroup(
            _GROUP, self._consumer, {self.key: ">"}, count=1, block=max(1, int(timeout_s * 1000))
        )
        return _entry(*got[0][1][0], takeover=False) if got else None

    async def reclaim(self) -> tuple[Entry, bool] | None:
        """An entry whose worker stopped renewing its lease (killed, most likely), and whether
        it was delivered more than `max_deliveries` times. Looked for a few times per lease,
        not on every claim."""
        now = asyncio.get_running_loop().time()
        if now < self._next_reclaim:
            return None
        # XAUTOCLAIM looks at a few pending entries per call (COUNT x 10) and says where to go
        # on: the scan must follow that cursor, or a lost task behind ten healthy ones is never
        # found. A scan that reached the end starts over after a pause.
        cursor, entries, _ = await self._redis.xautoclaim(
            self.key, _GROUP, self._consumer, self._lease_ms, self._reclaim_from, count=1
        )
        self._reclaim_from = cursor
        if cursor in (b"0-0", "0-0"):
            self._next_reclaim = now + self._lease_ms / 1000 / 4
        if not entries:
            return None
        entry = _entry(*entries[0], takeover=True)
        pending = await self._redis.xpending_range(
            self.key, _GROUP, min=entry.id, max=entry.id, count=1
        )
        return entry, bool(pending) and pending[0]["times_delivered"] > self._max_deliveries

    async def keep(self, entry_id: bytes) -> None:
        """Renew this worker's lease on an entry (XCLAIM to itself resets its idle time)."""
        await self._redis.xclaim(self.key, _GROUP, self._consumer, 0, [entry_id], justid=True)

    async def done(self, entry_id: bytes) -> None:
        """The entry's task needs no worker any more."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.xack(self.key, _GROUP, entry_id)
            pipe.xdel(self.key, entry_id)
            await pipe.execute()

    async def requeue(self, entry_id: bytes, task_id: str, takeover: bool) -> None:
        """The entry's task goes to the tail as a fresh entry, which wakes a waiting worker."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.key, self.fields(task_id, takeover))
            pipe.xack(self.key, _GROUP, entry_id)
            pipe.xdel(self.key, entry_id)
            await pipe.execute()

    async def depth(self) -> int:
        """Entries waiting for a worker: all but the pending (claimed, running) ones."""
        await self.ensure_group()
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.xlen(self.key)
            pipe.xpending(self.key, _GROUP)
            length, pending = await pipe.execute()
        return max(int(length) - int(pending["pending"]), 0)


def _entry(entry_id: bytes, fields: dict[bytes, bytes], *, takeover: bool) -> Entry:
    takeover = takeover or fields.get(b"takeover") == b"1"
    return Entry(entry_id, fields[b"task"].decode(), takeover)
