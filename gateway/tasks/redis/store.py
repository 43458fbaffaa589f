"""The Redis task store: the `TaskStore` contract over the creation, the queue, the transitions,
the slots and the wake-ups. Any replica sharing the Redis can serve any task."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from typing import Any

import msgspec
from redis.exceptions import RedisError, ResponseError

from gateway.aio import cancel_requests, raise_if_cancelled_since
from gateway.tasks.models import (
    DEFER_PAUSE_S,
    TERMINAL,
    Claim,
    Job,
    OnceName,
    Status,
    StoredResponse,
    Task,
    TaskError,
    TaskEvent,
    TaskRecord,
    is_event_id,
)
from gateway.tasks.redis.creation import Creation
from gateway.tasks.redis.keys import Keys
from gateway.tasks.redis.observed import Observer, store_call, unobserved
from gateway.tasks.redis.queue import Entry, Limits, Queue
from gateway.tasks.redis.replicas import ReplicaAcks
from gateway.tasks.redis.slots import Slots
from gateway.tasks.redis.transitions import FULL, Transitions, decode, with_status
from gateway.tasks.redis.waiting import Outcome, Waiting
from gateway.tasks.redis.wakeups import Wakeups

logger = logging.getLogger(__name__)
# How long a worker back from a run trusts that the queue was found empty (`_next`); a wake-up
# lost in a way the subscription did not notice is then found by the next look.
_QUIET_S = 1.0

_job = msgspec.msgpack.Decoder(Job).decode
_response = msgspec.msgpack.Decoder(StoredResponse).decode


class _Held(msgspec.Struct):
    """What this worker holds for a task it runs."""

    entry_id: bytes  # b"" for a task run here: it has no queue entry while it runs
    slots: list[str]
    record: TaskRecord  # as it started: what its end event is made from
    limits: Limits  # what a worker it is handed over to must hold
    ended: bool = False  # by this run, its entry, lease and slots gone with the end


class RedisStore:
    def __init__(
        self,
        redis: Any,
        *,
        consumer: str,
        retention_s: float,
        prefix: str = "gw",
        lease_s: float = 30.0,
        max_deliveries: int = 3,
        observe: Observer = unobserved,
        max_queued_per_caller: int = 1000,
        max_queued_bytes_per_caller: int = 256 * 2**20,
        cluster: bool = False,
        replicas: int = 0,
        replica_ack_timeout_ms: int = 100,
    ) -> None:
        # redis-py types its replies as unions over decode_responses; this store always works
        # in bytes, so the client is used untyped rather than narrowed at every call.
        self._redis: Any = redis
        self.observe = observe
        keys = self._keys = Keys(prefix)
        lease_ms = int(lease_s * 1000)
        caps = (max_queued_per_caller, max_queued_bytes_per_caller)
        self._queue = Queue(redis, keys, consumer.encode(), lease_ms, max_deliveries, caps)
        acks = ReplicaAcks(
            redis, replicas=replicas, timeout_ms=replica_ack_timeout_ms, cluster=cluster
        )
        self._transitions = Transitions(redis, keys, int(retention_s * 1000), acks)
        self._creation = Creation(
            redis, keys, self._queue, self._transitions, acks, ordered=not cluster
        )
        self._slots = Slots(redis, keys, lease_ms)
        self._ordered = not cluster  # one node: a pipeline runs in order, keys in any slot
        self._wakeups = Wakeups(redis, keys.wake)
        self._held: dict[str, _Held] = {}  # the tasks this worker runs
        # When the queue was last found empty, and the wake-ups missed then (`_next`).
        self._empty: tuple[float, int] | None = None
        self._waiting = Waiting(redis, keys, self._transitions, self._wakeups)
        # redis-py's cluster client, first used by many calls at once, can fail them with
        # connection errors: it learns the cluster once, before any call (`store_call`).
        self.ready = not cluster
        self._getting_ready = asyncio.Lock()

    async def get_ready(self) -> None:
        async with self._getting_ready:
            if not self.ready:
                await self._redis.initialize()
                self.ready = True

    @store_call
    async def create(
        self, record: TaskRecord, job: Job, retention_s: float | None = None, *, here: bool = False
    ) -> None:
        await self._create(record, job, retention_s, None, here)

    @store_call
    async def find_or_create(
        self,
        record: TaskRecord,
        job: Job,
        retention_s: float | None,
        once: OnceName,
        *,
        here: bool = False,
    ) -> str | None:
        return await self._create(record, job, retention_s, once, here)

    async def _create(
        self,
        record: TaskRecord,
        job: Job,
        retention_s: float | None,
        once: OnceName | None,
        here: bool,
    ) -> str | None:
        retention_ms = None if retention_s is None else int(retention_s * 1000)
        mark = self._wakeups.mark()
        if self._ordered and once is None and not here:
            await self._open(record, job, retention_ms, mark)
            return None
        # A worker of this replica idle: it takes the task, and no other replica is woken.
        announce = not (here or self._wakeups.idle_here())
        found = await self._creation.create(record, job, retention_ms, once, here, announce)
        if found is None and not (here or announce or self._wakeups.wake_here()):
            await self._queue.announce()  # it found work meanwhile
        if found is None:
            self._waiting.expect(record.task.id, record.task.status, mark)
            if here:
                self._held[record.task.id] = _Held(b"", [], record, [])
        return found

    async def _open(
        self, record: TaskRecord, job: Job, retention_ms: int | None, mark: int | None
    ) -> None:
        """A new task on a standalone Redis, in one round trip (`open.lua`): given at once to
        an idle worker of this replica, set aside for it, when nothing waits ahead of it and
        its slots are free (no take, no start); else queued."""
        task_id, limits = record.task.id, job.limits
        aside = self._wakeups.set_aside()
        slots = self._slots.keys(limits)
        try:
            started = await self._creation.open(
                record, job, retention_ms, aside is not None, (slots, self._slots.take_args(limits))
            )
        except BaseException:
            if aside is not None:
                self._wakeups.give(aside, None)
            raise
        if not started:
            self._waiting.expect(task_id, "queued", mark)
            if aside is not None:
                self._wakeups.give(aside, None)  # it looks at the queue
            return
        running = msgspec.structs.replace(with_status(record, "in_progress"), attempt=1)
        self._held[task_id] = _Held(b"", slots, running, limits)
        self._waiting.expect(task_id, "in_progress", mark)
        assert aside is not None
        if not self._wakeups.give(aside, Claim(running, job)):
            await self.release(task_id, handover=True)  # its worker went: another takes over

    @store_call
    async def get(self, task_id: str) -> TaskRecord | None:
        return await self._transitions.read(task_id)

    @store_call
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
            raise_if_cancelled_since(seen)
            if isinstance(entry, Claim):  # started for this worker (`_open`)
                return entry
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
        if look or empty is None or empty[1] != missed or empty[0] < time.monotonic() - _QUIET_S:
            try:
                entry = await self._queue.take()
            except BaseException:
                self._wakeups.pass_on(woken)  # a wake-up it took must reach a worker that waits
                raise
            self._empty = (time.monotonic(), missed) if entry is None or entry.left == 0 else None
            if entry is not None:
                self._wakeups.pass_on(woken)
                return entry
        return await self._wakeups.wait(woken, timeout_s)

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
        if slots is None or started == FULL:  # a slot it needs is full: it waits again, queued
            if read is not None or (read := await self._read(entry)) is not None:
                await self._queue.put_back(entry, read[0].owner, len(read[1].body), limits)
                await asyncio.sleep(DEFER_PAUSE_S)
            return None
        if started is None:  # ended, gone, or a duplicate entry of a running task
            async with self._redis.pipeline(transaction=False) as pipe:
                if not together:
                    self._slots.release_call(pipe, task_id, slots)
                self._queue.done_call(pipe, entry.id)
                await pipe.execute()
            return None
        self._waiting.expect(task_id, "in_progress", mark)
        self._held[task_id] = _Held(entry.id, slots, started[0], limits)
        return Claim(*started)

    async def _read(self, entry: Entry) -> tuple[TaskRecord, Job] | None:
        """The entry's task and job as they stand; None (and the entry done) if it ended."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hmget(*self._transitions.read_call(entry.task_id))
            pipe.get(self._keys.job(entry.task_id))
            fields, job_raw = await pipe.execute()
        record = decode(fields)
        if record is None or job_raw is None or record.task.status in TERMINAL:
            await self._queue.done(entry.id)  # cancelled or expired
            return None
        return record, _job(job_raw)

    @store_call
    async def renew(self, task_id: str) -> None:
        held = self._held.get(task_id)
        if held is None:
            return
        if held.entry_id:
            await self._queue.keep(held.entry_id)
        else:
            await self._queue.keep_here(task_id)
        await self._slots.renew(task_id, held.slots)

    @store_call
    async def release(self, task_id: str, *, handover: bool) -> None:
        held = self._held.pop(task_id, None)
        self._waiting.hand(task_id, None)
        if held is None or held.ended:
            return
        await self._slots.release(task_id, held.slots)
        if not held.entry_id:
            await self._queue.let_go_here(task_id, handover)
        elif handover:  # the task is in progress: its fresh entry says it may be taken over
            await self._queue.hand_over(held.entry_id, task_id, held.limits)

    @store_call
    async def finish(
        self,
        task_id: str,
        attempt: int,
        response: StoredResponse,
        error: TaskError | None = None,
        *,
        keep_name: bool = True,
    ) -> Task | None:
        held = self._held.get(task_id)
        record = held.record if held is not None else await self._transitions.read(task_id)
        if record is None:
            return None
        status: Status = "completed" if error is None else "failed"
        # On a standalone Redis what the run holds goes with its end, in `end.lua`.
        together = held is not None and self._ordered
        let_go = self._queue.let_go(held.entry_id, held.slots) if together and held else ([], [])
        ended = await self._transitions.end(record, attempt, status, response, error, let_go)
        if ended is None:
            return None  # fenced out or cancelled: the name still finds the run that counts
        if not keep_name and record.once is not None:
            await self._creation.forget_name(record.once)
        task, entry_id = ended
        if held is not None and together:
            held.ended = True  # release has nothing left to send
        else:
            await self._let_go_after(task_id, entry_id, held)
        self._waiting.hand(task_id, (task, response))
        return task

    async def _let_go_after(self, task_id: str, entry_id: bytes, held: _Held | None) -> None:
        """What the run that ended the task held, after its end (a Redis Cluster). Only that
        run acknowledges an entry, its own: a worker fenced out by a takeover must not touch
        the entry the new run holds."""
        slots = held.slots if held is not None and held.entry_id == entry_id else []
        if entry_id or slots:
            async with self._redis.pipeline(transaction=False) as pipe:
                if entry_id:
                    self._queue.done_call(pipe, entry_id)
                self._slots.release_call(pipe, task_id, slots)
                await pipe.execute()
            if held is not None and slots:
                held.slots = []

    @store_call
    async def cancel(self, task_id: str) -> Task | None:
        record = await self._transitions.read(task_id)
        if record is None or record.task.status in TERMINAL:
            return None if record is None else record.task
        ended = await self._transitions.end(record, None, "cancelled")
        if ended is None:  # it ended meanwhile
            record = await self._transitions.read(task_id)
            return None if record is None else record.task
        task, entry_id = ended
        if entry_id:  # its worker is told by the event; its queue entry is done now
            await self._queue.done(entry_id)
        elif record.task.status == "queued":
            await self._queue.unqueue(task_id)  # no longer counts against its caller's caps
        return task

    @store_call
    async def answered(self, task_id: str) -> tuple[TaskRecord, StoredResponse | None] | None:
        return await self._waiting.answered(task_id)

    @store_call
    async def events(self, task_id: str, after: str | None, timeout_s: float) -> list[TaskEvent]:
        if after is not None and not (after.isdecimal() and is_event_id(after)):
            raise ValueError(f"not an event id: {after!r}")
        seen = cancel_requests()
        async with self._wakeups.watch(task_id) as watch:
            events, status = await self._transitions.events(task_id, after)
            if events or timeout_s <= 0:
                return events
            if status is None or status in TERMINAL:
                return events
            # Waiting after a swallowed cancel would hold the canceller for the whole timeout.
            raise_if_cancelled_since(seen)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await watch.next()
        events, _ = await self._transitions.events(task_id, after)
        return events

    @store_call
    async def outcome(self, task_id: str, timeout_s: float) -> Outcome | None:
        return await self._waiting.outcome(task_id, timeout_s, running_here=self._held)

    @store_call
    async def ended(self, task_id: str, timeout_s: float) -> Status | None:
        return await self._waiting.ended(task_id, timeout_s)

    @store_call
    async def queue_depth(self) -> int:
        return await self._queue.depth()

    @store_call
    async def owner_key(self) -> bytes:
        # Made once by whichever replica starts first; every replica then hashes alike.
        await self._redis.set(self._keys.owner_key, secrets.token_bytes(32), nx=True)
        value: bytes = await self._redis.get(self._keys.owner_key)
        return value

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except RedisError:
            return False

    async def close(self) -> None:
        await self._wakeups.close()
        await self._redis.aclose()
