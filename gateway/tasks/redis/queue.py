"""The work queue: waiting tasks in a sorted set served in turn across callers (`lua/fair.lua`),
and a Redis stream read through one consumer group for the tasks being run.

A worker takes its next task by moving it from the waiting set into the stream and reading it
(one script, `take.lua`). Its entry stays pending (in the group's list of delivered,
unacknowledged entries) while the task runs, so the entries of a worker that died are found
again by XAUTOCLAIM once its lease lapses. An entry is acknowledged and deleted when its task
needs no worker any more. All of it shares the `{queue}` hash tag: one Redis Cluster slot.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgspec
from redis.exceptions import ResponseError

from gateway.tasks.models import QueueCaps
from gateway.tasks.redis.keys import Keys
from gateway.tasks.redis.scripts import script

_GROUP = b"workers"
logger = logging.getLogger(__name__)

Limits = list[tuple[str, int]]
pack = msgspec.msgpack.Encoder().encode
_limits = msgspec.msgpack.Decoder(Limits).decode


class Entry(msgspec.Struct, frozen=True):
    id: bytes
    task_id: str
    # Whether the task may be in progress already: reclaimed from a lost worker, or handed
    # over by one shutting down. Any other entry of a running task is a duplicate.
    takeover: bool
    # The concurrency slots its task needs; None if the entry does not say (a task a lost
    # replica ran here, or one an older gateway queued): its job says.
    limits: Limits | None = None
    # How many tasks still waited when it was taken; -1 if not counted.
    left: int = -1


_FAIR = script("fair")
# Creating a task's scripts, run fenced (`creation.py`).
OPEN = script("slots") + _FAIR + script("task") + script("open")
ENQUEUE = _FAIR + script("enqueue")
HOLD_HERE = script("hold_here")
_REQUEUE_LOST, _REQUEUE, _TAKE, _UNQUEUE, _PUT_BACK = (
    script("requeue_lost"),
    script("requeue"),
    _FAIR + script("take"),
    _FAIR + script("unqueue"),
    _FAIR + script("put_back"),
)


class Queue:
    def __init__(
        self,
        redis: Any,
        keys: Keys,
        consumer: bytes,
        lease_ms: int,
        max_deliveries: int,
        caps: QueueCaps,
    ) -> None:
        self._redis = redis
        self.key = keys.queue
        self._keys = keys
        self._here = keys.here
        # As `fair.lua`'s `caps_at` reads them.
        self._caps = (caps.per_caller, caps.bytes_per_caller, caps.total, caps.bytes_total)
        self._hold = redis.register_script(HOLD_HERE)
        self._requeue_lost = redis.register_script(_REQUEUE_LOST)
        self._requeue = redis.register_script(_REQUEUE)
        self._take = redis.register_script(_TAKE)
        self._unqueue = redis.register_script(_UNQUEUE)
        self._put_back = redis.register_script(_PUT_BACK)
        self._consumer = consumer
        self._lease_ms = lease_ms
        self._max_deliveries = max_deliveries
        self._group_ready = False
        self._next_reclaim = 0.0
        self._reclaim_from: bytes | str = "0-0"

    def enqueue_call(
        self, task_id: str, caller: str, size: int, limits: Limits, *, announce: bool
    ) -> tuple[list[str], list[str | int | bytes]]:
        """`enqueue.lua`'s keys and arguments: 1 if queued, 0 if over the caller's caps. With
        `announce`, a `queue` wake-up goes to every replica."""
        keys = [self._keys.order, self._keys.fair]
        wake = self._keys.wake if announce else ""
        return keys, [task_id, caller, size, *self._caps, wake, pack(limits)]

    def open_call(
        self, task_id: str, caller: str, size: int, limits: Limits, set_aside: bool
    ) -> tuple[list[str], list[str | int | bytes]]:
        """`open.lua`'s keys and arguments after the task's own (`create_call`'s), but for the
        slots it takes if it starts at once: `enqueue.lua`'s, then its own."""
        keys, args = self.enqueue_call(task_id, caller, size, limits, announce=True)
        return [*keys, self.key, self._here], [*args, _GROUP, "1" if set_aside else "0"]

    async def announce(self) -> None:
        """Wake an idle worker of each replica: a task waits."""
        await self._redis.publish(self._keys.wake, "queue")

    def hold_call(self, task_id: str) -> tuple[list[str], list[str | int]]:
        """`hold_here.lua`'s keys and arguments: a lease for a task run here, which has no
        queue entry while it runs (its lease is how a dead replica's task is found)."""
        return [self._here], [task_id, self._lease_ms, ""]

    async def keep_here(self, task_id: str) -> None:
        """Renew a task run here's lease (if it still has one: else it was requeued)."""
        await self._hold(keys=[self._here], args=[task_id, self._lease_ms, "XX"])

    async def unqueue(self, task_id: str) -> None:
        """A waiting task cancelled: it stops counting against its caller's caps now."""
        await self._unqueue(keys=[self._keys.order, self._keys.fair], args=[task_id])

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

    async def take(self) -> Entry | None:
        """This worker's next entry: one handed over or reclaimed, else the next waiting task in
        turn. None when nothing waits."""
        got = await self._take(
            keys=[self._keys.order, self._keys.fair, self.key], args=[_GROUP, self._consumer]
        )
        if not got:
            return None
        entry_id, task_id, takeover, limits, left = got
        limits = None if limits is None else _limits(limits)
        return Entry(bytes(entry_id), bytes(task_id).decode(), takeover == b"1", limits, left)

    async def reclaim(self) -> tuple[Entry, bool] | None:
        """An entry whose worker stopped renewing its lease (killed, most likely), and whether
        it was delivered more than `max_deliveries` times; tasks run here whose replica stopped
        renewing go to the queue first. Looked for a few times per lease, not on every claim."""
        now = asyncio.get_running_loop().time()
        if now < self._next_reclaim:
            return None
        if self._reclaim_from in (b"0-0", "0-0"):  # a scan starts: tasks run here come first
            await self._requeue_lost(keys=[self._here, self.key], args=[self._keys.wake])
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

    def let_go(self, entry_id: bytes, slots: list[str]) -> tuple[list[str], list[Any]]:
        """The keys and arguments `end.lua` lets go of a run's entry (b"": its here-lease) and
        slots with. They span Redis Cluster slots: for a standalone Redis only."""
        return [self.key, self._here, *slots], [_GROUP, entry_id]

    def done_call(self, pipe: Any, entry_id: bytes) -> None:
        """`done`'s commands, in a caller's pipeline."""
        pipe.xack(self.key, _GROUP, entry_id)
        pipe.xdel(self.key, entry_id)

    async def done(self, entry_id: bytes) -> None:
        """The entry's task needs no worker any more."""
        async with self._redis.pipeline(transaction=False) as pipe:
            self.done_call(pipe, entry_id)
            await pipe.execute()

    async def hand_over(self, entry_id: bytes, task_id: str, limits: Limits) -> None:
        """A running task goes to another worker at once (this one is stopping): a fresh entry
        that may take it over, ahead of the waiting tasks."""
        args = [entry_id, _GROUP, task_id, self._keys.wake, "1", pack(limits)]
        await self._requeue(keys=[self.key, self._here], args=args)

    async def put_back(self, entry: Entry, caller: str, size: int, limits: Limits) -> None:
        """A task whose concurrency slot is full waits again, at the end of its caller's line
        (a takeover entry keeps its place ahead of the line)."""
        if entry.takeover:
            await self.hand_over(entry.id, entry.task_id, limits)
            return
        await self._put_back(
            keys=[self._keys.order, self._keys.fair, self.key],
            args=[entry.id, _GROUP, entry.task_id, caller, size, self._keys.wake, pack(limits)],
        )

    async def let_go_here(self, task_id: str, handover: bool) -> None:
        """A task run here ended its run: its lease goes, and with `handover` (its replica is
        shutting down mid-run) it joins the queue as an entry that may take it over (its slots
        read from its job: a task run here held none)."""
        hand = "1" if handover else "0"
        await self._requeue(
            keys=[self.key, self._here], args=[b"", _GROUP, task_id, self._keys.wake, hand, ""]
        )

    async def depth(self) -> int:
        """Tasks waiting for a worker: the waiting set, and entries not yet delivered."""
        await self.ensure_group()
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zcard(self._keys.order)
            pipe.xlen(self.key)
            pipe.xpending(self.key, _GROUP)
            waiting, length, pending = await pipe.execute()
        return int(waiting) + max(int(length) - int(pending["pending"]), 0)


def _entry(entry_id: bytes, fields: dict[bytes, bytes], *, takeover: bool) -> Entry:
    takeover = takeover or fields.get(b"takeover") == b"1"
    limits = None if (packed := fields.get(b"limits")) is None else _limits(packed)
    return Entry(entry_id, fields[b"task"].decode(), takeover, limits)
