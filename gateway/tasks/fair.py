"""The embedded store's queue: waiting tasks served in turn across callers (round robin), so a
caller with one task waits for at most one free worker whatever another has queued; and what
each caller has queued, counted against its caps."""

from __future__ import annotations

import asyncio
import collections

from gateway.tasks.models import QueueCaps
from gateway.turns import next_in_turn


class FairQueue:
    def __init__(self, caps: QueueCaps) -> None:
        self._lines: collections.OrderedDict[str, collections.deque[tuple[str, int]]] = (
            collections.OrderedDict()
        )
        self._queued_bytes: collections.Counter[str] = collections.Counter()
        self._caps = caps
        self._added = asyncio.Event()
        self._count = 0
        self._bytes = 0

    def put(self, caller: str, task_id: str, size: int, *, check: bool = True) -> None:
        """Queue a task at the end of its caller's line; `QueueFull` over the caller's caps or
        everyone's (not checked for a task put back, which was counted when it came)."""
        line = self._lines.get(caller)
        if check:
            self._caps.check(0 if line is None else len(line), self._queued_bytes[caller], size)
            self._caps.check_total(self._count, self._bytes, size)
        if line is None:
            line = self._lines[caller] = collections.deque()
        line.append((task_id, size))
        self._queued_bytes[caller] += size
        self._count += 1
        self._bytes += size
        self._added.set()

    async def get(self, timeout_s: float) -> tuple[str, str] | None:
        """The next (caller, task id) in turn, waiting up to `timeout_s` for one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self._lines:
            self._added.clear()
            try:
                async with asyncio.timeout_at(deadline):
                    await self._added.wait()
            except TimeoutError:
                return None
        caller, (task_id, size) = next_in_turn(self._lines)
        self._left(caller, size)
        if not self._queued_bytes[caller]:
            del self._queued_bytes[caller]
        return caller, task_id

    def remove(self, caller: str, task_id: str) -> None:
        """A queued task cancelled: it no longer counts against its caller's caps."""
        line = self._lines.get(caller)
        for item in list(line or ()):
            if item[0] == task_id:
                line.remove(item)  # type: ignore[union-attr]
                self._left(caller, item[1])
        if line is not None and not line:
            del self._lines[caller]
            self._queued_bytes.pop(caller, None)

    def _left(self, caller: str, size: int) -> None:
        self._queued_bytes[caller] -= size
        self._count -= 1
        self._bytes -= size

    def __len__(self) -> int:
        return self._count
