"""Backpressure for sync calls: at most N upstream calls per model on this replica, and a
bounded queue in front of them that serves credentials in turn, so one tenant's flood cannot
starve another. A caller still waiting at its deadline gets 429 instead of a call APIYI would
refuse anyway. Apart from models, each caller credential may hold only its share of the
upstream pool: past it, 429 at once."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from gateway.config import AdmissionConfig
from gateway.errors import GatewayError
from gateway.turns import next_in_turn


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
