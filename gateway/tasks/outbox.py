"""Task ends still to announce (webhooks): what the deliverer works through, kept by the task
store beside the tasks, so an end is never lost between a task ending and its announcement.

A task that announces its end is put in the outbox when it is created, before it exists (due a
while later, to be looked at then), and made due at once when it ends. Whatever ends it, and
whichever replica dies when, its entry is there and comes due: an end cannot fall between two
writes. The deliverer takes due entries under a lease (one replica at a time delivers each),
and settles each with the lease it took, so a deliverer whose lease ran out changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from typing import Protocol

import msgspec


class Announcement(msgspec.Struct, frozen=True, kw_only=True):
    """A due entry, taken: its task, the lease it was taken with (shown to settle it), the
    deliveries that failed so far, and the event as first built (b"" before)."""

    task_id: str
    lease: int
    attempts: int = 0
    client: str = ""
    body: bytes = b""


class Doorbell:
    """Rung when a task of this process that announces its end ends: its deliverer looks at
    the outbox at once rather than at its next poll."""

    def __init__(self) -> None:
        self._rung = asyncio.Event()

    def ring(self) -> None:
        self._rung.set()

    async def wait(self, timeout_s: float) -> None:
        """Until rung (since the last wait), or `timeout_s`."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._rung.wait()
        self._rung.clear()


class Outbox(Protocol):
    @property
    def doorbell(self) -> Doorbell: ...

    async def take(self, limit: int, lease_s: float) -> tuple[list[Announcement], int]:
        """Up to `limit` due entries, each leased for `lease_s` to the caller (due again after
        it unless settled), and how many entries the outbox holds."""

    async def keep(self, taken: Announcement, client: str, body: bytes) -> bool:
        """Keep the event built for `taken` (every later try sends it as it is); False if
        the lease was lost."""

    async def later(self, taken: Announcement, delay_s: float, *, failed: bool) -> bool:
        """Due again after `delay_s`, one failed delivery more if `failed`; False if the lease
        was lost."""

    async def drop(self, taken: Announcement) -> bool:
        """Delivered, given up, or nothing to announce: gone. False if the lease was lost."""


# A task's entry made at its creation is first looked at after this, and again this often while
# the task runs: its end makes it due at once, this is only for an end whose nudge was lost
# (the replica that ended it died right after).
UNENDED_RECHECK_S = 60.0


class MemoryOutbox:
    """The embedded store's outbox: as lost on restart as its tasks are. Entries by task id,
    and a heap of (due, task id) to find the due ones without a scan; a heap item whose entry
    was settled since (due elsewhen, or gone) is passed over."""

    def __init__(self) -> None:
        # task id -> (due or lease end (monotonic ms), failed deliveries, client, event)
        self._entries: dict[str, tuple[int, int, str, bytes]] = {}
        self._due: list[tuple[int, str]] = []
        self.doorbell = Doorbell()

    def expect(self, task_id: str) -> None:
        if task_id not in self._entries:
            self._schedule(task_id, (_now_ms(UNENDED_RECHECK_S), 0, "", b""))

    def nudge(self, task_id: str) -> None:
        if (entry := self._entries.get(task_id)) is not None:
            self._schedule(task_id, (_now_ms(), *entry[1:]))
            self.doorbell.ring()

    async def take(self, limit: int, lease_s: float) -> tuple[list[Announcement], int]:
        now, taken = _now_ms(), list[Announcement]()
        while self._due and self._due[0][0] <= now and len(taken) < limit:
            due, task_id = heapq.heappop(self._due)
            entry = self._entries.get(task_id)
            if entry is None or entry[0] != due:
                continue
            _, attempts, client, body = entry
            lease = now + int(lease_s * 1000)
            self._schedule(task_id, (lease, attempts, client, body))
            taken.append(
                Announcement(
                    task_id=task_id, lease=lease, attempts=attempts, client=client, body=body
                )
            )
        return taken, len(self._entries)

    async def keep(self, taken: Announcement, client: str, body: bytes) -> bool:
        if not self._held(taken):
            return False
        self._entries[taken.task_id] = (taken.lease, taken.attempts, client, body)
        return True

    async def later(self, taken: Announcement, delay_s: float, *, failed: bool) -> bool:
        if not self._held(taken):
            return False
        _, attempts, client, body = self._entries[taken.task_id]
        self._schedule(taken.task_id, (_now_ms(delay_s), attempts + failed, client, body))
        return True

    async def drop(self, taken: Announcement) -> bool:
        if not self._held(taken):
            return False
        del self._entries[taken.task_id]
        return True

    def _schedule(self, task_id: str, entry: tuple[int, int, str, bytes]) -> None:
        self._entries[task_id] = entry
        heapq.heappush(self._due, (entry[0], task_id))

    def _held(self, taken: Announcement) -> bool:
        entry = self._entries.get(taken.task_id)
        return entry is not None and entry[0] == taken.lease


def _now_ms(after_s: float = 0.0) -> int:
    return int((time.monotonic() + after_s) * 1000)
