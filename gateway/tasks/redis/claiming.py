"""A worker taking its next task from the Redis queue: a reclaimed entry of a lost worker, or
the next waiting task in turn (`take.lua`), then starting it (`start.lua`, which on a standalone
Redis takes its concurrency slots too), or handed one started for it at its creation
(`RedisStore._open`). It holds what it runs in `held`, shared with the store."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

import msgspec
from redis.exceptions import ResponseError

from gateway.aio import cancel_requests, raise_if_cancelled_since
from gateway.tasks.models import DEFER_PAUSE_S, TERMINAL, Claim, Job, TaskError, TaskRecord
from gateway.tasks.redis.keys import Keys
from gateway.tasks.redis.queue import Entry, Limits, Queue
from gateway.tasks.redis.slots import Slots
from gateway.tasks.redis.transitions import FULL, OLDER, Transitions, unpack_job
from gateway.tasks.redis.waiting import Waiting
from gateway.tasks.redis.wakeups import Wakeups

logger = logging.getLogger(__name__)
# How long a worker back from a run trusts that the queue was found empty (`_next`); a wake-up
# lost in a way the subscription did not notice is then found by the next look.
_QUIET_S = 1.0


class Held(msgspec.Struct):
    """What this worker holds for a task it runs."""

    entry_id: bytes  # b"" for a task run here: it has no queue entry while it runs
    slots: list[str]
    record: TaskRecord  # as it started: what its end event is made from
    limits: Limits  # what a worker it is handed over to must hold
    ended: bool = False  # by this run, its entry, lease and slots gone with the end


class Claiming:
    def __init__(
        self,
        redis: Any,
        keys: Keys,
        queue: Queue,
        slots: Slots,
        transitions: Transitions,
        wakeups: Wakeups,
        waiting: Waiting,
        held: dict[str, Held],
        hand_over: Callable[[str], Coroutine[Any, Any, None]],
        *,
        ordered: bool,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._queue = queue
        self._slots = slots
        self._transitions = transitions
        self._wakeups = wakeups
        self._waiting = waiting
        self._held = held
        self._hand_over = hand_over  # a task it holds goes to another worker
        self._handing: set[asyncio.Task[None]] = set()
        # One node: a start takes its slots in the same script (else they are another node's).
        self._ordered = ordered
        # When the queue was last found empty, and the wake-ups missed then (`_next`).
        self._empty: tuple[float, int] | None = None

    async def claim(self, timeout_s: float) -> Claim | None:
        await self._queue.ensure_group()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        look = False  # a worker back from a run may not need to (`_next`)
        while (left := deadline - loop.time()) > 0:
            seen = cancel_requests()
            try:
                entry = await self._next(left, look)
            except ResponseError as exc:
                if not self._queue.lost_group(exc):
                    raise
                return None
            if isinstance(entry, Claim):  # started for this worker (`_open`)
                try:
                    raise_if_cancelled_since(seen)
                except BaseException:
                    self._hand_back(entry.record.task.id)
                    raise
                return entry
            raise_if_cancelled_since(seen)
            if entry is not None and (claim := await self._start(entry)) is not None:
                return claim  # else cancelled, expired or deferred: take the next one
            look = True
        return None

    async def _next(self, timeout_s: float, look: bool) -> Entry | Claim | None:
        """The next entry to run, waiting up to `timeout_s` for a wake-up if none is there. A
        worker back from a run does not look (`look`) if the queue was found empty a moment
        ago and every task queued since woke a worker: it waits for its wake-up."""
        if (reclaimed := await self._reclaim()) is not None:
            return reclaimed
        woken = await self._wakeups.worker_waiter()
        missed = self._wakeups.missed
        empty = self._empty
        looked = (
            look or empty is None or empty[1] != missed or empty[0] < time.monotonic() - _QUIET_S
        )
        if looked:
            try:
                entry = await self._queue.take()
            except BaseException:
                self._wakeups.pass_on(woken)  # a wake-up it took must reach a worker that waits
                raise
            self._empty = (time.monotonic(), missed) if entry is None or entry.left == 0 else None
            if entry is not None:
                self._wakeups.pass_on(woken)
                return entry
        try:
            # A worker that did not look waits briefly: a wake-up used up without a take (one for
            # many lost tasks, say) must not hold the queue for the whole claim.
            return await self._wakeups.wait(woken, timeout_s if looked else _QUIET_S)
        except BaseException:
            if woken.done() and not woken.cancelled() and (claim := woken.result()) is not None:
                self._hand_back(claim.record.task.id)  # stopped holding a task given to it
            raise

    def _hand_back(self, task_id: str) -> None:
        """A task started for this worker, which stopped before it ran it: another takes it."""
        handing = asyncio.create_task(self._hand_over(task_id))
        self._handing.add(handing)
        handing.add_done_callback(self._handing.discard)

    async def _reclaim(self) -> Entry | None:
        reclaimed = await self._queue.reclaim()
        if reclaimed is None:
            return None
        entry, lost_too_often = reclaimed
        if not lost_too_often:
            return entry
        logger.warning("%s failed: its worker was lost too many times", entry.task_id)
        record = await self._transitions.read(entry.task_id)
        if record is not None:
            error = TaskError(
                "The task's worker was lost too many times.", "server_error", "worker_lost"
            )
            await self._transitions.end(record, None, "failed", error=error)
        await self._queue.done(entry.id)
        return None

    async def _start(self, entry: Entry) -> Claim | None:
        task_id, read, limits = entry.task_id, None, entry.limits
        if limits is None:  # the entry does not say: its job does
            if (read := await self._read(entry)) is None:
                return None
            limits = read[1].limits
        # A standalone Redis takes the slots with the start, in one round trip; a Redis
        # Cluster keeps them on another node: taken first.
        together = self._ordered and bool(limits)
        slots = self._slots.keys(limits) if together else await self._slots.acquire(task_id, limits)
        mark = self._wakeups.mark()
        started = None
        if slots is not None:
            take = (slots, self._slots.take_args(limits)) if together else ([], [])
            started = await self._transitions.start(
                task_id, entry.id, entry.takeover, None if read is None else read[0], take
            )
            if started == OLDER:  # made by an older gateway: started from the task as read
                read = await self._read(entry)
                started = None
                if read is not None:
                    args = (task_id, entry.id, entry.takeover, read[0], take)
                    started = await self._transitions.start(*args)
        if slots is None or started == FULL:  # a slot it needs is full: it waits again, queued
            if read is not None or (read := await self._read(entry)) is not None:
                await self._queue.put_back(entry, read[0].owner, len(read[1].body), limits)
                await asyncio.sleep(DEFER_PAUSE_S)
            return None
        if not isinstance(started, tuple):  # ended, gone, or a duplicate entry of a running task
            async with self._redis.pipeline(transaction=False) as pipe:
                if not together:
                    self._slots.release_call(pipe, task_id, slots)
                self._queue.done_call(pipe, entry.id)
                await pipe.execute()
            return None
        self._waiting.expect(task_id, "in_progress", mark)
        self._held[task_id] = Held(entry.id, slots, started[0], limits)
        return Claim(*started)

    async def _read(self, entry: Entry) -> tuple[TaskRecord, Job] | None:
        """The entry's task and job as they stand; None (and the entry done) if it ended."""
        task_id = entry.task_id
        record, job_raw = await self._transitions.read_with(task_id, self._keys.job(task_id))
        if record is None or job_raw is None or record.task.status in TERMINAL:
            await self._queue.done(entry.id)  # cancelled or expired
            return None
        return record, unpack_job(job_raw)
