"""What every public Redis store call goes through: one error for an unreachable Redis, a
metric per call, no lost cancellation, and on the request path a deadline of its own: a hung
Redis (stopped, not dead) costs a caller that deadline, not the socket timeout and its retries."""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections.abc import Callable, Coroutine
from contextvars import ContextVar
from typing import Any, ParamSpec, TypeVar

from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    ClusterError,
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.aio import cancel_requests, raise_if_cancelled_since
from gateway.errors import StoreUnavailable

# A Redis that answers but cannot serve now: out of memory, loading its data, or a replica, a
# cluster down or a slot without a primary (mid-failover). As unreachable as one that does not
# answer; each named for the metric.
_REFUSALS: dict[type[Exception], str] = {
    OutOfMemoryError: "out_of_memory",
    BusyLoadingError: "loading",
    ReadOnlyError: "failover",
    MasterDownError: "failover",
    TryAgainError: "failover",
    ClusterDownError: "failover",
    SlotNotCoveredError: "failover",
}
_UNAVAILABLE = tuple(_REFUSALS)
# The cluster client gave up on a slot after its own retries: it may have sent the command.
_GAVE_UP = (ClusterError, RedisClusterException)
_FENCED_OUT = "LATE the gateway stopped waiting for this write"
_FAILURES: tuple[type[Exception], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    *_UNAVAILABLE,
    *_GAVE_UP,
)


def _reason(exc: BaseException) -> str:
    """Why a call failed, for `gateway_store_errors_total{reason}`."""
    for kind, reason in _REFUSALS.items():
        if isinstance(exc, kind):
            return reason
    if isinstance(exc, _GAVE_UP):
        return "failover"
    return "timeout" if isinstance(exc, RedisTimeoutError) else "unreachable"


def _unsent(exc: BaseException) -> bool:
    """Whether the command surely never reached Redis: no connection could be made (a failure
    after writing, or a timeout waiting for the answer, may have changed something)."""
    if isinstance(exc, _UNAVAILABLE):
        return True  # refused: Redis answered and did nothing
    return isinstance(exc, RedisConnectionError) and "connecting to" in str(exc)


_REDIS_CONNECTION = os.path.join("redis", "asyncio", "connection.py")


def _in_a_dying_connection(exc: BaseException) -> bool:
    """Whether `exc` came out of redis-py's connection code. A connection to a node that dies
    while it is being set up (a failover) fails there with a closed transport's RuntimeError or
    a missing writer's AttributeError, not a ConnectionError: unreachable all the same."""
    frame = exc.__traceback__
    while frame is not None:
        if frame.tb_frame.f_code.co_filename.endswith(_REDIS_CONNECTION):
            return True
        frame = frame.tb_next
    return False


# Told of every store call: the operation, its seconds, and why it failed ("" if it did not).
Observer = Callable[[str, float, str], None]


_P = ParamSpec("_P")
_R = TypeVar("_R")


# When the store call under way stops waiting (loop time): a fenced write (`store_write`) is
# refused by Redis after a time before it (`RedisClock.fence_ms`).
giving_up_at: ContextVar[float] = ContextVar("giving_up_at")


def store_call(
    method: Callable[_P, Coroutine[Any, Any, _R]],
) -> Callable[_P, Coroutine[Any, Any, _R]]:
    """A call on the request path: it waits at most the store's `deadline_s`."""
    return _observed(method, lambda store: store.deadline_s, fenced=False)


def store_write(
    method: Callable[_P, Coroutine[Any, Any, _R]],
) -> Callable[_P, Coroutine[Any, Any, _R]]:
    """A task's creation: it waits at most the store's `write_deadline_s`, and its writes are
    fenced (`lua/fence.lua`): once it stopped waiting they did nothing and never will, so its
    caller may be told to retry, or its call go upstream plainly (`unsent`)."""
    return _observed(method, lambda store: store.write_deadline_s, fenced=True)


def store_wait(
    method: Callable[_P, Coroutine[Any, Any, _R]],
) -> Callable[_P, Coroutine[Any, Any, _R]]:
    """A call that waits by design (for a task's end, its events, work) or a worker's own
    (renew, finish): each command is bounded by the socket timeout alone."""
    return _observed(method, lambda store: None, fenced=False)


def _observed(
    method: Callable[_P, Coroutine[Any, Any, _R]],
    bound: Callable[[Any], float | None],
    *,
    fenced: bool,
) -> Callable[_P, Coroutine[Any, Any, _R]]:
    """Redis being unreachable (or too slow: `bound`'s seconds) is one clear 503 for callers,
    each call is observed, and a cancellation redis-py swallowed is raised again."""
    op = method.__name__

    @functools.wraps(method)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        store: Any = args[0]
        observe: Observer = store.observe
        seen = cancel_requests()
        started = time.monotonic()
        limit_s = bound(store)
        deadline = asyncio.timeout(limit_s)
        token = giving_up_at.set(asyncio.get_running_loop().time() + (limit_s or 0.0))
        try:
            async with deadline:
                if not store.ready:
                    await store.get_ready()
                result = await method(*args, **kwargs)
        except _FAILURES as exc:
            late = deadline.expired()
            observe(op, time.monotonic() - started, "timeout" if late else _reason(exc))
            raise StoreUnavailable(unsent=(fenced and late) or _unsent(exc)) from exc
        except ResponseError as exc:
            # `lua/fence.lua` refused it: it did nothing. A pipeline names the command first.
            if _FENCED_OUT not in str(exc):
                raise
            observe(op, time.monotonic() - started, "timeout")
            raise StoreUnavailable(unsent=True) from exc
        except (RuntimeError, AttributeError) as exc:
            if not _in_a_dying_connection(exc):
                raise
            observe(op, time.monotonic() - started, "unreachable")
            raise StoreUnavailable(unsent=False) from exc
        finally:
            giving_up_at.reset(token)
        observe(op, time.monotonic() - started, "")
        raise_if_cancelled_since(seen)
        return result

    return wrapper


def unobserved(op: str, seconds: float, failure: str) -> None:
    """For a store with no metrics (tests, tools)."""
