"""Backpressure for sync calls: at most N upstream calls per model on this replica, and a
bounded queue in front of them that serves credentials in turn, so one tenant's flood cannot
starve another. A caller still waiting at its deadline gets 429 instead of a call APIYI would
refuse anyway. Apart from models, each caller credential may hold only its share of the
upstream pool: past it, 429 at once. Connections held open while nothing goes upstream (an
event stream, a `Prefer: wait`, a large answer read slowly) are capped per caller and in total
(`Held`), as nginx's limit_conn does: one tenant cannot spend the replica's file descriptors."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import resource
import time
from collections.abc import AsyncIterator, Callable, Iterator

from aiohttp import web

from gateway.config import AdmissionConfig, ServerConfig
from gateway.errors import GatewayError
from gateway.metrics import Metrics
from gateway.turns import next_in_turn

logger = logging.getLogger(__name__)


class Overloaded(GatewayError):
    """Nothing was sent upstream: retrying later is safe."""

    status = 429
    type = "rate_limit_error"
    code = "gateway_overloaded"
    should_retry = True
    retry_after_s = 1
    default_message = "Too many calls to this model are running; retry shortly."


class CallerOverloaded(Overloaded):
    code = "caller_overloaded"
    default_message = (
        "This API key has as many calls in flight as the gateway allows one key; retry shortly."
    )


class TooManyConnections(GatewayError):
    """Refused before anything was read or sent: retrying once a connection closes is safe."""

    status = 429
    type = "rate_limit_error"
    code = "too_many_connections"
    should_retry = True
    retry_after_s = 5
    default_message = (
        "This API key holds as many open event streams and waits as the gateway allows one "
        "key; close one, or retry shortly."
    )


_FULL = "The gateway holds as many open connections as it can; retry shortly."
# At most one warning line per this long for each cap: a flood of refusals is one line, not a
# flood of lines (the metric counts every one).
_WARN_EVERY_S = 10.0


class TooManyBytes(GatewayError):
    """Refused before anything was stored or sent: retrying once calls end is safe."""

    status = 429
    type = "rate_limit_error"
    code = "too_many_bytes_in_flight"
    should_retry = True
    retry_after_s = 5
    default_message = (
        "This API key has as many request bytes in flight as the gateway allows one key; "
        "retry shortly."
    )


class Held:
    """What is held (connections, or bytes), at most `per_caller` for one caller and `total`
    for everyone on this replica (0: no cap), nginx limit_conn-style: past either, `refusal`
    at once. `refused(reason)` counts each refusal ("per_caller" or "total", after `name`)."""

    def __init__(
        self,
        name: str,
        per_caller: int,
        total: int,
        refused: Callable[[str], None],
        refusal: type[GatewayError] = TooManyConnections,
        full_message: str = _FULL,
    ) -> None:
        self._name = name
        self._per_caller = per_caller
        self._total = total
        self._refused = refused
        self._refusal = refusal
        self._full_message = full_message
        self._by_caller: dict[str, int] = {}
        self._count = 0
        self._unlogged = 0
        self._logged_at = -_WARN_EVERY_S

    @contextlib.contextmanager
    def hold(self, caller: str, message: str | None = None, amount: int = 1) -> Iterator[None]:
        """`amount` more of `caller`'s (never logged), for the `with`."""
        held = self._by_caller.get(caller, 0)
        if 0 < self._per_caller < held + amount:
            self._refuse("per_caller", message)
        if 0 < self._total < self._count + amount:
            self._refuse("total", self._full_message)
        self._by_caller[caller] = held + amount
        self._count += amount
        try:
            yield
        finally:
            self._count -= amount
            if (left := self._by_caller[caller] - amount) > 0:
                self._by_caller[caller] = left
            else:
                del self._by_caller[caller]

    def _refuse(self, reason: str, message: str | None) -> None:
        self._refused(reason)
        self._unlogged += 1
        now = time.monotonic()
        if now - self._logged_at >= _WARN_EVERY_S:
            logger.warning(
                "%d %s refused (%s cap reached: %d per caller, %d in total, %d open)",
                self._unlogged,
                self._name,
                reason.replace("_", " "),
                self._per_caller,
                self._total,
                self._count,
            )
            self._logged_at, self._unlogged = now, 0
        raise self._refusal(message)


@dataclasses.dataclass(frozen=True)
class HeldConnections:
    """This replica's caps on connections that stay open while nothing goes upstream."""

    waiting: Held  # event streams, `Prefer: wait` on a result or a submit
    reading: Held  # task answers too large to send at once, while they are read
    # Request bytes of calls run as tasks, held whole in memory until stored or answered
    # (plain calls' bodies wait on disk instead).
    body_bytes: Held

    @classmethod
    def from_config(cls, config: ServerConfig, metrics: Metrics) -> HeldConnections:
        refused = metrics.held_refused
        total = config.held_total if config.held_total is not None else _open_files() // 2
        return cls(
            Held("held connections", config.held_per_caller, total, lambda why: refused(why).inc()),
            Held(
                "result readers",
                config.result_readers_per_caller,
                0,
                lambda _: refused("result_readers").inc(),
            ),
            Held(
                "task request bodies",
                config.task_body_bytes_per_caller,
                config.task_body_bytes_total,
                lambda why: metrics.body_bytes_refused(why).inc(),
                TooManyBytes,
                "The gateway holds as many request bytes as it can; retry shortly.",
            ),
        )


def _open_files() -> int:
    """The process's open-file limit: past it, accept() fails and callers see resets."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 2**16


HELD = web.AppKey("held", HeldConnections)


class CredentialSlot:
    """A class, not a generator: it is entered on every call's hot path."""

    __slots__ = ("_credential", "_in_flight", "_limit")

    def __init__(self, in_flight: dict[str, int], credential: str, limit: int) -> None:
        self._in_flight = in_flight
        self._credential = credential
        self._limit = limit

    def __enter__(self) -> None:
        if self._limit <= 0:
            return
        held = self._in_flight.get(self._credential, 0)
        if held >= self._limit:
            raise CallerOverloaded()
        self._in_flight[self._credential] = held + 1

    def __exit__(self, *exc_info: object) -> None:
        if self._limit <= 0:
            return
        if (left := self._in_flight[self._credential] - 1) > 0:
            self._in_flight[self._credential] = left
        else:
            del self._in_flight[self._credential]


class _Model:
    """One model's running calls and its waiting callers, a queue per credential."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running = 0
        self.waiting: collections.OrderedDict[str, collections.deque[asyncio.Future[None]]] = (
            collections.OrderedDict()
        )

    def hand_on(self) -> None:
        """A slot is free: give it to the next credential in turn (round robin)."""
        while self.waiting and self.running < self.limit:
            _, waiter = next_in_turn(self.waiting)
            if not waiter.done():
                waiter.set_result(None)
                self.running += 1


class Admission:
    def __init__(self, config: AdmissionConfig, per_credential: int = 0) -> None:
        self._config = config
        self._models: dict[str, _Model] = {}
        self._waiting = 0
        self._per_credential = per_credential
        self._in_flight: dict[str, int] = {}

    def credential_slot(self, credential: str) -> CredentialSlot:
        """One of the credential's upstream calls, held in a `with`; none free: `CallerOverloaded`
        on entering."""
        return CredentialSlot(self._in_flight, credential, self._per_credential)

    def limited(self, model: str | None) -> bool:
        """Whether calls to `model` queue at all: the hot path skips the rest when not."""
        limits = self._config.model_concurrency
        return bool(limits.get(model or "", self._config.default_concurrency) > 0)

    def _model(self, model: str | None) -> _Model | None:
        limit = self._config.model_concurrency.get(model or "", self._config.default_concurrency)
        if limit <= 0:
            return None
        key = model or ""
        state = self._models.get(key)
        if state is None:
            state = self._models[key] = _Model(limit)
        return state

    @contextlib.asynccontextmanager
    async def slot(
        self, model: str | None, credential: str, deadline: float
    ) -> AsyncIterator[None]:
        """Hold one of the model's upstream slots for the call; waits (fairly) for one until
        `deadline` (event-loop time), then `Overloaded`."""
        state = self._model(model)
        if state is None:
            yield
            return
        if state.running < state.limit and not state.waiting:
            state.running += 1
        else:
            try:
                async with asyncio.timeout_at(deadline):
                    await self._wait(state, credential)
            except TimeoutError:
                raise Overloaded("The deadline passed while waiting for this model.") from None
        try:
            yield
        finally:
            state.running -= 1
            state.hand_on()

    async def _wait(self, state: _Model, credential: str) -> None:
        if self._waiting >= self._config.max_waiting:
            raise Overloaded("Too many callers are already waiting for this model.")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        state.waiting.setdefault(credential, collections.deque()).append(waiter)
        self._waiting += 1
        try:
            await waiter
        except (TimeoutError, asyncio.CancelledError):
            if waiter.done() and not waiter.cancelled():
                # The slot arrived just as the wait ended: pass it on rather than leak it.
                state.running -= 1
                state.hand_on()
            else:
                waiter.cancel()
            raise
        finally:
            self._waiting -= 1


ADMISSION = web.AppKey("admission", Admission)
