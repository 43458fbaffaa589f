"""What every public Redis store call goes through: one error for an unreachable Redis, a
metric per call, and no lost cancellation."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    ClusterError,
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.aio import cancel_requests, raise_if_cancelled_since
from gateway.errors import StoreUnavailable

# A Redis that answers but cannot serve now: out of memory, a replica after a failover, loading
# its data, a cluster down or without a primary for a slot (mid-failover). As unreachable as
# one that does not answer.
_UNAVAILABLE = (
    ReadOnlyError,
    OutOfMemoryError,
    BusyLoadingError,
    MasterDownError,
    TryAgainError,
    ClusterDownError,
    SlotNotCoveredError,
)
# The cluster client gave up on a slot after its own retries: it may have sent the command.
_GAVE_UP = (ClusterError, RedisClusterException)


def _unsent(exc: BaseException) -> bool:
    """Whether the command surely never reached Redis: no connection could be made (a failure
    after writing, or a timeout waiting for the answer, may have changed something)."""
    if isinstance(exc, _UNAVAILABLE):
        return True  # refused: Redis answered and did nothing
    return isinstance(exc, RedisConnectionError) and "connecting to" in str(exc)


# Told of every store call: the operation, its seconds, whether Redis was reached.
Observer = Callable[[str, float, bool], None]


_P = ParamSpec("_P")
_R = TypeVar("_R")


def store_call(
    method: Callable[_P, Coroutine[Any, Any, _R]],
) -> Callable[_P, Coroutine[Any, Any, _R]]:
    """Every public store method: Redis being unreachable is one clear 503 for callers, each
    call is observed, and a cancellation redis-py swallowed is raised again."""
    op = method.__name__

    @functools.wraps(method)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        observe: Observer = args[0].observe  # type: ignore[attr-defined]
        seen = cancel_requests()
        started = time.monotonic()
        try:
            result = await method(*args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError, OSError, *_UNAVAILABLE, *_GAVE_UP) as exc:
            observe(op, time.monotonic() - started, False)
            raise StoreUnavailable(unsent=_unsent(exc)) from exc
        observe(op, time.monotonic() - started, True)
        raise_if_cancelled_since(seen)
        return result

    return wrapper


def unobserved(op: str, seconds: float, reached: bool) -> None:
    """For a store with no metrics (tests, tools)."""
