"""`GET /v1/usage`: the calling client's own figures, served by the gateway (never forwarded).

A named client sees its own usage today and this month, per model, with its budgets, what is
left and when each resets. A key in no client ("unnamed") is refused: unnamed keys share one
name, so their figures would be every unnamed caller's.
"""

from __future__ import annotations

import time

import msgspec
from aiohttp import web

from gateway.auth import AUTH
from gateway.config import CONFIG, UNNAMED
from gateway.errors import GatewayError, MethodNotAllowed
from gateway.usage.ledger import MICRO, PeriodFigures
from gateway.usage.meter import USAGE
from gateway.usage.periods import Periods, iso

USAGE_ROUTE = "/v1/usage"


class UsageNotKept(GatewayError):
    status = 403
    type = "invalid_request_error"
    code = "usage_not_kept"
    default_message = (
        "Usage is kept per named client ([clients.<name>] in the gateway's config); "
        "this key belongs to none."
    )


class _Model(msgspec.Struct):
    model: str
    calls: int
    images: int
    input_tokens: int
    output_tokens: int
    cost_usd: float


class _Period(msgspec.Struct):
    period: str
    start: str
    resets_at: str
    cost_usd: float
    held_usd: float
    budget_usd: float | None
    remaining_usd: float | None
    models: list[_Model]


class _Usage(msgspec.Struct):
    object: str
    client: str
    day: _Period
    month: _Period


_encode = msgspec.json.Encoder().encode


async def usage_view(request: web.Request) -> web.Response:
    if request.method not in ("GET", "HEAD"):
        raise MethodNotAllowed(f"{USAGE_ROUTE} is read with GET.", ("GET",))
    client = request.app[AUTH].client(request)
    config = request.app[CONFIG]
    if client == UNNAMED or client not in config.clients:
        raise UsageNotKept()
    budgets = config.clients[client]
    periods = Periods(time.time())
    figures = await request.app[USAGE].ledger.figures(client, periods)
    body = _Usage(
        object="usage",
        client=client,
        day=_period(periods.day, periods.day_ends, figures.day, budgets.daily_budget_usd),
        month=_period(periods.month, periods.month_ends, figures.month, budgets.monthly_budget_usd),
    )
    return web.Response(body=_encode(body), content_type="application/json")


def _period(name: str, ends: float, figures: PeriodFigures, budget_usd: float) -> _Period:
    spent = figures.spent / MICRO
    held = figures.held / MICRO
    models = [
        _Model(
            model=model,
            calls=counts.calls,
            images=counts.images,
            input_tokens=counts.input_tokens,
            output_tokens=counts.output_tokens,
            cost_usd=counts.cost / MICRO,
        )
        for model, counts in sorted(figures.models.items())
    ]
    return _Period(
        period=name,
        start=name,
        resets_at=iso(ends),
        cost_usd=spent,
        held_usd=held,
        budget_usd=budget_usd or None,
        remaining_usd=max(budget_usd - spent - held, 0.0) if budget_usd else None,
        models=models,
    )
