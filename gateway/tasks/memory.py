"""The embedded task store: one process, nothing survives a restart, no setup."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import tempfile
import time
from typing import IO

import msgspec

from gateway.tasks.fair import FairQueue
from gateway.tasks.models import (
    DEFER_PAUSE_S,
    TERMINAL,
    Claim,
    Job,
    OnceName,
    QueueCaps,
    Status,
    StoredResponse,
    Task,
    TaskError,
    TaskEvent,
    TaskRecord,
)
from gateway.tasks.outbox import MemoryOutbox

# A queued job with a body larger than this waits on disk, not in the process heap; so does
# any job once queued jobs hold this much of the heap (a flood of small ones).
SPOOL_BYTES = 2**20
_HEAP_JOB_BYTES = 64 * 2**20
_pack_job = msgspec.msgpack.Encoder().encode
_unpack_job = msgspec.msgpack.Decoder(Job).decode


class _Entry:
    __slots__ = (
        "_job",
        "_spool",
        "changed",
        "events",
        "expires_at",
        "limits",
        "record",
        "response",
        "size",
    )

    def __init__(
        self, record: TaskRecord, job: Job | None, expires_at: float, *, spool: bool
    ) -> None:
        """`job` None: a task its caller's replica runs, which never reads it from here.
        `spool`: the job waits on disk."""
        self.record = record
        self._job = job
        self._spool: IO[bytes] | None = None
        # What a claim needs of a waiting job, without reading a spooled one back each turn.
        self.limits = [] if job is None else job.limits
        self.size = 0 if job is None else len(job.body)
        if job is not None and spool:
            # Open as long as the task waits; `drop_job` (or the entry going) closes it.
            self._spool = tempfile.TemporaryFile()  # noqa: SIM115
            self._spool.write(_pack_job(job))
            self._job = None
        self.response: StoredResponse | None = None
        self.events: list[TaskEvent] = []
        self.changed = asyncio.Event()
        self.expires_at = expires_at

    @property
    def heap_bytes(self) -> int:
        """What the job holds of the process heap."""
        return self.size if self._job is not None else 0

    @property
    def has_job(self) -> bool:
        return self._job is not None or self._spool is not None

    @property
    def job(self) -> Job | None:
        """The caller's request, until the task ends (read back from disk if it waits there)."""
        if self._spool is None:
            return self._job
        self._spool.seek(0)
        return _unpack_job(self._spool.read())

    def drop_job(self) -> None:
        """The caller's credential and body go with the task's end."""
        self._job = None
        if self._spool is not None:
            self._spool.close()
            self._spool = None


class MemoryStore:
    def __init__(
        self,
        retention_s: float,
        caps: QueueCaps = QueueCaps(),  # noqa: B008 (frozen)
    ) -> None:
        self._retention_s = retention_s
        self._entries: dict[str, _Entry] = {}
        self._queue = FairQueue(caps)
        self._heap_job_bytes = 0
        self._holders: dict[str, set[str]] = {}  # concurrency slot -> running task ids
        self._names: dict[str, tuple[str, float]] = {}  # remembered name -> (value, expiry)
        self._owner_key = secrets.token_bytes(32)  # tasks die with the process, so may the key
        self.outbox = MemoryOutbox()

    def _entry(self, task_id: str) -> _Entry | None:
        entry = self._entries.get(task_id)
        if entry is not None and entry.expires_at <= time.monotonic():
            self._drop_job(entry)
            del self._entries[task_id]
            return None
        return entry

    def _drop_job(self, entry: _Entry) -> None:
        self._heap_job_bytes -= entry.heap_bytes
        entry.drop_job()

    def _set(self, entry: _Entry, record: TaskRecord) -> None:
        """The one place a task changes: status and its event together, and readers woken."""
        entry.record = record
        entry.events.append(TaskEvent(str(len(entry.events) + 1), record.task))
        entry.changed.set()
        entry.changed = asyncio.Event()
        if record.announce and record.task.status in TERMINAL:
            self.outbox.nudge(record.task.id)

    async def create(
        self, record: TaskRecord, job: Job, retention_s: float | None = None, *, here: bool = False
    ) -> None:
        self._purge()
        if not here:  # else its caller's replica, this one, runs it
            self._queue.put(record.owner, record.task.id, len(job.body))  # or QueueFull
        if record.announce:
            self.outbox.expect(record.task.id)
        kept_s = self._retention_s if retention_s is None else retention_s
        size = len(job.body)
        spool = size > SPOOL_BYTES or self._heap_job_bytes + size > _HEAP_JOB_BYTES
        entry = _Entry(record, None if here else job, time.monotonic() + kept_s, spool=spool)
        self._heap_job_bytes += entry.heap_bytes
        self._entries[record.task.id] = entry
        self._set(entry, record)

    async def find_or_create(
        self,
        record: TaskRecord,
        job: Job,
        retention_s: float | None,
        once: OnceName,
        *,
        here: bool = False,
    ) -> str | None:
        now = time.monotonic()
        held = self._names.get(once.name)
        if held is not None and held[1] > now and not once.replace:
            return held[0]
        await self.create(record, job, retention_s, here=here)
        self._names[once.name] = (once.value, now + once.ttl_s)
        return None

    async def get(self, task_id: str) -> TaskRecord | None:
        entry = self._entry(task_id)
        return None if entry is None else entry.record

    async def claim(self, timeout_s: float) -> Claim | None:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if (turn := await self._queue.get(left)) is None:
                return None
            caller, task_id = turn
            entry = self._entry(task_id)
            if entry is None or not entry.has_job or entry.record.task.status != "queued":
                continue  # cancelled or expired while queued
            if not self._acquire(task_id, entry.limits):
                # Stays queued, at the end of its caller's line.
                self._queue.put(caller, task_id, entry.size, check=False)
                await asyncio.sleep(min(DEFER_PAUSE_S, max(deadline - time.monotonic(), 0)))
                continue
            job = entry.job
            assert job is not None  # has_job
            record = entry.record
            started = msgspec.structs.replace(
                record,
                task=msgspec.structs.replace(record.task, status="in_progress"),
                attempt=record.attempt + 1,
            )
            self._set(entry, started)
            return Claim(started, job)
        return None

    def _acquire(self, task_id: str, limits: list[tuple[str, int]]) -> bool:
        if any(len(self._holders.get(slot, ())) >= limit for slot, limit in limits):
            return False
        for slot, _ in limits:
            self._holders.setdefault(slot, set()).add(task_id)
        return True

    async def renew(self, task_id: str) -> None:
        """Nothing to renew: the embedded store's tasks die with their one process."""

    async def release(self, task_id: str, *, handover: bool) -> None:
        # No other worker could take a handed-over task: they all die with this process.
        for slot, holders in list(self._holders.items()):
            holders.discard(task_id)
            if not holders:
                del self._holders[slot]

    async def finish(
        self,
        task_id: str,
        attempt: int,
        response: StoredResponse,
        error: TaskError | None = None,
        *,
        keep_name: bool = True,
    ) -> Task | None:
        entry = self._entry(task_id)
        if entry is None:
            return None
        record = entry.record
        if record.task.status != "in_progress" or record.attempt != attempt:
            return None  # cancelled meanwhile, or a stale worker: its result is not ours to keep
        status: Status = "completed" if error is None else "failed"
        task = msgspec.structs.replace(record.task, status=status, error=error)
        if not keep_name and record.once is not None:
            self._forget(record.once)
        entry.response = response
        self._drop_job(entry)
        self._set(entry, msgspec.structs.replace(record, task=task))
        return task

    async def cancel(self, task_id: str) -> Task | None:
        entry = self._entry(task_id)
        if entry is None:
            return None
        record = entry.record
        if record.task.status == "queued":
            self._queue.remove(record.owner, task_id)
        if record.task.status not in TERMINAL:
            self._drop_job(entry)
            record = msgspec.structs.replace(
                record, task=msgspec.structs.replace(record.task, status="cancelled")
            )
            self._set(entry, record)
        return record.task

    async def answered(self, task_id: str) -> tuple[TaskRecord, StoredResponse | None] | None:
        entry = self._entry(task_id)
        return None if entry is None else (entry.record, entry.response)

    async def events(self, task_id: str, after: str | None, timeout_s: float) -> list[TaskEvent]:
        entry = self._entry(task_id)
        if entry is None:
            return []
        seen = int(after) if after and after.isdecimal() and len(after) < 10 else -1
        if after is None:
            seen = 0
        elif not 0 <= seen <= len(entry.events):
            raise ValueError(f"not an event id: {after!r}")
        if seen >= len(entry.events) and entry.record.task.status not in TERMINAL:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await entry.changed.wait()
        return entry.events[seen:]

    async def ended(self, task_id: str, timeout_s: float) -> Status | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (entry := self._entry(task_id)) is not None:
            status = entry.record.task.status
            if status in TERMINAL or (left := deadline - loop.time()) <= 0:
                return status
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await entry.changed.wait()
        return None

    async def outcome(
        self, task_id: str, timeout_s: float
    ) -> tuple[Task, StoredResponse | None] | None:
        status = await self.ended(task_id, timeout_s)
        entry = self._entry(task_id)
        if status not in TERMINAL or entry is None:
            return None
        return entry.record.task, entry.response

    async def queue_depth(self) -> int:
        return len(self._queue)

    async def owner_key(self) -> bytes:
        return self._owner_key

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._entries.clear()

    def _forget(self, once: OnceName) -> None:
        """Let a run-once name go, if it still names this call's task."""
        if self._names.get(once.name, ("",))[0] == once.value:
            del self._names[once.name]

    def _purge(self) -> None:
        # Mostly in expiry order (a few tasks are kept shorter): stop at the first one alive
        # instead of scanning them all; a shorter-lived one behind it goes when it is read.
        now = time.monotonic()
        while self._entries:
            task_id, entry = next(iter(self._entries.items()))
            if entry.expires_at > now:
                break
            self._drop_job(entry)
            del self._entries[task_id]
        while self._names:
            name, (_, expires_at) = next(iter(self._names.items()))
            if expires_at > now:
                break
            del self._names[name]
