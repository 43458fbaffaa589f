"""The ledger on Redis, shared by every replica: a hold is one Lua script (`lua/hold.lua`)
that checks the client's spent and held amounts and adds its own in one step, so no two
replicas can both take the last of a budget; a settle (`lua/settle.lua`) lets it go and counts.

Every key of one client shares its hash tag, so each script runs on one Redis Cluster slot.
Calls go through the task store's `observed` wrappers: a hold waits `tasks.store_timeout_s` at
most, on the caller's path, and an unreachable Redis is `StoreUnavailable`. A hold is fenced
(`tasks/redis/lua/fence.lua`): one that Redis runs only after its caller gave up (a hung Redis,
resumed) holds nothing, since that call went on unchecked (or was refused) and would never
settle it; else it would keep that much of the budget from the client until it lapsed.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from gateway.tasks.models import TaskStore
from gateway.tasks.redis.observed import Observer, giving_up_at, store_call, store_wait
from gateway.tasks.redis.scripts import script
from gateway.tasks.redis.store import RedisStore
from gateway.usage.ledger import (
    Budgets,
    Figures,
    Ledger,
    MemoryLedger,
    ModelFigures,
    PeriodFigures,
    Refusal,
    Spend,
)
from gateway.usage.periods import Periods

# How long a day's and a month's figures are kept after their last write: a month and more,
# a year and more, so that last month's can still be read.
_DAY_KEEP_S = 40 * 86400
_MONTH_KEEP_S = 400 * 86400
_COUNTS = frozenset(("calls", "images", "input_tokens", "output_tokens", "cost"))


def _script(name: str) -> str:
    return resources.files(__package__).joinpath("lua", f"{name}.lua").read_text()


_HOLD = script("fence") + _script("holds") + _script("hold")
_SETTLE = _script("holds") + _script("settle")


class UsageKeys:
    """Every key of a client's usage and budget, under the hash tag `{usage:<client>}`."""

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix

    def _key(self, client: str, rest: str) -> str:
        return f"{self._prefix}:{{usage:{client}}}:{rest}"

    def periods(self, client: str, periods: Periods) -> list[str]:
        """Hashes of the client's day and month: "spent", "<model>|<count>"."""
        return [self._key(client, f"d:{periods.day}"), self._key(client, f"m:{periods.month}")]

    def holds(self, client: str) -> list[str]:
        return [self._key(client, name) for name in ("holds", "hold-expiry", "held")]

    def settled(self, client: str) -> str:
        return self._key(client, "settled")


class RedisLedger:
    def __init__(self, store: RedisStore, prefix: str) -> None:
        # The task store's client, readiness and metrics (`observed.py` reads them from here).
        self._store = store
        self._clock = store.clock
        self._redis: Any = store.redis
        self.observe: Observer = store.observe
        self.deadline_s: float = store.deadline_s
        self._keys = UsageKeys(prefix)
        self._hold = self._redis.register_script(_HOLD)
        self._settle = self._redis.register_script(_SETTLE)

    @property
    def ready(self) -> bool:
        return bool(self._store.ready)

    async def get_ready(self) -> None:
        await self._store.get_ready()

    @store_call
    async def hold(
        self,
        client: str,
        hold_id: str,
        amount: int,
        budgets: Budgets,
        periods: Periods,
        ttl_s: float,
    ) -> Refusal | None:
        keys = [*self._keys.periods(client, periods), *self._keys.holds(client)]
        args = [
            hold_id,
            amount,
            budgets.day,
            budgets.month,
            int(ttl_s * 1000),
            periods.day,
            periods.month,
            int(ttl_s) + 86400,
            # A quarter of the deadline for the error of reading Redis's clock (`creation.py`).
            await self._clock.fence_ms(giving_up_at.get() - self.deadline_s / 4),
        ]
        refused = await self._hold(keys=keys, args=args)
        if refused is None:
            return None
        period, spent, held = refused
        return Refusal(period.decode(), int(spent), int(held))

    @store_wait
    async def settle(
        self, client: str, hold_id: str, spend: Spend | None, periods: Periods, once_s: float
    ) -> bool:
        keys = [
            *self._keys.periods(client, periods),
            *self._keys.holds(client),
            self._keys.settled(client),
        ]
        counted = spend or Spend(model="", cost=0)
        args = [
            hold_id,
            int(once_s * 1000),
            "1" if spend is not None else "0",
            counted.model,
            counted.cost,
            counted.images,
            counted.input_tokens,
            counted.output_tokens,
            _DAY_KEEP_S,
            _MONTH_KEEP_S,
        ]
        return bool(await self._settle(keys=keys, args=args))

    @store_call
    async def figures(self, client: str, periods: Periods) -> Figures:
        day_key, month_key = self._keys.periods(client, periods)
        held_key = self._keys.holds(client)[2]
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(day_key)
            pipe.hgetall(month_key)
            pipe.hmget(held_key, f"d:{periods.day}", f"m:{periods.month}")
            day, month, (day_held, month_held) = await pipe.execute()
        return Figures(_period(day, day_held), _period(month, month_held))


def _period(fields: dict[bytes, bytes], held: bytes | None) -> PeriodFigures:
    figures = PeriodFigures(spent=int(fields.pop(b"spent", 0)), held=int(held or 0))
    for field, value in fields.items():
        model, _, count = field.decode().rpartition("|")
        if model and count in _COUNTS:
            counts = figures.models.setdefault(model, ModelFigures())
            setattr(counts, count, int(value))
    return figures


def open_ledger(store: TaskStore, prefix: str) -> Ledger:
    """The ledger beside the task store: on its Redis when it is on Redis, else in memory."""
    return RedisLedger(store, prefix) if isinstance(store, RedisStore) else MemoryLedger()
