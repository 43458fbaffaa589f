"""Waiting for a task's end, for the waiters that need only the end: a `wait=N` caller (its
status and answer) and a worker's cancel watcher (its status). One status read per wake-up,
no events. A task this process runs hands its answer over in memory (`hand`), not read back."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Container
from typing import Any

import msgspec

from gateway.aio import cancel_requests, raise_if_cancelled_since
from gateway.tasks.models import TERMINAL, Status, StoredResponse, Task
from gateway.tasks.redis.keys import Keys
from gateway.tasks.redis.transitions import Transitions, decode
from gateway.tasks.redis.wakeups import Wakeups

Outcome = tuple[Task, StoredResponse | None]
_response = msgspec.msgpack.Decoder(StoredResponse).decode


class Waiting:
    def __init__(self, redis: Any, keys: Keys, transitions: Transitions, wakeups: Wakeups) -> None:
        self._redis = redis
        self._keys = keys
        self._transitions = transitions
        self._wakeups = wakeups
        # A waiter's end of a task this process runs: handed over here, not read back.
        self._outcomes: dict[str, asyncio.Future[Outcome | None]] = {}

    def hand(self, task_id: str, outcome: Outcome | None) -> None:
        """This process's run of the task ended: with its outcome, or None (no answer from
        this run: the waiter reads what stands)."""
        if (local := self._outcomes.get(task_id)) is not None and not local.done():
            local.set_result(outcome)

    async def _status(self, task_id: str) -> Status | None:
        # Shielded: a waiter is cancelled whenever what it waits for is over, often mid-read,
        # and redis-py drops a connection cancelled mid-command (a reconnect costs ~10 reads).
        return await asyncio.shield(self._transitions.status(task_id))

    async def outcome(
        self, task_id: str, timeout_s: float, running_here: Container[str]
    ) -> Outcome | None:
        """The task as it ended and its answer, if it ends within `timeout_s`. Handed over by
        this process's worker when it runs the task (`running_here`); else read once its
        wake-up says it changed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        local = self._outcomes.setdefault(task_id, loop.create_future())
        try:
            while True:
                waiter = await self._wakeups.waiter(task_id)
                if task_id not in running_here:  # else its end comes in `local`
                    status = await self._status(task_id)
                    if status is None:
                        return None
                    if status in TERMINAL:
                        return await self._read_outcome(task_id)
                if (left := deadline - loop.time()) <= 0:
                    return None
                woken = asyncio.ensure_future(waiter.wait())
                try:
                    await asyncio.wait((local, woken), timeout=left, return_when="FIRST_COMPLETED")
                finally:
                    woken.cancel()
                if local.done():
                    if (got := local.result()) is not None:
                        return got
                    local = self._outcomes[task_id] = loop.create_future()
                elif not woken.done():
                    return None
        finally:
            if self._outcomes.get(task_id) is local:
                del self._outcomes[task_id]

    async def _read_outcome(self, task_id: str) -> Outcome | None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hmget(*self._transitions.read_call(task_id))
            pipe.get(self._keys.result(task_id))
            fields, raw = await pipe.execute()
        record = decode(fields)
        if record is None:
            return None
        return record.task, None if raw is None else _response(raw)

    async def ended(self, task_id: str, timeout_s: float) -> Status | None:
        """The task's status once it has ended, or as it stands after `timeout_s`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            seen = cancel_requests()
            waiter = await self._wakeups.waiter(task_id)
            status = await self._status(task_id)
            if status is None or status in TERMINAL or (left := deadline - loop.time()) <= 0:
                return status
            raise_if_cancelled_since(seen)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await waiter.wait()
