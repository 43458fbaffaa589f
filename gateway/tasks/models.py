"""What a task is, and the one small interface every task store keeps.

The public task object (`Task`) is what callers see; `TaskRecord` adds what only the gateway
may know (the owner's keyed hash, the attempt that fences stale workers). The caller's request,
credential included, lives in a `Job` only until the task ends.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, Callable
from typing import Literal, Protocol

import msgspec

from gateway.errors import QUEUE_FULL_FOR_ALL, QueueFull
from gateway.tasks.outbox import Outbox
from gateway.usage.ask import Ask

Status = Literal["queued", "in_progress", "completed", "failed", "cancelled"]
TERMINAL: frozenset[Status] = frozenset(("completed", "failed", "cancelled"))
# A worker that found a task's concurrency slot full waits this long before its next try, so a
# queue of blocked tasks does not spin.
DEFER_PAUSE_S = 0.2


# An event id: the event's place in its task's list of events. Below 2**63, the largest index
# LRANGE takes: a larger one is an error from Redis, not an empty read.
_EVENT_ID = re.compile(r"[0-9]{1,19}")
_LAST_INDEX = 2**63 - 1


def is_event_id(text: str) -> bool:
    """Whether `text` has an event id's shape and is an index Redis can read from."""
    return _EVENT_ID.fullmatch(text) is not None and int(text) <= _LAST_INDEX


# What `service.new_task_id` makes: any other id is refused before it reaches a store or a log.
TASK_ID = re.compile(r"task_[A-Za-z0-9_-]{22}")


class TaskError(msgspec.Struct, frozen=True):
    message: str
    type: str
    code: str


class Task(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    object: Literal["task"] = "task"
    status: Status
    model: str | None
    created_at: int
    error: TaskError | None = None


class OnceName(msgspec.Struct, frozen=True):
    """The name a run-once call's task is found again by, and what the name holds."""

    name: str
    value: str
    ttl_s: float
    # The name goes to this task even when an earlier one holds it (the OpenAI SDK's first
    # attempt, a new generation: only its retries attach).
    replace: bool = False


class TaskRecord(msgspec.Struct, frozen=True, kw_only=True):
    task: Task
    owner: str
    attempt: int = 0
    submitted_at: float = 0.0  # epoch seconds, finer than `created_at`: for the wait metric
    # The name a run-once call's task is found by: let go when its outcome is not kept.
    once: OnceName | None = None
    # The name of the client that made it (`[clients.<name>]`, "unnamed"): what its usage is
    # counted under and where its end is announced, on whichever replica runs it.
    client: str = ""
    # Its end is announced (its client's webhook; an async task): the store keeps it in its
    # outbox from before it exists until the announcement is delivered (`outbox.py`).
    announce: bool = False
    # What the call asks for, as far as its price goes, when its client's usage is counted: the
    # worker that ends it settles its budget hold (the task's id) with what it made.
    ask: Ask | None = None


class Job(msgspec.Struct, frozen=True, kw_only=True):
    """The upstream request to make, exactly as the caller sent it."""

    method: str
    path_qs: str
    headers: list[tuple[str, str]]
    body: bytes
    deadline_s: float
    # A body too large to hold in memory lives in the results store under `body_ref` instead
    # (`body` is empty), until the task ends.
    body_ref: str | None = None
    # Concurrency slots the task must hold while it runs: (slot, limit), e.g. its model's and
    # its upstream credential's (APIYI limits both). A task whose slot is full stays queued.
    limits: list[tuple[str, int]] = []


class StoredResponse(msgspec.Struct, frozen=True, kw_only=True):
    """The upstream's answer, replayed as a sync call would have returned it."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    # The body lives in the results store under this reference instead (`results.py`).
    body_ref: str | None = None


class RangedResponse(StoredResponse, frozen=True, kw_only=True):
    """An answer read without its body, too large to hold for every reader: its `size`
    bytes come a range at a time from `chunks()` as the caller takes them. Never stored."""

    size: int
    chunks: Callable[[], AsyncGenerator[bytes, None]]


class TaskEvent(msgspec.Struct, frozen=True):
    """One status change; `id` orders a task's events and is the SSE `id:`."""

    id: str
    task: Task


class Claim(msgspec.Struct, frozen=True):
    record: TaskRecord
    job: Job


class QueueCaps(msgspec.Struct, frozen=True, kw_only=True):
    """What may wait queued: per caller (tasks, request bytes), and for all callers together,
    since a pass-through caller names itself by any bearer it makes up."""

    per_caller: int = 1000
    bytes_per_caller: int = 256 * 2**20
    total: int = 10_000
    bytes_total: int = 2**30

    def check(self, queued: int, queued_bytes: int, size: int) -> None:
        """`QueueFull` if one caller's `queued` tasks of `queued_bytes` cannot take `size` more."""
        if queued >= self.per_caller or queued_bytes + size > self.bytes_per_caller:
            raise QueueFull()

    def check_total(self, queued: int, queued_bytes: int, size: int) -> None:
        if queued >= self.total or queued_bytes + size > self.bytes_total:
            raise QueueFull(QUEUE_FULL_FOR_ALL)


class TaskStore(Protocol):
    """Task state with atomic transitions: every status change and its event happen together,
    terminal states never change, and a worker's writes count only for its own attempt."""

    @property
    def outbox(self) -> Outbox:
        """The ends of tasks that announce theirs (`TaskRecord.announce`), until delivered."""

    async def create(
        self, record: TaskRecord, job: Job, retention_s: float | None = None, *, here: bool = False
    ) -> None:
        """Store a queued task and its job, and queue it; kept `retention_s` (else the store's
        default). With `here`, the task (in progress, attempt 1) is not queued but held by this
        process as if claimed: its caller's replica runs it, renews, finishes and releases it;
        should the replica die, the store gives the task to a worker after a lease."""

    async def find_or_create(
        self,
        record: TaskRecord,
        job: Job,
        retention_s: float | None,
        once: OnceName,
        *,
        here: bool = False,
    ) -> str | None:
        """`create`, unless an earlier call holds `once.name`: then nothing is stored and the
        value the name holds is returned. Atomic: the task a name holds always exists (until
        it expires)."""

    async def get(self, task_id: str) -> TaskRecord | None: ...

    async def claim(self, timeout_s: float) -> Claim | None:
        """The next queued task whose concurrency slots are free, now in progress with a new
        attempt and holding its slots; None after `timeout_s`."""

    async def renew(self, task_id: str) -> None:
        """Keep the claim on a running task: a claim not renewed for a lease is handed to
        another worker (its own worker presumably died)."""

    async def release(self, task_id: str, *, handover: bool) -> None:
        """Give up this worker's claim and slots once the run is over. With `handover` (the
        worker is shutting down mid-run) the task goes to another worker at once."""

    async def finish(
        self,
        task_id: str,
        attempt: int,
        response: StoredResponse,
        error: TaskError | None = None,
        *,
        keep_name: bool = True,
    ) -> Task | None:
        """End an in-progress task with the upstream's answer (failed with `error`), only if
        `attempt` is still the current one. Without `keep_name` the run-once name that found
        the task is let go, so a retry runs the call again."""

    async def cancel(self, task_id: str) -> Task | None:
        """Cancel a task that has not ended; returns the task as it now stands."""

    async def answered(self, task_id: str) -> tuple[TaskRecord, StoredResponse | None] | None:
        """The task and its answer (None until it has one), in one read."""

    async def outcome(
        self, task_id: str, timeout_s: float
    ) -> tuple[Task, StoredResponse | None] | None:
        """The task as it ended and its answer, if it ends within `timeout_s`."""

    async def ended(self, task_id: str, timeout_s: float) -> Status | None:
        """The task's status once it has ended, or as it stands after `timeout_s`; None if
        gone. Reads no events: a waiter that needs only the end."""

    async def events(self, task_id: str, after: str | None, timeout_s: float) -> list[TaskEvent]:
        """The task's events after `after` (all when None), waiting up to `timeout_s` for one.
        Raises ValueError for an event id this store never made."""

    async def queue_depth(self) -> int:
        """Tasks waiting for a worker (on every replica sharing the store)."""

    async def owner_key(self) -> bytes:
        """The key that owner hashes are made with, the same on every replica."""

    async def ping(self) -> bool:
        """Whether the store answers (readiness)."""

    async def close(self) -> None: ...
