"""The Redis task store, the only module that talks to Redis.

- The queue is a stream with a consumer group: an entry stays pending until its task ends, so
  a worker that dies leaves it to be claimed again (XAUTOCLAIM) once its lease lapses.
- Each task has a hash (status, attempt, the record), its job, its result and an event stream
  whose entry ids are the SSE ids; all share the task's hash tag, so every transition is one Lua
  script on one Redis Cluster slot: status and event change together or not at all.
- The attempt number fences stale workers: a finish counts only for the current attempt.
- Pub/sub carries wake-ups only; the event stream is the record.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from importlib import resources
from typing import Any, ParamSpec, TypeVar

import msgspec
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.errors import StoreUnavailable
from gateway.tasks.models import (
    DEFER_PAUSE_S,
    TERMINAL,
    Claim,
    Job,
    Status,
    StoredResponse,
    Task,
    TaskError,
    TaskEvent,
    TaskRecord,
    is_event_id,
)

logger = logging.getLogger(__name__)

_GROUP = b"workers"
_pack = msgspec.msgpack.Encoder().encode
_task_json = msgspec.json.Encoder().encode
_record = msgspec.msgpack.Decoder(TaskRecord).decode
_job = msgspec.msgpack.Decoder(Job).decode
_response = msgspec.msgpack.Decoder(StoredResponse).decode
_task = msgspec.json.Decoder(Task).decode


def _script(name: str) -> str:
    """A Lua transition from `tasks/lua/`, read once at import: each names its KEYS and ARGV."""
    return resources.files("gateway.tasks").joinpath("lua", f"{name}.lua").read_text()


_CREATE, _START, _END, _ACQUIRE, _RENEW_SLOTS = (
    _script(name) for name in ("create", "start", "end", "acquire", "renew_slots")
)


def _stream_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq)


class _Held(msgspec.Struct):
    """What this worker holds for a task it runs: its queue entry and its slot keys."""

    entry_id: bytes
    slots: list[str]


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _store_call(
    method: Callable[_P, Coroutine[Any, Any, _R]],
) -> Callable[_P, Coroutine[Any, Any, _R]]:
    """Every public store method: Redis being unreachable is one clear 503 for callers, and a
    cancellation is never lost. redis-py can swallow a CancelledError that lands mid-command
    (redis/redis-py#2028, #2551); a worker or SSE stream would then outlive its shutdown."""

    op = method.__name__

    @functools.wraps(method)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        task = asyncio.current_task()
        cancels = task.cancelling() if task is not None else 0
        observe = args[0].observe if args and isinstance(args[0], RedisStore) else None
        started = time.monotonic()
        try:
            result = await method(*args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            if observe is not None:
                observe(op, time.monotonic() - started, False)
            raise StoreUnavailable() from exc
        if observe is not None:
            observe(op, time.monotonic() - started, True)
        if task is not None and task.cancelling() > cancels:
            raise asyncio.CancelledError()
        return result

    return wrapper


class RedisStore:
    def __init__(
        self,
        redis: Redis,
        *,
        consumer: str,
        retention_s: float,
        prefix: str = "gw",
        lease_s: float = 30.0,
        max_deliveries: int = 3,
        observe: Callable[[str, float, bool], None] | None = None,
    ) -> None:
        # redis-py types its replies as unions over decode_responses; this store always works
        # in bytes, so the client is used untyped rather than narrowed at every call.
        self._redis: Any = redis
        self._consumer = consumer.encode()
        self._ttl_ms = int(retention_s * 1000)
        self._prefix = prefix
        self._lease_ms = int(lease_s * 1000)
        self._max_deliveries = max_deliveries
        self._queue = f"{prefix}:{{queue}}"
        self._channel = f"{prefix}:wake"
        self._create = redis.register_script(_CREATE)
        self._start = redis.register_script(_START)
        self._end = redis.register_script(_END)
        self._acquire = redis.register_script(_ACQUIRE)
        self._renew_slots = redis.register_script(_RENEW_SLOTS)
        self._held: dict[str, _Held] = {}  # the tasks this worker runs
        # Told of every store call (operation, seconds, whether Redis was reached): metrics.
        self.observe = observe
        self._next_reclaim = 0.0
        self._reclaim_from: bytes | str = "0-0"
        self._wakers: dict[str, asyncio.Event] = {}
        self._listener: asyncio.Task[None] | None = None
        self._group_ready = False

    def _key(self, task_id: str, kind: str) -> str:
        return f"{self._prefix}:{{{task_id}}}:{kind}"

    def _slot(self, name: str) -> str:
        return f"{self._prefix}:{{slots}}:{name}"

    @_store_call
    async def create(self, record: TaskRecord, job: Job, retention_s: float | None = None) -> None:
        task_id = record.task.id
        keys = [self._key(task_id, k) for k in ("task", "job", "events")]
        event = _task_json(record.task)
        ttl_ms = self._ttl_ms if retention_s is None else int(retention_s * 1000)
        args: list[bytes | int] = [_pack(record), _pack(job), event, ttl_ms]
        # One round trip (a Script object in a pipeline would add a SCRIPT EXISTS first). The
        # queue is another slot in a cluster, so it is not in the script: should the script
        # fail, the entry finds no task and the first claim drops it.
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.evalsha(self._create.sha, len(keys), *keys, *args)
            pipe.xadd(self._queue, {b"task": task_id.encode()})
            created, queued = await pipe.execute(raise_on_error=False)
        if isinstance(queued, Exception):
            raise queued
        if isinstance(created, NoScriptError):
            # A restarted Redis forgot its scripts. The entry queued above may already have
            # been dropped for want of a task, so queue another: a duplicate never runs twice.
            await self._create(keys=keys, args=args)
            await self._redis.xadd(self._queue, {b"task": task_id.encode()})
        elif isinstance(created, Exception):
            raise created

    @_store_call
    async def remember(self, name: str, value: str, ttl_s: float, *, replace: bool) -> str | None:
        old = await self._redis.set(
            f"{self._prefix}:{{once:{name}}}",
            value,
            px=max(int(ttl_s * 1000), 1),
            nx=not replace,
            get=True,
        )
        return None if old is None else bytes(old).decode()

    @_store_call
    async def get(self, task_id: str) -> TaskRecord | None:
        raw = await self._redis.hget(self._key(task_id, "task"), "record")
        return None if raw is None else _record(raw)

    @_store_call
    async def claim(self, timeout_s: float) -> Claim | None:
        await self._ensure_group()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (left := deadline - loop.time()) > 0:
            try:
                reclaimed = await self._reclaim()
                entry = reclaimed or await self._next(left)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                self._group_ready = False  # Redis lost its data: make the group again
                return None
            if entry is None:
                return None
            entry_id, fields = entry
            takeover = reclaimed is not None or fields.get(b"takeover") == b"1"
            claim = await self._start_task(entry_id, fields[b"task"].decode(), takeover)
            if claim is not None:
                return claim  # else cancelled, expired or deferred: take the next one
        return None

    async def _next(self, timeout_s: float) -> Any:
        got = await self._redis.xreadgroup(
            _GROUP, self._consumer, {self._queue: ">"}, count=1, block=max(1, int(timeout_s * 1000))
        )
        return got[0][1][0] if got else None

    async def _reclaim(self) -> Any:
        """A task whose worker stopped renewing its lease (killed, most likely). Looked for a
        few times per lease by one of this replica's workers, not on every claim."""
        now = asyncio.get_running_loop().time()
        if now < self._next_reclaim:
            return None
        # XAUTOCLAIM looks at a few pending entries per call (COUNT x 10) and says where to go
        # on: the scan must follow that cursor, or a lost task behind ten healthy ones is never
        # found. A scan that reached the end starts over after a pause.
        cursor, entries, _ = await self._redis.xautoclaim(
            self._queue, _GROUP, self._consumer, self._lease_ms, self._reclaim_from, count=1
        )
        self._reclaim_from = cursor
        if cursor in (b"0-0", "0-0"):
            self._next_reclaim = now + self._lease_ms / 1000 / 4
        if not entries:
            return None
        entry_id, fields = entries[0]
        pending = await self._redis.xpending_range(
            self._queue, _GROUP, min=entry_id, max=entry_id, count=1
        )
        if pending and pending[0]["times_delivered"] > self._max_deliveries:
            task_id = fields[b"task"].decode()
            logger.warning("%s failed: worker lost %d times", task_id, self._max_deliveries)
            error = TaskError(
                "The task's worker was lost too many times.", "server_error", "worker_lost"
            )
            await self._finish(task_id, "", "failed", None, error)
            await self._done(entry_id)
            return None
        return entries[0]

    async def _start_task(self, entry_id: bytes, task_id: str, takeover: bool) -> Claim | None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hget(self._key(task_id, "task"), "record")
            pipe.get(self._key(task_id, "job"))
            record_raw, job_raw = await pipe.execute()
        record = None if record_raw is None else _record(record_raw)
        if record is None or job_raw is None or record.task.status in TERMINAL:
            await self._done(entry_id)  # cancelled or expired
            return None
        job = _job(job_raw)
        slots = [self._slot(name) for name, _ in job.limits]
        limits = [limit for _, limit in job.limits]
        if slots and not await self._acquire(keys=slots, args=[task_id, self._lease_ms, *limits]):
            await self._defer(entry_id, task_id, takeover)
            return None
        started = msgspec.structs.replace(
            record,
            task=msgspec.structs.replace(record.task, status="in_progress"),
            attempt=record.attempt + 1,
        )
        event = await self._start(
            keys=[self._key(task_id, "task"), self._key(task_id, "events")],
            args=[
                record.attempt,
                started.attempt,
                _pack(started),
                _task_json(started.task),
                "1" if takeover else "0",
                self._channel,
                task_id,
            ],
        )
        self._held[task_id] = _Held(entry_id, slots)
        if not event:
            # Another worker got there first, or a duplicate entry of a running task.
            await self.release(task_id, handover=False)
            await self._done(entry_id)
            return None
        return Claim(started, job)

    async def _done(self, entry_id: bytes) -> None:
        """The entry's task needs no worker any more: off the pending list and the stream, so the
        queue holds only what is waiting or running."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.xack(self._queue, _GROUP, entry_id)
            pipe.xdel(self._queue, entry_id)
            await pipe.execute()

    async def _defer(self, entry_id: bytes, task_id: str, takeover: bool) -> None:
        """A slot the task needs is full: it goes back to the queue's tail, still queued."""
        await self._requeue(entry_id, task_id, takeover)
        await asyncio.sleep(DEFER_PAUSE_S)

    async def _requeue(self, entry_id: bytes, task_id: str, takeover: bool) -> None:
        fields = {b"task": task_id.encode(), b"takeover": b"1" if takeover else b"0"}
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self._queue, fields)
            pipe.xack(self._queue, _GROUP, entry_id)
            pipe.xdel(self._queue, entry_id)
            await pipe.execute()

    @_store_call
    async def renew(self, task_id: str) -> None:
        """Keep this worker's lease on a running task (XCLAIM to itself resets the idle time)."""
        held = self._held.get(task_id)
        if held is not None:
            await self._redis.xclaim(
                self._queue, _GROUP, self._consumer, 0, [held.entry_id], justid=True
            )
            if held.slots:
                await self._renew_slots(keys=held.slots, args=[task_id, self._lease_ms])

    @_store_call
    async def release(self, task_id: str, *, handover: bool) -> None:
        held = self._held.pop(task_id, None)
        if held is None:
            return
        if held.slots:
            async with self._redis.pipeline(transaction=False) as pipe:
                for slot in held.slots:
                    pipe.zrem(slot, task_id)
                await pipe.execute()
        if handover:
            # A fresh entry wakes a waiting worker now; the task is in progress, so the entry
            # says it may be taken over.
            await self._requeue(held.entry_id, task_id, takeover=True)

    @_store_call
    async def finish(
        self,
        task_id: str,
        attempt: int,
        status: Status,
        *,
        response: StoredResponse | None = None,
        error: TaskError | None = None,
    ) -> Task | None:
        task = await self._finish(task_id, str(attempt), status, response, error)
        held = self._held.get(task_id)
        # Only the run that ended the task acknowledges its entry: a worker fenced out by a
        # takeover must not touch the entry the new run now holds, or a later loss of that run
        # would leave the task with nothing to reclaim.
        if held is not None and task is not None:
            await self._done(held.entry_id)
        return task

    async def _finish(
        self,
        task_id: str,
        attempt: str,
        status: Status,
        response: StoredResponse | None,
        error: TaskError | None,
    ) -> Task | None:
        record = await self.get(task_id)
        if record is None:
            return None
        ended = msgspec.structs.replace(
            record, task=msgspec.structs.replace(record.task, status=status, error=error)
        )
        keys = [self._key(task_id, k) for k in ("task", "job", "result", "events")]
        args: list[bytes | str] = [
            attempt,
            status,
            _pack(ended),
            _task_json(ended.task),
            b"" if response is None else _pack(response),
            self._channel,
            task_id,
        ]
        if not await self._end(keys=keys, args=args):
            return None
        return ended.task

    @_store_call
    async def cancel(self, task_id: str) -> Task | None:
        cancelled = await self._finish(task_id, "", "cancelled", None, None)
        if cancelled is not None:
            return cancelled
        record = await self.get(task_id)
        return None if record is None else record.task

    @_store_call
    async def result(self, task_id: str) -> StoredResponse | None:
        raw = await self._redis.get(self._key(task_id, "result"))
        return None if raw is None else _response(raw)

    @_store_call
    async def events(self, task_id: str, after: str | None, timeout_s: float) -> list[TaskEvent]:
        if after is not None and not ("-" in after and is_event_id(after)):
            raise ValueError(f"not an event id: {after!r}")
        task = asyncio.current_task()
        cancels = task.cancelling() if task is not None else 0
        await self._listen()
        waker = self._wakers.setdefault(task_id, asyncio.Event())
        events = await self._read_events(task_id, after)
        if events or timeout_s <= 0:
            return events
        record = await self.get(task_id)
        if record is None or record.task.status in TERMINAL:
            return events
        if task is not None and task.cancelling() > cancels:
            # Cancelled during a round trip above, and redis-py swallowed it: waiting now would
            # hold the canceller (a worker finishing its task) for the whole timeout.
            raise asyncio.CancelledError()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await waker.wait()
        return await self._read_events(task_id, after)

    async def _read_events(self, task_id: str, after: str | None) -> list[TaskEvent]:
        key = self._key(task_id, "events")
        try:
            entries = await self._redis.xrange(key, min="-" if after is None else f"({after}")
        except ResponseError as exc:  # an id Redis will not read from is no id of this task
            raise ValueError(f"not an event id: {after!r}") from exc
        if not entries and after is not None:
            last = await self._redis.xrevrange(key, count=1)
            if not last or _stream_id(after) > _stream_id(last[0][0].decode()):
                raise ValueError(f"not an event id: {after!r}")
        return [
            TaskEvent(entry_id.decode(), _task(fields[b"task"])) for entry_id, fields in entries
        ]

    async def _listen(self) -> None:
        if self._listener is None or self._listener.done():  # none yet, or lost with Redis
            pubsub = self._redis.pubsub()
            await pubsub.subscribe(self._channel)
            self._listener = asyncio.create_task(self._dispatch(pubsub))

    async def _dispatch(self, pubsub: Any) -> None:
        try:
            async for message in pubsub.listen():
                if message["type"] != "message":
                    continue
                waker = self._wakers.pop(message["data"].decode(), None)
                if waker is not None:
                    waker.set()
        except RedisError:
            logger.warning("task wake-ups lost with Redis; resubscribing on next use")
        finally:
            # Whoever waits for a wake-up re-reads now instead of missing one.
            for waker in self._wakers.values():
                waker.set()
            self._wakers.clear()
            with contextlib.suppress(RedisError):
                await pubsub.aclose()

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            await self._redis.xgroup_create(self._queue, _GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    @_store_call
    async def queue_depth(self) -> int:
        await self._ensure_group()
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.xlen(self._queue)
            pipe.xpending(self._queue, _GROUP)
            length, pending = await pipe.execute()
        return max(int(length) - int(pending["pending"]), 0)  # pending: claimed, running

    @_store_call
    async def owner_key(self) -> bytes:
        # Made once by whichever replica starts first; every replica then hashes alike.
        key = f"{self._prefix}:owner-key"
        await self._redis.set(key, secrets.token_bytes(32), nx=True)
        value: bytes = await self._redis.get(key)
        return value

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except RedisError:
            return False

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        await self._redis.aclose()
