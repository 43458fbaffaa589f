"""A task's state in Redis and the three Lua scripts that change it (create, start, end).

Each script changes the status and appends the event together, or does nothing, on the task's
one slot. The status lives once, in the task hash's `status` field; `record` is the task as it
was created, so no change rewrites it and ending a task needs no read first.
"""

from __future__ import annotations

from typing import Any, Literal, cast

import msgspec

from gateway.tasks.models import (
    Job,
    Status,
    StoredResponse,
    Task,
    TaskError,
    TaskEvent,
    TaskRecord,
)
from gateway.tasks.redis.keys import Keys
from gateway.tasks.redis.outbox import RedisOutbox
from gateway.tasks.redis.replicas import ReplicaAcks
from gateway.tasks.redis.scripts import script

pack = msgspec.msgpack.Encoder().encode
_task_json = msgspec.json.Encoder().encode
_record = msgspec.msgpack.Decoder(TaskRecord).decode
_error = msgspec.msgpack.Decoder(TaskError).decode
_task = msgspec.json.Decoder(Task).decode
unpack_job = msgspec.msgpack.Decoder(Job).decode
_FIELDS = ("status", "attempt", "error", "record")


CREATE = script("task") + script("create")  # run fenced (`creation.py`)
_START = script("slots") + script("start")
_END = script("end")
FULL: Literal["full"] = "full"  # a start that found a concurrency slot full
OLDER: Literal["older"] = "older"  # a start of a task an older gateway made: pass `read`


def with_status(record: TaskRecord, status: Status, error: TaskError | None = None) -> TaskRecord:
    return msgspec.structs.replace(
        record, task=msgspec.structs.replace(record.task, status=status, error=error)
    )


class Transitions:
    def __init__(
        self, redis: Any, keys: Keys, ttl_ms: int, acks: ReplicaAcks, outbox: RedisOutbox
    ) -> None:
        self._redis = redis
        self._outbox = outbox
        self._acks = acks
        self._keys = keys
        self._ttl_ms = ttl_ms
        self._start = redis.register_script(_START)
        self._end = redis.register_script(_END)

    def create_call(
        self, record: TaskRecord, job: Job, ttl_ms: int | None
    ) -> tuple[list[str], list[bytes | int | str]]:
        """The create script's keys and arguments (also every key a new task has), for a
        pipeline's EVALSHA."""
        task_id = record.task.id
        keys = [self._keys.task(task_id), self._keys.job(task_id), self._keys.events(task_id)]
        ttl = self._ttl_ms if ttl_ms is None else ttl_ms
        status, attempt = record.task.status, record.attempt
        started = _task_json(with_status(record, "in_progress").task)  # the event its start adds
        args: list[bytes | int | str] = [pack(record), pack(job), _task_json(record.task), ttl]
        return keys, [*args, status, attempt, started]

    def read_call(self, task_id: str) -> tuple[str, ...]:
        """HMGET's arguments for `decode`."""
        return self._keys.task(task_id), *_FIELDS

    async def read(self, task_id: str) -> TaskRecord | None:
        return decode(await self._redis.hmget(*self.read_call(task_id)))

    async def read_with(self, task_id: str, key: str) -> tuple[TaskRecord | None, bytes | None]:
        """The task and another of its keys (its job, its result), in one round trip."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hmget(*self.read_call(task_id))
            pipe.get(key)
            fields, raw = await pipe.execute()
        return decode(fields), raw

    async def status(self, task_id: str) -> Status | None:
        status = await self._redis.hget(self._keys.task(task_id), "status")
        return None if status is None else cast(Status, status.decode())

    async def start(
        self,
        task_id: str,
        entry_id: bytes,
        takeover: bool,
        read: TaskRecord | None = None,
        slots: tuple[list[str], list[int]] = ([], []),
    ) -> tuple[TaskRecord, Job] | Literal["full", "older"] | None:
        """The task in progress with a new attempt, and its job; None if it is not this run's
        to start (ended, gone, or another run's). `read`: the task as this worker read it
        before, started only if no other run came between. `slots`: the keys and `take_args`
        of concurrency slots to take with the start (a standalone Redis); FULL if one is.
        OLDER: the task keeps no start event (an older gateway made it); start it with `read`."""
        event = b"" if read is None else _task_json(with_status(read, "in_progress").task)
        keys = [self._keys.task(task_id), self._keys.events(task_id), self._keys.job(task_id)]
        got = await self._start(
            keys=[*keys, *slots[0]],
            args=[
                "" if read is None else read.attempt,
                event,
                "1" if takeover else "0",
                entry_id,
                self._keys.wake,
                task_id,
                *slots[1],
            ],
        )
        if got == 0:  # not None: Lua's false
            return FULL
        if got == -1:
            return OLDER
        if not got:
            return None
        attempt, record, job = got
        started = with_status(_record(record), "in_progress")
        return msgspec.structs.replace(started, attempt=int(attempt)), unpack_job(job)

    async def end(
        self,
        record: TaskRecord,
        attempt: int | None,
        status: Status,
        response: StoredResponse | None = None,
        error: TaskError | None = None,
        let_go: tuple[list[str], list[Any]] = ([], []),
    ) -> tuple[Task, bytes] | None:
        """End the task, only if `attempt` (None: any) runs it and it has not ended: the task
        as it ended and the queue entry of the run that held it (b"" if none), else None.
        `let_go`: the keys and arguments (`Queue.let_go`) of what the run holds, to let go of
        once the task has ended (a standalone Redis)."""
        ended = with_status(record, status, error).task
        task_id = ended.id
        keys = [self._keys.task(task_id), self._keys.job(task_id)]
        keys += [self._keys.result(task_id), self._keys.events(task_id), *let_go[0]]
        done = await self._acks.run(
            self._end,
            keys,
            args=[
                "" if attempt is None else str(attempt),
                status,
                b"" if error is None else pack(error),
                _task_json(ended),
                b"" if response is None else pack(response),
                "" if self._acks.waits else self._keys.wake,
                task_id,
                *let_go[1],
            ],
            announce=(self._keys.wake, f"{task_id} {status}", status),
        )
        if not done:
            return None
        if record.announce:  # whatever ended it: its announcement is due now
            await self._outbox.nudge(task_id)
        return ended, bytes(done[1])

    async def events(
        self, task_id: str, after: str | None
    ) -> tuple[list[TaskEvent], Status | None]:
        """The task's events after the `after`-th (all when None), and its status, in one
        round trip. A list, not a stream: a few hundred bytes a task where a stream's first
        node alone takes 4 KB."""
        key = self._keys.events(task_id)
        seen = 0 if after is None else int(after)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.lrange(key, seen, -1)
            pipe.llen(key)
            pipe.hget(self._keys.task(task_id), "status")
            entries, length, status = await pipe.execute()
        if not entries and seen and seen > length:
            raise ValueError(f"not an event id: {after!r}")
        events = [TaskEvent(str(seen + i + 1), _task(entry)) for i, entry in enumerate(entries)]
        return events, None if status is None else cast(Status, status.decode())


def decode(fields: list[bytes | None]) -> TaskRecord | None:
    """A task from its hash fields (`read_call`'s HMGET)."""
    status, attempt, error, raw = fields
    if raw is None or status is None:
        return None
    created = _record(raw)
    task = msgspec.structs.replace(
        created.task,
        status=cast(Status, status.decode()),
        error=None if error is None else _error(error),
    )
    return msgspec.structs.replace(created, task=task, attempt=int(attempt or 0))
