"""The embedded task store: one process, nothing survives a restart, no setup."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time

import msgspec

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
)


class _Entry:
    __slots__ = ("changed", "events", "expires_at", "job", "record", "response")

    def __init__(self, record: TaskRecord, job: Job, expires_at: float) -> None:
        self.record = record
        self.job: Job | None = job
        self.response: StoredResponse | None = None
        self.events: list[TaskEvent] = []
        self.changed = asyncio.Event()
        self.expires_at = expires_at


class MemoryStore:
    def __init__(self, retention_s: float) -> None:
        self._retention_s = retention_s
        self._entries: dict[str, _Entry] = {}
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._holders: dict[str, set[str]] = {}  # concurrency slot -> running task ids
        self._names: dict[str, tuple[str, float]] = {}  # remembered name -> (value, expiry)
        self._owner_key = secrets.token_bytes(32)  # tasks die with the process, so may the key

    def _entry(self, task_id: str) -> _Entry | None:
        entry = self._entries.get(task_id)
        if entry is not None and entry.expires_at <= time.monotonic():
            del self._entries[task_id]
            return None
        return entry

    def _set(self, entry: _Entry, record: TaskRecord) -> None:
        """The one place a task changes: status and its event together, and readers woken."""
        entry.record = record
        entry.events.append(TaskEvent(str(len(entry.events) + 1), record.task))
        entry.changed.set()
        entry.changed = asyncio.Event()

    async def create(self, record: TaskRecord, job: Job, retention_s: float | None = None) -> None:
        self._purge()
        kept_s = self._retention_s if retention_s is None else retention_s
        entry = _Entry(record, job, time.monotonic() + kept_s)
        self._entries[record.task.id] = entry
        self._set(entry, record)
        self._queue.put_nowait(record.task.id)

    async def find_or_create(
        self, record: TaskRecord, job: Job, retention_s: float | None, once: OnceName
    ) -> str | None:
        now = time.monotonic()
        held = self._names.get(once.name)
        if held is not None and held[1] > now and not once.replace:
            return held[0]
        self._names[once.name] = (once.value, now + once.ttl_s)
        await self.create(record, job, retention_s)
        return None

    async def get(self, task_id: str) -> TaskRecord | None:
        entry = self._entry(task_id)
        return None if entry is None else entry.record

    async def claim(self, timeout_s: float) -> Claim | None:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                async with asyncio.timeout(left):
                    task_id = await self._queue.get()
            except TimeoutError:
                return None
            entry = self._entry(task_id)
            if entry is None or entry.job is None or entry.record.task.status != "queued":
                continue  # cancelled or expired while queued
            if not self._acquire(task_id, entry.job.limits):
                self._queue.put_nowait(task_id)  # stays queued, behind the others
                await asyncio.sleep(min(DEFER_PAUSE_S, max(deadline - time.monotonic(), 0)))
                continue
            record = entry.record
            started = msgspec.structs.replace(
                record,
                task=msgspec.structs.replace(record.task, status="in_progress"),
                attempt=record.attempt + 1,
            )
            self._set(entry, started)
            return Claim(started, entry.job)
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
        self, task_id: str, attempt: int, response: StoredResponse, error: TaskError | None = None
    ) -> Task | None:
        entry = self._entry(task_id)
        if entry is None:
            return None
        record = entry.record
        if record.task.status != "in_progress" or record.attempt != attempt:
            return None  # cancelled meanwhile, or a stale worker: its result is not ours to keep
        status: Status = "completed" if error is None else "failed"
        task = msgspec.structs.replace(record.task, status=status, error=error)
        entry.response = response
        entry.job = None  # the caller's credential goes with it
        self._set(entry, msgspec.structs.replace(record, task=task))
        return task

    async def cancel(self, task_id: str) -> Task | None:
        entry = self._entry(task_id)
        if entry is None:
            return None
        record = entry.record
        if record.task.status not in TERMINAL:
            entry.job = None
            record = msgspec.structs.replace(
                record, task=msgspec.structs.replace(record.task, status="cancelled")
            )
            self._set(entry, record)
        return record.task

    async def result(self, task_id: str) -> StoredResponse | None:
        entry = self._entry(task_id)
        return None if entry is None else entry.response

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

    async def queue_depth(self) -> int:
        return sum(1 for e in self._entries.values() if e.record.task.status == "queued")

    async def owner_key(self) -> bytes:
        return self._owner_key

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._entries.clear()

    def _purge(self) -> None:
        # Mostly in expiry order (a few tasks are kept shorter): stop at the first one alive
        # instead of scanning them all; a shorter-lived one behind it goes when it is read.
        now = time.monotonic()
        while self._entries:
            task_id, entry = next(iter(self._entries.items()))
            if entry.expires_at > now:
                break
            del self._entries[task_id]
        while self._names:
            name, (_, expires_at) = next(iter(self._names.items()))
            if expires_at > now:
                break
            del self._names[name]
