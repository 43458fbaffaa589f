"""The one object the gateway's paths call for usage and budgets: what a call is estimated at,
a hold on its client's budget before it goes upstream, and its settling once it is over.

Counting is on when the config names clients (`[clients.<name>]`): without, every caller is the
same "unnamed" and a plain call pays one attribute read here. A client without a budget pays no
ledger round trip on its call: its usage is written after its answer, off its path.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable

import msgspec
from aiohttp import web

from gateway.config import UNNAMED, Config
from gateway.errors import (
    BudgetExceeded,
    ResultTooLarge,
    StoreUnavailable,
    UpstreamBroken,
    UpstreamTimeout,
)
from gateway.logsafe import OncePer
from gateway.metrics import Metrics
from gateway.usage.answer import AnswerMeter, Tokens
from gateway.usage.ask import COUNTED_ROUTES, Ask, Body, ask_of
from gateway.usage.ledger import Budgets, Ledger, Refusal, Spend, micro
from gateway.usage.periods import Periods, iso
from gateway.usage.prices import PriceTable

logger = logging.getLogger(__name__)


class Hold(msgspec.Struct, frozen=True):
    """A call's hold on its client's budget: its id ("" when the ledger was not asked) and the
    estimate held."""

    id: str
    amount: int


NO_HOLD = Hold("", 0)
# Gateway failures of a call whose request had reached the upstream: billed there all the same.
SENT_FAILURES = frozenset(
    failure.code for failure in (UpstreamTimeout, UpstreamBroken, ResultTooLarge)
)


class Result(msgspec.Struct, frozen=True):
    """How a call ended, as far as its cost goes."""

    # The upstream's status; None when it gave no answer.
    status: int | None
    # Whether the request reached the upstream: without an answer it is billed all the same.
    sent: bool = True
    images: int | None = None
    tokens: Tokens | None = None


def answered(status: int, body: bytes) -> Result:
    """An answer in hand (a task's, a small one's): what it made."""
    seen = AnswerMeter()
    seen.feed(body)
    return Result(status, True, seen.images, seen.tokens)


class Meter:
    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        ledger: Ledger,
        store_reachable: Callable[[], bool] = lambda: True,
    ) -> None:
        self._prices = config.prices
        self._table = PriceTable(
            config.prices,
            config.usage.unpriced_image_usd,
            lambda model: self._metrics.unpriced_images(self.model_label(model)).inc(),
        )
        self._fail_open = config.usage.budget_store_down == "open"
        self._models = frozenset(config.timeouts.models) | frozenset(config.prices)
        self._metrics = metrics
        self.ledger = ledger
        # The store's last background check (once a second): while it failed, a hold is not
        # tried, so a hung Redis costs a budgeted call nothing rather than store_timeout_s each.
        self._store_reachable = store_reachable
        self._settling: set[asyncio.Task[None]] = set()
        self._unchecked_said = OncePer(60.0)
        self._unrecorded_said = OncePer(60.0)
        self.counting = bool(config.clients)
        self._budgets = {
            name: Budgets(micro(client.daily_budget_usd), micro(client.monthly_budget_usd))
            for name, client in config.clients.items()
            if client.daily_budget_usd or client.monthly_budget_usd
        }

    def model_label(self, model: str | None) -> str:
        """A bounded label and ledger field: configured models, else "other"."""
        return model if model in self._models else "other"

    def ask(self, route: str, model: str | None, content_type: str, body: Body) -> Ask | None:
        """What a counted call asks for; None when the call is not counted."""
        if not self.counting or route not in COUNTED_ROUTES:
            return None
        return ask_of(route, model, content_type, body)

    def estimate(self, ask: Ask, images: int | None = None) -> int:
        """`images` (the asked-for count by default) at the call's price, in micro-dollars."""
        if ask.chat and ask.model not in self._prices:
            return 0
        return micro(
            self._table.per_image(ask.model, ask.size, ask.quality) * (images or ask.images)
        )

    def cost(self, ask: Ask, result: Result) -> int:
        """What the call is taken to have cost: an upstream error answer nothing, an answer
        its images (or, if it names none, those asked for), no answer but a sent request the
        estimate (a timeout is billed upstream), nothing sent nothing."""
        if result.status is None:
            return self.estimate(ask) if result.sent else 0
        if result.status >= 400:
            return 0
        return self.estimate(ask, result.images)

    async def hold(self, client: str, ask: Ask, hold_id: str, ttl_s: float) -> Hold:
        """Hold the call's estimate on a budgeted client's budget (others: `NO_HOLD`, no
        round trip). Over budget: `BudgetExceeded`. Ledger unreachable: let through uncounted
        (`budget_store_down = "open"`), or `StoreUnavailable` ("closed")."""
        budgets = self._budgets.get(client)
        if budgets is None:
            return NO_HOLD
        amount = self.estimate(ask)
        periods = Periods(time.time())
        try:
            if not self._store_reachable():
                raise StoreUnavailable()
            refused = await self.ledger.hold(client, hold_id, amount, budgets, periods, ttl_s)
        except StoreUnavailable:
            if not self._fail_open:
                raise
            self._metrics.budget_unchecked(client).inc()
            if self._unchecked_said():
                logger.warning(
                    "task store unreachable: budgeted clients' calls go through unchecked "
                    "(usage.budget_store_down = open)"
                )
            return NO_HOLD
        if refused is not None:
            self._metrics.budget_refusals(client, refused.period).inc()
            raise _over_budget(refused, budgets, amount, periods)
        return Hold(hold_id, amount)

    def settle_soon(
        self, client: str, ask: Ask, hold_id: str, result: Result | None, once_s: float = 0.0
    ) -> None:
        """Count the call (metrics now, the ledger after: off the caller's path) and let its
        hold go (`hold_id`, "" for none; a task's id, settled once within `once_s`). `result`
        None: the call did not happen (only the hold goes)."""
        spend = None if result is None else self._count(client, ask, result)
        if client == UNNAMED or (spend is None and not hold_id):
            return  # no one reads an unnamed caller's ledger (`view.py`), nor holds for one
        self._settle_soon(client, hold_id, spend, once_s)

    def release(self, client: str, hold_id: str) -> None:
        """Let a hold go uncounted: its call was never made here."""
        if hold_id:
            self._settle_soon(client, hold_id, None, 0.0)

    def _settle_soon(self, client: str, hold_id: str, spend: Spend | None, once_s: float) -> None:
        task = asyncio.get_running_loop().create_task(self._settle(client, hold_id, spend, once_s))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    def _count(self, client: str, ask: Ask, result: Result) -> Spend:
        model = self.model_label(ask.model)
        cost = self.cost(ask, result)
        answered = result.status is not None and result.status < 400
        images = (result.images or ask.images) if answered and not ask.chat else 0
        tokens = result.tokens or Tokens()
        metrics = self._metrics
        metrics.client_calls(client, model).inc()
        if images:
            metrics.client_images(client, model).inc(images)
        if tokens.input:
            metrics.client_tokens(client, model, "input").inc(tokens.input)
        if tokens.output:
            metrics.client_tokens(client, model, "output").inc(tokens.output)
        if cost:
            metrics.client_cost(client, model).inc(cost / 1_000_000)
        return Spend(model, cost, images, tokens.input, tokens.output)

    async def _settle(self, client: str, hold_id: str, spend: Spend | None, once_s: float) -> None:
        try:
            await self.ledger.settle(client, hold_id, spend, Periods(time.time()), once_s)
        except StoreUnavailable:
            self._metrics.usage_unrecorded(client).inc()
            if self._unrecorded_said():
                logger.warning("task store unreachable: usage not recorded (its hold lapses)")
        except Exception:
            logger.exception("usage settle failed")

    async def ctx(self, app: web.Application) -> AsyncIterator[None]:
        """Settles still under way at shutdown are waited for (briefly): each is spend."""
        yield
        if self._settling:
            await asyncio.wait(set(self._settling), timeout=5.0)


def new_hold_id() -> str:
    return "call_" + secrets.token_urlsafe(12)


def _over_budget(
    refused: Refusal, budgets: Budgets, amount: int, periods: Periods
) -> BudgetExceeded:
    budget = budgets.day if refused.period == "day" else budgets.month
    resets = periods.ends(refused.period)
    when = "daily" if refused.period == "day" else "monthly"
    message = (
        f"This client's {when} budget of ${budget / 1e6:.2f} would be passed: "
        f"${refused.spent / 1e6:.4f} spent, ${refused.held / 1e6:.4f} held by calls under way, "
        f"this call estimated at ${amount / 1e6:.4f}. It resets at {iso(resets)}."
    )
    return BudgetExceeded(message, retry_after_s=max(1, int(resets - time.time()) + 1))


USAGE = web.AppKey("usage", Meter)
