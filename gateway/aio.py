"""asyncio helpers the standard library lacks."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

_T = TypeVar("_T")


async def until_set(stop: asyncio.Event, awaitable: Awaitable[_T]) -> _T | None:
    """`awaitable`'s result, or None as soon as `stop` is set (the awaitable is cancelled)."""
    work = asyncio.ensure_future(awaitable)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((work, stopped), return_when=asyncio.FIRST_COMPLETED)
    finally:
        work.cancel()
        stopped.cancel()
        await asyncio.gather(work, stopped, return_exceptions=True)
    return None if work.cancelled() else work.result()


def cancel_requests() -> int:
    """How many cancellations the running task has been asked for so far."""
    task = asyncio.current_task()
    return task.cancelling() if task is not None else 0


def raise_if_cancelled_since(seen: int) -> None:
    """Raise the cancellation an await swallowed: redis-py can eat a CancelledError that lands
    mid-command (redis/redis-py#2028, #2551), and whoever cancelled would then wait for the
    caller's next timeout. `seen`: `cancel_requests()` before that await."""
    if cancel_requests() > seen:
        raise asyncio.CancelledError()
