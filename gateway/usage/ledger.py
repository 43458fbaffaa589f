"""The ledger of each client's spend: budget holds taken before a call and settled after it,
and the figures `GET /v1/usage` shows. `MemoryLedger` is the embedded one (one replica);
`redis_ledger.RedisLedger` keeps the same contract across replicas.

Money is counted in integer micro-dollars, so that sums are exact and Redis adds them atomically.
"""

from __future__ import annotations

import time
from typing import Protocol

import msgspec

from gateway.usage.periods import Periods

MICRO = 1_000_000


def micro(usd: float) -> int:
    return round(usd * MICRO)


class Budgets(msgspec.Struct, frozen=True):
    """A client's budgets in micro-dollars (0: none)."""

    day: int = 0
    month: int = 0


class Refusal(msgspec.Struct, frozen=True):
    """A hold refused: the period whose budget it would pass, and what was spent and held."""

    period: str
    spent: int
    held: int


class Spend(msgspec.Struct, frozen=True):
    """One settled call: what it made and what it cost."""

    model: str
    cost: int
    images: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    calls: int = 1


class ModelFigures(msgspec.Struct):
    calls: int = 0
    images: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost: int = 0


class PeriodFigures(msgspec.Struct):
    spent: int = 0
    held: int = 0
    models: dict[str, ModelFigures] = msgspec.field(default_factory=dict)

    def add(self, spend: Spend) -> None:
        figures = self.models.setdefault(spend.model, ModelFigures())
        figures.calls += spend.calls
        figures.images += spend.images
        figures.input_tokens += spend.input_tokens
        figures.output_tokens += spend.output_tokens
        figures.cost += spend.cost
        self.spent += spend.cost


class Figures(msgspec.Struct):
    day: PeriodFigures
    month: PeriodFigures


class Ledger(Protocol):
    async def hold(
        self,
        client: str,
        hold_id: str,
        amount: int,
        budgets: Budgets,
        periods: Periods,
        ttl_s: float,
    ) -> Refusal | None:
        """Hold `amount` against the client's budgets, atomically with every other replica's
        holds: None when held, the refusal when it would pass a budget. An unsettled hold
        lapses after `ttl_s` (its replica died mid-call)."""
        ...

    async def settle(
        self, client: str, hold_id: str, spend: Spend | None, periods: Periods, once_s: float
    ) -> bool:
        """Let the hold go (if any: "" holds nothing) and count `spend` (None: count nothing).
        With `once_s`, a hold id settles once within that many seconds: a task run again after
        a lost worker is not counted twice. False when it had been settled already."""
        ...

    async def figures(self, client: str, periods: Periods) -> Figures:
        """The client's spend, held amounts and counts per model, today and this month."""
        ...


class _Hold(msgspec.Struct):
    amount: int
    day: str
    month: str
    expires: float


class MemoryLedger:
    """The embedded ledger: one replica's, gone with it. Each call is one step of the event
    loop, so holds are as atomic here as the Lua scripts make them on Redis."""

    def __init__(self) -> None:
        self._periods: dict[tuple[str, str], PeriodFigures] = {}
        self._holds: dict[tuple[str, str], _Hold] = {}
        self._settled: dict[tuple[str, str], float] = {}

    def _period(self, client: str, name: str) -> PeriodFigures:
        return self._periods.setdefault((client, name), PeriodFigures())

    def _sweep(self, now: float) -> None:
        for key, hold in list(self._holds.items()):
            if hold.expires <= now:
                self._release(key)
        for key, until in list(self._settled.items()):
            if until <= now:
                del self._settled[key]

    def _release(self, key: tuple[str, str]) -> None:
        hold = self._holds.pop(key, None)
        if hold is not None:
            self._period(key[0], hold.day).held -= hold.amount
            self._period(key[0], hold.month).held -= hold.amount

    async def hold(
        self,
        client: str,
        hold_id: str,
        amount: int,
        budgets: Budgets,
        periods: Periods,
        ttl_s: float,
    ) -> Refusal | None:
        now = time.time()
        self._sweep(now)
        for name, period, budget in (
            ("day", periods.day, budgets.day),
            ("month", periods.month, budgets.month),
        ):
            figures = self._period(client, period)
            if budget and figures.spent + figures.held + amount > budget:
                return Refusal(name, figures.spent, figures.held)
        self._holds[(client, hold_id)] = _Hold(amount, periods.day, periods.month, now + ttl_s)
        self._period(client, periods.day).held += amount
        self._period(client, periods.month).held += amount
        return None

    async def settle(
        self, client: str, hold_id: str, spend: Spend | None, periods: Periods, once_s: float
    ) -> bool:
        now = time.time()
        if hold_id and once_s:
            self._sweep(now)
            if (client, hold_id) in self._settled:
                return False
            self._settled[(client, hold_id)] = now + once_s
        if hold_id:
            self._release((client, hold_id))
        if spend is not None:
            self._period(client, periods.day).add(spend)
            self._period(client, periods.month).add(spend)
        return True

    async def figures(self, client: str, periods: Periods) -> Figures:
        self._sweep(time.time())
        day = self._period(client, periods.day)
        month = self._period(client, periods.month)
        return Figures(msgspec.structs.replace(day), msgspec.structs.replace(month))
