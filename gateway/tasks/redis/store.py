"""The Redis task store: the `TaskStore` contract over the creation, the queue, the transitions,
the slots and the wake-ups. Any replica sharing the Redis can serve any task."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
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
from gateway.tasks.redis.queue import Entry, Queue
from gateway.tasks.redis.replicas import ReplicaAcks
from gateway.tasks.redis.slots import Slots
from gateway.tasks.redis.transitions import Transitions, decode
from gateway.tasks.redis.waiting import Outcome, Waiting
from gateway.tasks.redis.wakeups import Wakeups

logger = logging.getLogger(__name__)

_job = msgspec.msgpack.Decoder(Job).decode
_response = msgspec.msgpack.Decoder(StoredResponse).decode


class _Held(msgspec.Struct):
    """What this worker holds for a task it runs."""

    entry_id: bytes  # b"" for a task run here: it has no queue entry while it runs
    slots: list[str]
    record: TaskRecord  # as it started: what its end event is made from


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
        self._wakeups = Wakeups(redis, keys.wake)
        self._held: dict[str, _Held] = {}  # the tasks this worker runs
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
        found = await self._creation.create(record, job, retention_ms, once, here)
        if found is None and here:
            self._held[record.task.id] = _Held(b"", [], record)
        return found

    @store_call
    async def get(self, task_id: str) -> TaskRecord | None:
        return await self._transitions.read(task_id)

    @store_call
    async def claim(self, timeout_s: float) -> Claim | None:
        await self._queue.ensure_group()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (left := deadline - loop.time()) > 0:
            seen = cancel_requests()
            try:
                entry = await self._next(left)
            except ResponseError as exc:
                if not self._queue.lost_group(exc):
                    raise
                return None
            raise_if_cancelled_since(seen)
            if entry is not None and (claim := await self._start(entry)) is not None:
                return claim  # else cancelled, expired or deferred: take the next one
        return None

    async def _next(self, timeout_s: float) -> Entry | None:
        """The next entry to run, waiting up to `timeout_s` for a wake-up if none is there."""
        if (reclaimed := await self._reclaim()) is not None:
            return reclaimed
        woken = await self._wakeups.worker_waiter()
        try:
            entry = await self._queue.take()
        except BaseException:
            self._wakeups.pass_on(woken)  # a wake-up it took must reach a worker that waits
            raise
        if entry is not None:
            self._wakeups.pass_on(woken)
            return entry
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await woken
        return None

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
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hmget(*self._transitions.read_call(entry.task_id))
            pipe.get(self._keys.job(entry.task_id))
            fields, job_raw = await pipe.execute()
        record = decode(fields)
        if record is None or job_raw is None or record.task.status in TERMINAL:
            await self._queue.done(entry.id)  # cancelled or expired
            return None
        job = _job(job_raw)
        slots = await self._slots.acquire(entry.task_id, job.limits)
        if slots is None:  # a slot it needs is full: it waits again, still queued
            await self._queue.put_back(entry, record.owner, len(job.body))
            await asyncio.sleep(DEFER_PAUSE_S)
            return None
        started = await self._transitions.start(record, entry.id, entry.takeover)
        if started is None:
            # Another worker got there first, or a duplicate entry of a running task.
            await self._slots.release(entry.task_id, slots)
            await self._queue.done(entry.id)
            return None
        self._held[entry.task_id] = _Held(entry.id, slots, started)
        return Claim(started, job)

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
        if held is None:
            return
        await self._slots.release(task_id, held.slots)
        if not held.entry_id:
            await self._queue.let_go_here(task_id, handover)
        elif handover:  # the task is in progress: its fresh entry says it may be taken over
            await self._queue.hand_over(held.entry_id, task_id)

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
        ended = await self._transitions.end(record, attempt, status, response, error)
        if ended is None:
            return None  # fenced out or cancelled: the name still finds the run that counts
        if not keep_name and record.once is not None:
            await self._creation.forget_name(record.once)
        task, entry_id = ended
        # Only the run that ended the task acknowledges an entry, its own: a worker fenced out
        # by a takeover must not touch the entry the new run holds. Its slots go in the same
        # round trip (release then has nothing left to send).
        slots = held.slots if held is not None and held.entry_id == entry_id else []
        if entry_id or slots:
            async with self._redis.pipeline(transaction=False) as pipe:
                if entry_id:
                    self._queue.done_call(pipe, entry_id)
                self._slots.release_call(pipe, task_id, slots)
                await pipe.execute()
            if held is not None and slots:
                held.slots = []
        self._waiting.hand(task_id, (task, response))
        return task

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
    async def result(self, task_id: str) -> StoredResponse | None:
        raw = await self._redis.get(self._keys.result(task_id))
        return None if raw is None else _response(raw)

    @store_call
    async def events(self, task_id: str, after: str | None, timeout_s: float) -> list[TaskEvent]:
        if after is not None and not (after.isdecimal() and is_event_id(after)):
            raise ValueError(f"not an event id: {after!r}")
        seen = cancel_requests()
        waiter = await self._wakeups.waiter(task_id)
        events, status = await self._transitions.events(task_id, after)
        if events or timeout_s <= 0:
            return events
        if status is None or status in TERMINAL:
            return events
        # Waiting after a swallowed cancel would hold the canceller for the whole timeout.
        raise_if_cancelled_since(seen)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await waiter.wait()
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
