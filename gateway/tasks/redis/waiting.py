"""Waiting for a task's events (an event stream), or for its end alone: a `wait=N` caller (its
status and answer) and a worker's cancel watcher (its status). Waiting for the end reads one
status per wake-up, no events, and none when the wake-up said the status or this process wrote
it. A task this process runs hands its answer over in memory (`hand`), not read back."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Container
from typing import Any, cast

from gateway.aio import cancel_requests, raise_if_cancelled_since
from gateway.tasks.models import (
    TERMINAL,
    Status,
    StoredResponse,
    Task,
    TaskEvent,
    TaskRecord,
    is_event_id,
)
from gateway.tasks.redis.answers import Answers
from gateway.tasks.redis.keys import Keys
from gateway.tasks.redis.transitions import Transitions
from gateway.tasks.redis.wakeups import Wakeups, remember

Outcome = tuple[Task, StoredResponse | None]


# Tasks whose last write by this process is remembered (`expect`): the latest created or started.
_EXPECTED = 4096


class Waiting:
    def __init__(self, redis: Any, keys: Keys, transitions: Transitions, wakeups: Wakeups) -> None:
        self._redis = redis
        self._keys = keys
        self._transitions = transitions
        self._wakeups = wakeups
        self._answers = Answers(redis, keys, transitions)
        # A waiter's end of a task this process runs: handed over here, not read back.
        self._outcomes: dict[str, asyncio.Future[Outcome | None]] = {}
        # The status this process last wrote to a task, and the wake-ups' mark from before the
        # write: with the wake-ups heard since, its status now, without a read (`_status`).
        self._expected: dict[str, tuple[int | None, Status]] = {}

    def expect(self, task_id: str, status: Status, mark: int | None) -> None:
        """This process wrote `status` to the task, after the wake-ups' `mark`."""
        remember(self._expected, task_id, (mark, status), _EXPECTED)

    def hand(self, task_id: str, outcome: Outcome | None) -> None:
        """This process's run of the task ended: with its outcome, or None (no answer from
        this run: the waiter reads what stands)."""
        if (local := self._outcomes.get(task_id)) is not None and not local.done():
            local.set_result(outcome)

    async def _status(
        self, task_id: str, heard: str | None, *, read: bool = False
    ) -> Status | None:
        """The task's status: as a wake-up announced it (`heard`), or as this process wrote it
        with none heard since, or read (always with `read`). Called with its watch open."""
        if heard is not None:
            return cast(Status, heard)
        mark, wrote = self._expected.get(task_id, (None, None))
        if not read and (since := self._wakeups.since(task_id, mark)) is not False:
            return cast(Status, since or wrote)
        await self._wakeups.listen()
        # Shielded: a waiter is cancelled whenever what it waits for is over, often mid-read,
        # and redis-py drops a connection cancelled mid-command (a reconnect costs ~10 reads).
        return await asyncio.shield(self._transitions.status(task_id))

    async def outcome(
        self, task_id: str, timeout_s: float, running_here: Container[str]
    ) -> Outcome | None:
        """The task as it ended and its answer, if it ends within `timeout_s`. Handed over by
        this process's worker when it runs the task (`running_here`); else read once its
        wake-up says it ended."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        local = self._outcomes.setdefault(task_id, loop.create_future())
        heard: str | None = None
        try:
            async with self._wakeups.watch(task_id, ends_only=True) as watch:
                while True:
                    if task_id not in running_here:  # else its end comes in `local`
                        status = await self._status(task_id, heard)
                        if status is None:
                            return None
                        if status in TERMINAL:
                            read = await self.answered(task_id)
                            return None if read is None else (read[0].task, read[1])
                    if (left := deadline - loop.time()) <= 0:
                        return None
                    woken = asyncio.ensure_future(watch.next())
                    try:
                        await asyncio.wait(
                            (local, woken), timeout=left, return_when="FIRST_COMPLETED"
                        )
                    finally:
                        woken.cancel()
                    if local.done():
                        if (got := local.result()) is not None:
                            return got
                        local = self._outcomes[task_id] = loop.create_future()
                        heard = None
                    elif not woken.done():
                        return None
                    else:
                        heard = woken.result()
        finally:
            if self._outcomes.get(task_id) is local:
                del self._outcomes[task_id]

    async def events(self, task_id: str, after: str | None, timeout_s: float) -> list[TaskEvent]:
        """`TaskStore.events`: a task's events after `after`, waiting for one if none yet."""
        if after is not None and not is_event_id(after):
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

    async def answered(self, task_id: str) -> tuple[TaskRecord, StoredResponse | None] | None:
        """The task and its answer: one round trip, and a large answer's body read later."""
        record, answer = await self._answers.answered(task_id)
        return None if record is None else (record, answer)

    async def ended(self, task_id: str, timeout_s: float) -> Status | None:
        """The task's status once it has ended, or as it stands after `timeout_s`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        heard: str | None = None
        timed_out = False
        async with self._wakeups.watch(task_id, ends_only=True) as watch:
            while True:
                seen = cancel_requests()
                # After a quiet wait it reads: a wake-up lost unnoticed is not waited on forever.
                status = await self._status(task_id, heard, read=timed_out)
                if status is None or status in TERMINAL or (left := deadline - loop.time()) <= 0:
                    return status
                raise_if_cancelled_since(seen)
                heard = None
                try:
                    async with asyncio.timeout(left):
                        heard = await watch.next()
                except TimeoutError:
                    timed_out = True
