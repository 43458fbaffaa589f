"""Usage and budgets per named client (issue 21 item 1): prices, what a call asks for and what
its answer made, the ledger's holds on a real Redis (standalone and Cluster) and in memory, and
end to end through real gateways: every path refused over budget, a budget held under 50
concurrent callers on two replicas, GET /v1/usage, the metrics."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest

from gateway.auth import key_digest
from gateway.config import TasksConfig
from gateway.tasks import redis as redis_store
from gateway.tasks.redis.observed import unobserved
from gateway.usage.answer import AnswerMeter, Tokens
from gateway.usage.ask import Ask, ask_of
from gateway.usage.ledger import Budgets, Ledger, MemoryLedger, Spend
from gateway.usage.periods import Periods, iso
from gateway.usage.prices import PriceTable
from gateway.usage.redis_ledger import RedisLedger
from tests.conftest import Fake, GatewayFactory, Spawn
from tests.helpers import until_ended
from tests.redis_server import RedisServer

# --- prices -------------------------------------------------------------------------------


def test_a_price_is_looked_up_by_size_and_quality_then_size_then_quality_then_default() -> None:
    table = PriceTable(
        {"m": {"default": 1.0, "/high": 2.0, "big": 3.0, "big/high": 4.0}}, unpriced_image_usd=9.0
    )
    assert table.per_image("m", "big", "high") == 4.0
    assert table.per_image("m", "big", "low") == 3.0
    assert table.per_image("m", "small", "high") == 2.0
    assert table.per_image("m", None, None) == 2.0  # quality left to the upstream: the dearest
    assert table.per_image("m", "small", None) == 1.0
    assert table.per_image("m", "small", "low") == 1.0


def test_a_quality_left_to_the_upstream_or_spelt_in_capitals_is_never_priced_cheaper() -> None:
    # gpt-image answers "auto" (or no quality) with high quality as often as not: estimated at
    # the dearest the table names, a budget is never passed by leaving quality out.
    table = PriceTable(
        {"gpt-image-1": {"default": 0.042, "/low": 0.011, "/high": 0.167, "1536x1024/high": 0.25}},
        unpriced_image_usd=9.0,
    )
    assert table.per_image("gpt-image-1", None, None) == 0.167
    assert table.per_image("gpt-image-1", "auto", "auto") == 0.167
    assert table.per_image("gpt-image-1", "1536x1024", None) == 0.25
    assert table.per_image("GPT-IMAGE-1", "1536X1024", "HIGH") == 0.25
    assert table.per_image("gpt-image-1", None, "low") == 0.011


def test_a_model_missing_from_the_table_never_costs_nothing() -> None:
    told: list[str] = []
    table = PriceTable({"m": {"default": 1.0}}, unpriced_image_usd=0.2, on_unpriced=told.append)
    assert table.per_image("imagen-4", "1024x1024", None) == 0.2
    assert table.per_image(None, None, None) == 0.2
    assert told == ["imagen-4", ""]


# --- what a call asks for ---------------------------------------------------------------------


def test_a_json_call_asks_for_its_model_n_size_and_quality() -> None:
    body = json.dumps(
        {
            "model": "gpt-image-1",
            "prompt": "x" * 1000,
            "n": 3,
            "size": "1536x1024",
            "quality": "high",
        }
    ).encode()
    got = ask_of("/v1/images/generations", None, "application/json", body)
    assert got == Ask("gpt-image-1", 3, "1536x1024", "high")
    # Nonsense n is one image, a huge one OpenAI's cap; an unreadable body one image too.
    many = ask_of("/v1/images/generations", None, "application/json", b'{"model":"m","n":500}')
    assert many.images == 10
    assert ask_of("/v1/images/generations", "m", "application/json", b"{nope") == Ask(
        "m", 1, None, None
    )


def test_a_multipart_edit_asks_through_its_form_fields() -> None:
    boundary = "b0undary"
    parts = [
        ("image", b"\x89PNG" + b"\0" * 5000, 'filename="a.png"\r\nContent-Type: image/png'),
        ("model", b"gpt-image-1", None),
        ("n", b"2", None),
        ("quality", b"low", None),
    ]
    body = b""
    for name, value, extra in parts:
        head = f'Content-Disposition: form-data; name="{name}"'
        head += f"; {extra}" if extra else ""
        body += f"--{boundary}\r\n{head}\r\n\r\n".encode() + value + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    got = ask_of("/v1/images/edits", None, f"multipart/form-data; boundary={boundary}", body)
    assert got == Ask("gpt-image-1", 2, None, "low")


def test_an_n_the_upstream_may_read_as_many_images_is_held_as_many() -> None:
    """`n` as text, a float, twice, unquoted in a form, or unreadable: held as what the
    upstream may make of it (the most, when unreadable), never as one image."""
    route = "/v1/images/generations"
    for n in (b'"10"', b"10.0", b"1e1", b'1, "n": 10'):
        body = b'{"model": "gpt-image-1", "size": "1024x1024", "n": ' + n + b"}"
        assert ask_of(route, None, "application/json", body).images == 10, n
    for body in (b'{"n": true}', b'{"n": 2.5}', b'{"n": "2", "size": 5}'):
        assert ask_of(route, "m", "application/json", body).images == 10, body
    assert ask_of(route, "m", "application/json", b'{"n": "3"}').images == 3
    gemini = b'{"generationConfig": {"candidateCount": "4"}}'
    assert ask_of("/v1/models/{model}:generateContent", "g", "application/json", gemini).images == 4

    def form(*fields: bytes) -> bytes:
        parts = [b"--B\r\nContent-Disposition: form-data; " + f + b"\r\n" for f in fields]
        return b"".join(parts) + b"--B--\r\n"

    edits, mime = "/v1/images/edits", "multipart/form-data; boundary=B"
    assert ask_of(edits, "m", mime, form(b'name="n"\r\n\r\n1', b'name="n"\r\n\r\n7')).images == 7
    assert ask_of(edits, "m", mime, form(b"name=n\r\n\r\n6")).images == 6
    assert ask_of(edits, "m", mime, form(b'name="n"\r\n\r\nsix')).images == 10


def test_an_edit_is_priced_by_its_form_fields_never_by_text_inside_its_images() -> None:
    """An image whose bytes hold what looks like a form field (a cheaper model, low quality)
    is not read as one: the edit is priced as its real fields ask. Its tens of MB are not
    scanned either (a case-blind scan of 50 MB held the event loop 0.4 s)."""
    fake = b'\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-image-1-mini\r\n'
    fake += b'x--B\r\nContent-Disposition: form-data; name="quality"\r\n\r\nlow\r\n'
    image = b"\x89PNG" + fake + b"\0" * 50_000_000
    body = b"--B\r\n" + b'Content-Disposition: form-data; name="image"; filename="a.png"\r\n'
    body += b"Content-Type: image/png\r\n\r\n" + image + b"\r\n"
    for name, value in ((b"model", b"gpt-image-1"), (b"quality", b"high"), (b"n", b"2")):
        body += b'--B\r\nContent-Disposition: form-data; name="' + name + b'"\r\n\r\n'
        body += value + b"\r\n"
    body += b"--B--\r\n"
    started = time.perf_counter()
    got = ask_of("/v1/images/edits", None, "multipart/form-data; boundary=B", body)
    assert got == Ask("gpt-image-1", 2, None, "high")
    assert time.perf_counter() - started < 0.15


def test_a_gemini_call_asks_through_its_path_and_generation_config() -> None:
    route = "/v1beta/models/{model}:generateContent"
    body = json.dumps(
        {
            "contents": [{"parts": [{"text": "a cat"}]}],
            "generationConfig": {"candidateCount": 2, "imageConfig": {"imageSize": "4K"}},
        }
    ).encode()
    got = ask_of(route, "gemini-3-pro-image-preview", "application/json", body)
    assert got == Ask("gemini-3-pro-image-preview", 2, "4K", None)
    assert ask_of(route, "gemini-2.5-flash-image", "application/json", b"{}").images == 1


# --- what an answer made ----------------------------------------------------------------------


def _answer(images: int, image_bytes: int = 30_000) -> bytes:
    data = [{"b64_json": base64.b64encode(b"\0" * image_bytes).decode()} for _ in range(images)]
    usage = {"input_tokens": 12, "output_tokens": 4160, "total_tokens": 4172}
    return json.dumps({"created": 1, "data": data, "usage": usage}).encode()


@pytest.mark.parametrize("chunk", [1, 7, 1000, 65536, 10**7])
def test_an_answer_s_images_and_tokens_are_read_as_it_streams_past(chunk: int) -> None:
    body = _answer(3)
    meter = AnswerMeter()
    for start in range(0, len(body), chunk):
        meter.feed(body[start : start + chunk])
    assert meter.images == 3
    assert meter.tokens == Tokens(input=12, output=4160)


def test_a_streamed_answer_s_partial_images_are_not_counted_as_images() -> None:
    """`partial_images: 2` streams two previews before the image; one image was made."""
    image = base64.b64encode(b"\0" * 3000).decode()
    events = [
        {"type": "image_generation.partial_image", "b64_json": image, "partial_image_index": i}
        for i in range(2)
    ]
    events.append({"type": "image_generation.completed", "b64_json": image, "usage": {}})
    body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    meter = AnswerMeter()
    for start in range(0, len(body), 1000):
        meter.feed(body[start : start + 1000])
    assert meter.images == 1


def test_a_gemini_answer_s_inline_images_and_usage_metadata_are_read() -> None:
    body = json.dumps(
        {
            "candidates": [
                {"content": {"parts": [{"inlineData": {"mimeType": "image/png", "data": "QUJD"}}]}}
            ]
            * 2,
            "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 1290},
        }
    ).encode()
    meter = AnswerMeter()
    meter.feed(body)
    assert meter.images == 2
    assert meter.tokens == Tokens(input=10, output=1290)


def test_an_error_answer_names_no_images_and_no_tokens() -> None:
    meter = AnswerMeter()
    meter.feed(b'{"error": {"message": "no", "type": "x", "code": "y"}}')
    assert meter.images is None
    assert meter.tokens is None


# --- periods ----------------------------------------------------------------------------------


def test_a_day_ends_at_utc_midnight_and_a_month_on_the_first() -> None:
    periods = Periods(1_798_761_599.0)  # 2026-12-31T23:59:59Z
    assert (periods.day, periods.month) == ("2026-12-31", "2026-12")
    assert iso(periods.day_ends) == "2027-01-01T00:00:00Z"
    assert iso(periods.month_ends) == "2027-01-01T00:00:00Z"
    assert iso(Periods(1_770_000_000.0).month_ends) == "2026-03-01T00:00:00Z"  # in February


# --- the ledger -------------------------------------------------------------------------------


@pytest.fixture
async def ledgers(store: dict[str, Any]) -> AsyncIterator[tuple[Ledger, Ledger]]:
    """Two ledgers over one store, as two replicas have: on Redis two clients of their own."""
    if not store:
        one = MemoryLedger()
        yield one, one
        return
    config = TasksConfig(**store)
    stores = [redis_store.connect(config, unobserved) for _ in range(2)]
    try:
        first, second = (RedisLedger(s, config.key_prefix) for s in stores)
        yield first, second
    finally:
        for s in stores:
            await s.redis.aclose()


async def test_holds_never_pass_a_budget_however_many_race_on_two_replicas(
    ledgers: tuple[Ledger, Ledger],
) -> None:
    """50 calls of $0.167 race for a $2 daily budget from two replicas: 11 get it (11 x 0.167
    = 1.837; a 12th would pass 2.0), whoever asks first."""
    periods = Periods(time.time())
    budgets = Budgets(day=2_000_000)
    client = f"c{uuid.uuid4().hex[:6]}"
    holds = await asyncio.gather(
        *(ledgers[i % 2].hold(client, f"h{i}", 167_000, budgets, periods, 60) for i in range(50))
    )
    held = [i for i, refused in enumerate(holds) if refused is None]
    assert len(held) == 11
    refused = next(r for r in holds if r is not None)
    assert refused.period == "day"
    # Settled at what they cost (one made nothing: an error answer); the figures add up.
    for n, i in enumerate(held):
        spend = Spend("gpt-image-1", 0 if n == 0 else 167_000, images=0 if n == 0 else 1)
        assert await ledgers[i % 2].settle(client, f"h{i}", spend, periods, 3600)
    figures = await ledgers[0].figures(client, periods)
    assert figures.day.spent == 10 * 167_000
    assert figures.day.held == 0
    assert figures.day.models["gpt-image-1"].calls == 11
    assert figures.day.models["gpt-image-1"].images == 10
    assert figures.month.spent == figures.day.spent
    # The freed amount is there to hold again.
    assert await ledgers[1].hold(client, "again", 167_000, budgets, periods, 60) is None


async def test_a_hold_settles_once_and_a_dead_replica_s_hold_lapses(
    ledgers: tuple[Ledger, Ledger],
) -> None:
    periods = Periods(time.time())
    budgets = Budgets(day=1_000_000, month=5_000_000)
    client = f"c{uuid.uuid4().hex[:6]}"
    assert await ledgers[0].hold(client, "task_a", 600_000, budgets, periods, 3600) is None
    spend = Spend("m", 600_000, images=1)
    assert await ledgers[0].settle(client, "task_a", spend, periods, 3600)
    # A task run again after a lost worker settles again: not counted twice.
    assert not await ledgers[1].settle(client, "task_a", spend, periods, 3600)
    assert (await ledgers[1].figures(client, periods)).day.spent == 600_000
    # A replica that died mid-call never settles; its hold lapses and the budget is free again.
    assert await ledgers[0].hold(client, "lost", 400_000, budgets, periods, 0.3) is None
    refused = await ledgers[1].hold(client, "next", 400_000, budgets, periods, 60)
    assert refused is not None
    assert refused.held == 400_000
    await asyncio.sleep(0.5)
    assert await ledgers[1].hold(client, "next", 400_000, budgets, periods, 60) is None


async def test_a_monthly_budget_is_held_as_a_daily_one(ledgers: tuple[Ledger, Ledger]) -> None:
    periods = Periods(time.time())
    client = f"c{uuid.uuid4().hex[:6]}"
    budgets = Budgets(month=100_000)
    assert await ledgers[0].hold(client, "a", 100_000, budgets, periods, 60) is None
    refused = await ledgers[1].hold(client, "b", 1, budgets, periods, 60)
    assert refused is not None
    assert refused.period == "month"
    # Released without being counted (the call never ran): nothing spent.
    assert await ledgers[1].settle(client, "a", None, periods, 0)
    assert (await ledgers[0].figures(client, periods)).month.spent == 0
    assert await ledgers[1].hold(client, "b", 1, budgets, periods, 60) is None


# --- end to end -------------------------------------------------------------------------------

DESIGN_KEY = "sk-client-design"
OPS_KEY = "sk-client-ops"
UNNAMED_KEY = "sk-client-unnamed"
DESIGN = {"Authorization": f"Bearer {DESIGN_KEY}"}
OPS = {"Authorization": f"Bearer {OPS_KEY}"}
# Test prices: a round $0.10 an image, a high-quality square one $0.167.
PRICES = {
    "gpt-image-1": {"default": 0.1, "1024x1024/high": 0.167},
    "gemini-2.5-flash-image": {"default": 0.1},
}
IMAGE = {"model": "gpt-image-1", "prompt": "a lighthouse at dusk"}


def _clients(daily_usd: float = 0.0) -> dict[str, Any]:
    return {
        "design": {"key_sha256": [key_digest(DESIGN_KEY)], "daily_budget_usd": daily_usd},
        "ops": {"key_sha256": [key_digest(OPS_KEY)]},
    }


def _sections(store: dict[str, Any], daily_usd: float = 0.0) -> dict[str, Any]:
    return {
        "tasks": store,
        "auth": {"upstream_api_key": "sk-upstream", "client_key_sha256": [key_digest(UNNAMED_KEY)]},
        "clients": _clients(daily_usd),
        "prices": PRICES,
    }


async def _usage(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> Any:
    async with http.get(f"{url}/v1/usage", headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def _settled(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> Any:
    """The client's figures once nothing is held: every call under way has settled."""
    deadline = time.monotonic() + 10
    while True:
        usage = await _usage(http, url, headers)
        if usage["day"]["held_usd"] == 0 or time.monotonic() > deadline:
            return usage
        await asyncio.sleep(0.05)


def _assert_over_budget(status: int, headers: Any, body: Any) -> None:
    assert status == 429
    assert body["error"]["code"] == "budget_exceeded"
    tomorrow = iso(Periods(time.time()).day_ends)
    assert tomorrow in body["error"]["message"]
    assert headers["x-should-retry"] == "false"
    assert 0 < int(headers["Retry-After"]) <= 86401
    assert abs(time.time() + int(headers["Retry-After"]) - Periods(time.time()).day_ends) < 5


@pytest.mark.parametrize("store", ["memory", "redis"], indirect=True)
async def test_every_path_spends_the_budget_and_is_refused_past_it(
    gateway_factory: GatewayFactory, fake: Fake, store: dict[str, Any], http: aiohttp.ClientSession
) -> None:
    """$0.35 a day at $0.10 an image: a plain call, an async task and an SDK call (run once)
    spend $0.30; an upstream error spends nothing; then each path, Gemini's too, is refused
    with 429 budget_exceeded and the reset time, and the upstream sees none of them."""
    gw = await gateway_factory(**_sections(store, daily_usd=0.35))
    url = f"{gw.url}/v1/images/generations"
    async with http.post(url, json=IMAGE, headers=DESIGN) as resp:
        assert resp.status == 200
    async with http.post(url, json=IMAGE, headers={**DESIGN, "X-Fake-Fault": "500"}) as resp:
        assert resp.status == 500  # the upstream's error: costs nothing
    async with http.post(url, json=IMAGE, headers={**DESIGN, "Prefer": "respond-async"}) as resp:
        assert resp.status == 202
        task_id = (await resp.json())["id"]
    [task] = await until_ended(http, f"{gw.url}/v1/tasks/{task_id}", key=DESIGN)
    assert task["status"] == "completed"
    async with openai.AsyncOpenAI(
        base_url=f"{gw.url}/v1", api_key=DESIGN_KEY, max_retries=2
    ) as sdk:
        await sdk.images.generate(model="gpt-image-1", prompt="a lighthouse")
        usage = await _settled(http, gw.url, DESIGN)
        assert usage["day"]["cost_usd"] == pytest.approx(0.3)
        calls_before = fake.stats.requests
        with pytest.raises(openai.RateLimitError) as refused:
            await sdk.images.generate(model="gpt-image-1", prompt="a lighthouse")
    response = refused.value.response
    _assert_over_budget(response.status_code, response.headers, response.json())
    async with http.post(url, json=IMAGE, headers=DESIGN) as resp:
        _assert_over_budget(resp.status, resp.headers, await resp.json())
    async with http.post(url, json=IMAGE, headers={**DESIGN, "Prefer": "respond-async"}) as resp:
        _assert_over_budget(resp.status, resp.headers, await resp.json())
    gemini = f"{gw.url}/v1beta/models/gemini-2.5-flash-image:generateContent"
    body = {"contents": [{"parts": [{"text": "a lighthouse"}]}]}
    async with http.post(gemini, json=body, headers={"x-goog-api-key": DESIGN_KEY}) as resp:
        _assert_over_budget(resp.status, resp.headers, await resp.json())
    # Refused before anything went upstream; the SDK did not retry the refusal either.
    assert fake.stats.requests == calls_before
    # Another client, without a budget, is not held back.
    async with http.post(url, json=IMAGE, headers=OPS) as resp:
        assert resp.status == 200
    assert gw.sample("gateway_budget_refusals_total", client="design", period="day") == 4


async def test_usage_shows_a_client_its_own_figures_only(
    gateway_factory: GatewayFactory, fake: Fake, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(**_sections({}, daily_usd=5.0))
    url = f"{gw.url}/v1/images/generations"
    high = {**IMAGE, "n": 2, "size": "1024x1024", "quality": "high"}
    async with http.post(url, json=high, headers=DESIGN) as resp:
        assert resp.status == 200
    async with http.post(url, json=IMAGE, headers=DESIGN) as resp:
        assert resp.status == 200
    async with http.post(url, json=IMAGE, headers=OPS) as resp:
        assert resp.status == 200
    design = await _settled(http, gw.url, DESIGN)
    assert design["client"] == "design"
    [model] = design["day"]["models"]
    assert model == {
        "model": "gpt-image-1",
        "calls": 2,
        "images": 3,
        # The stand-in's gpt-image `usage`: 12 in, 4160 out, per call.
        "input_tokens": 24,
        "output_tokens": 8320,
        "cost_usd": pytest.approx(2 * 0.167 + 0.1),
    }
    assert design["day"]["budget_usd"] == 5.0
    assert design["day"]["remaining_usd"] == pytest.approx(5.0 - 0.434)
    assert design["day"]["resets_at"] == iso(Periods(time.time()).day_ends)
    assert design["month"]["cost_usd"] == pytest.approx(0.434)
    assert design["month"]["budget_usd"] is None
    ops = await _settled(http, gw.url, OPS)
    assert ops["client"] == "ops"
    assert [m["calls"] for m in ops["day"]["models"]] == [1]
    # A key in no client is told so, not shown every unnamed caller's figures.
    async with http.get(
        f"{gw.url}/v1/usage", headers={"Authorization": f"Bearer {UNNAMED_KEY}"}
    ) as resp:
        assert resp.status == 403
        assert (await resp.json())["error"]["code"] == "usage_not_kept"
    # The gateway's own route: never forwarded upstream, whatever the method.
    async with http.post(f"{gw.url}/v1/usage", json={}, headers=DESIGN) as resp:
        assert resp.status == 405
    async with http.get(f"{gw.url}/v1/usage", headers={"Authorization": "Bearer nope"}) as resp:
        assert resp.status == 401
    assert not any("usage" in path for path in fake.stats.by_path)
    # The metrics, labelled by client.
    labels = {"client": "design", "model": "gpt-image-1"}
    assert gw.sample("gateway_client_calls_total", **labels) == 2
    assert gw.sample("gateway_client_images_total", **labels) == 3
    assert gw.sample("gateway_client_tokens_total", **labels, kind="output") == 8320
    assert gw.sample("gateway_client_cost_usd_total", **labels) == pytest.approx(0.434)
    assert gw.sample("gateway_client_calls_total", client="ops", model="gpt-image-1") == 1


def _replica_config(fake: Fake, redis: Any, prefix: str, daily_usd: float) -> str:
    design = key_digest(DESIGN_KEY)
    return "\n".join(
        [
            "[upstream]",
            f"url = '{fake.url}/v1'",
            "[tasks]",
            f"redis_url = '{redis.url}'",
            f"key_prefix = '{prefix}'",
            "[auth]",
            "upstream_api_key = 'sk-upstream'",
            "[clients.design]",
            f"key_sha256 = ['{design}']",
            f"daily_budget_usd = {daily_usd}",
            '[prices."gpt-image-1"]',
            "default = 0.1",
            '"1024x1024/high" = 0.167',
        ]
    )


async def test_a_budget_holds_under_50_concurrent_callers_on_two_replicas(
    spawn: Spawn, fake: Fake, redis_server: Any, http: aiohttp.ClientSession
) -> None:
    """50 callers at once, half on each replica, each a $0.167 image against a $1.00 day, by
    every way in: plain calls, async tasks and OpenAI SDK calls (run once, with the SDK's
    retries). What is spent stays within the budget and one call's price (here, holds being
    exact: within the budget), and the upstream sees only the calls that were let through."""
    config = _replica_config(fake, redis_server, f"usage-{uuid.uuid4().hex[:8]}", 1.0)
    _, first = await spawn(config)
    _, second = await spawn(config)
    high = {**IMAGE, "size": "1024x1024", "quality": "high"}
    slow = {**DESIGN, "X-Fake-Latency": "0.3"}
    sdks = [
        openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=DESIGN_KEY, default_headers=slow)
        for url in (first, second)
    ]

    async def call(i: int) -> tuple[int, str | None]:
        url = (first, second)[i % 2]
        if i % 3 == 2:
            try:
                await sdks[i % 2].images.generate(
                    model="gpt-image-1", prompt="x", size="1024x1024", quality="high"
                )
            except openai.RateLimitError as refused:
                return 429, refused.code
            return 200, None
        headers = {**slow, "Prefer": "respond-async"} if i % 3 == 1 else slow
        async with http.post(f"{url}/v1/images/generations", json=high, headers=headers) as resp:
            body = await resp.json()
            return resp.status, body["id"] if resp.status == 202 else body.get("error", {}).get(
                "code"
            )

    answers = await asyncio.gather(*(call(i) for i in range(50)))
    for sdk in sdks:
        await sdk.close()
    made = [answer for answer in answers if answer[0] in (200, 202)]
    refused = [answer for answer in answers if answer[0] not in (200, 202)]
    assert {code for _, code in refused} == {"budget_exceeded"}
    tasks = [f"{first}/v1/tasks/{task_id}" for status, task_id in made if status == 202]
    await until_ended(http, *tasks, key=DESIGN)
    spent = (await _settled(http, first, DESIGN))["day"]["cost_usd"]
    assert spent <= 1.0 + 0.167
    assert spent == pytest.approx(len(made) * 0.167)
    assert len(made) == 5  # holds are exact: a sixth ($1.002) would pass the budget
    assert fake.stats.requests == len(made)
    assert (await _usage(http, second, DESIGN))["day"]["cost_usd"] == pytest.approx(spent)


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_a_budgeted_call_while_redis_is_down_goes_through_or_is_refused_as_configured(
    gateway_factory: GatewayFactory, tmp_path: Any, http: aiohttp.ClientSession, mode: str
) -> None:
    """Redis down: by default (open) a budgeted client's plain call goes upstream as it would
    without the gateway, counted as unchecked; "closed" refuses it, retryable. A client
    without a budget is never held up."""
    redis = RedisServer(tmp_path)
    try:
        sections = _sections({"redis_url": redis.url, "key_prefix": "down"}, daily_usd=5.0)
        gw = await gateway_factory(**sections, usage={"budget_store_down": mode})
        redis.stop()
        url = f"{gw.url}/v1/images/generations"
        async with http.post(url, json=IMAGE, headers=DESIGN) as resp:
            if mode == "open":
                assert resp.status == 200
            else:
                assert resp.status == 503
                assert (await resp.json())["error"]["code"] == "store_unavailable"
                assert resp.headers["x-should-retry"] == "true"
        async with http.post(url, json=IMAGE, headers=OPS) as resp:
            assert resp.status == 200
        expected = 1 if mode == "open" else 0
        assert gw.sample("gateway_budget_unchecked_total", client="design") == expected
    finally:
        redis.stop()


async def test_while_redis_hangs_a_budgeted_call_does_not_wait_on_it_each_time(
    gateway_factory: GatewayFactory, tmp_path: Any, http: aiohttp.ClientSession
) -> None:
    """Once the background check has found Redis hung (/readyz says so), a budgeted call goes
    through unchecked at once, as a plain call would without the gateway. Before, each one
    waited out tasks.store_timeout_s (2 s) for a hold Redis would never answer."""
    redis = RedisServer(tmp_path)
    try:
        gw = await gateway_factory(**_sections({"redis_url": redis.url, "key_prefix": "hung"}, 5.0))
        url = f"{gw.url}/v1/images/generations"
        redis.proc.send_signal(signal.SIGSTOP)
        try:
            for _ in range(100):  # the check runs once a second
                async with http.get(f"{gw.url}/readyz") as resp:
                    if resp.status == 503:
                        break
                await asyncio.sleep(0.1)
            started = time.monotonic()
            for _ in range(3):
                async with http.post(url, json=IMAGE, headers=DESIGN) as resp:
                    assert resp.status == 200
            assert time.monotonic() - started < 1.5  # three calls, not 3 x 2 s
            assert gw.sample("gateway_budget_unchecked_total", client="design") == 3
        finally:
            redis.proc.send_signal(signal.SIGCONT)
    finally:
        redis.stop()


async def test_a_hold_redis_runs_after_its_caller_gave_up_keeps_nothing_of_the_budget(
    gateway_factory: GatewayFactory, tmp_path: Any, http: aiohttp.ClientSession
) -> None:
    """Redis hangs (SIGSTOP) under a budgeted call: the call goes on unchecked after
    store_timeout_s, and once Redis resumes, the hold it ran late holds nothing, so the client
    has the rest of its budget. Before, that hold kept $0.10 of the $0.05 left of a $0.25 day
    from the client (its next call refused) until it lapsed, the call's deadline and a minute
    later."""
    redis = RedisServer(tmp_path)
    try:
        store = {"redis_url": redis.url, "key_prefix": "late", "store_timeout_s": 0.5}
        gw = await gateway_factory(**_sections(store, daily_usd=0.25))
        url = f"{gw.url}/v1/images/generations"
        async with http.post(url, json=IMAGE, headers=DESIGN) as resp:
            assert resp.status == 200  # checked and held: Redis has the hold script now
        redis.proc.send_signal(signal.SIGSTOP)
        try:
            async with http.post(url, json=IMAGE, headers=DESIGN) as resp:
                assert resp.status == 200  # unchecked: budget_store_down = open
        finally:
            redis.proc.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 10
        while (await _usage(http, gw.url, DESIGN))["day"]["cost_usd"] < 0.15:
            assert time.monotonic() < deadline, "the unchecked call was never counted"
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # Redis has long run whatever it had been sent
        usage = await _usage(http, gw.url, DESIGN)
        assert usage["day"]["cost_usd"] == pytest.approx(0.2)
        assert usage["day"]["held_usd"] == 0
        assert usage["day"]["remaining_usd"] == pytest.approx(0.05)
    finally:
        redis.proc.send_signal(signal.SIGCONT)
        redis.stop()


async def test_a_caller_gone_while_waiting_for_admission_pays_nothing(
    gateway_factory: GatewayFactory, fake: Fake, http: aiohttp.ClientSession
) -> None:
    """A budgeted caller that hangs up while its call waits for an upstream slot (admission)
    made no call: nothing is counted and its hold goes. Before, it was billed the estimate as if
    the upstream had been sent the call."""
    gw = await gateway_factory(
        **_sections({}, daily_usd=1.0), admission={"model_concurrency": {"gpt-image-1": 1}}
    )
    url = f"{gw.url}/v1/images/generations"
    slow = {**OPS, "X-Fake-Latency": "1.5"}
    busy = asyncio.create_task(http.post(url, json=IMAGE, headers=slow))
    while fake.stats.running == 0:
        await asyncio.sleep(0.01)
    gone = aiohttp.ClientTimeout(total=0.3)  # hangs up while its call waits for the slot
    with pytest.raises(TimeoutError):
        await http.post(url, json=IMAGE, headers=DESIGN, timeout=gone)
    (await busy).release()
    await asyncio.sleep(0.3)  # the gone caller's settle, off its path
    usage = await _settled(http, gw.url, DESIGN)
    assert usage["day"]["cost_usd"] == 0
    assert usage["day"]["models"] == []
    assert fake.stats.requests == 1


async def test_a_cancelled_queued_task_gives_its_budget_back(
    gateway_factory: GatewayFactory, redis_server: Any, http: aiohttp.ClientSession
) -> None:
    """A task waiting for a worker holds its estimate; cancelled before any worker took it,
    it never costs anything, so the budget it held is free again at once."""
    store = {"redis_url": redis_server.url, "key_prefix": f"cancel-{uuid.uuid4().hex[:8]}"}
    gw = await gateway_factory(**_sections({**store, "workers": 0}, daily_usd=0.15))
    url = f"{gw.url}/v1/images/generations"
    queued = {**DESIGN, "Prefer": "respond-async"}
    async with http.post(url, json=IMAGE, headers=queued) as resp:
        assert resp.status == 202
        task_id = (await resp.json())["id"]
    async with http.post(url, json=IMAGE, headers=queued) as resp:
        assert resp.status == 429  # $0.10 held, $0.10 more would pass $0.15
    async with http.delete(f"{gw.url}/v1/tasks/{task_id}", headers=DESIGN) as resp:
        assert (await resp.json())["status"] == "cancelled"
    usage = await _settled(http, gw.url, DESIGN)
    assert usage["day"]["cost_usd"] == 0
    async with http.post(url, json=IMAGE, headers=queued) as resp:
        assert resp.status == 202


async def test_n_as_text_cannot_spend_past_the_budget_by_being_held_as_one_image(
    gateway_factory: GatewayFactory, fake: Fake, http: aiohttp.ClientSession
) -> None:
    """$1.00 a day at $0.10 an image, ten concurrent calls each asking `"n": "10"` (which the
    upstream reads as 10 images): one is made, the others are refused, and the day's spend
    stays within the budget. Before, each was held as one image and all ten went: $10.00."""
    gw = await gateway_factory(**_sections({}, daily_usd=1.0))
    url = f"{gw.url}/v1/images/generations"
    ask = {**IMAGE, "n": "10"}

    async def call() -> int:
        async with http.post(url, json=ask, headers=DESIGN) as resp:
            await resp.read()
            return resp.status

    statuses = await asyncio.gather(*(call() for _ in range(10)))
    assert sorted(statuses) == [200] + [429] * 9
    usage = await _settled(http, gw.url, DESIGN)
    assert usage["day"]["cost_usd"] == pytest.approx(1.0)
    assert usage["day"]["models"][0]["images"] == 10


@pytest.mark.parametrize("api_version", ["v1beta", "v1"])
async def test_google_genai_spends_the_budget_and_is_refused_past_it(
    gateway_factory: GatewayFactory, fake: Fake, http: aiohttp.ClientSession, api_version: str
) -> None:
    """Nano Banana through google-genai: the image is counted as an image with Gemini's
    usageMetadata tokens, at the Gemini price; past the budget the SDK gets the 429."""
    from google import genai
    from google.genai import errors, types

    gw = await gateway_factory(**_sections({}, daily_usd=0.15))
    client = genai.Client(
        api_key=DESIGN_KEY,
        http_options=types.HttpOptions(base_url=gw.url, api_version=api_version),
    )

    def generate() -> Any:
        return client.models.generate_content(
            model="gemini-2.5-flash-image", contents="a lighthouse"
        )

    reply = await asyncio.to_thread(generate)
    assert reply.candidates
    [model] = (await _settled(http, gw.url, DESIGN))["day"]["models"]
    assert model == {
        "model": "gemini-2.5-flash-image",
        "calls": 1,
        "images": 1,
        "input_tokens": 10,
        "output_tokens": 1290,
        "cost_usd": pytest.approx(0.1),
    }
    with pytest.raises(errors.ClientError) as refused:
        await asyncio.to_thread(generate)
    assert refused.value.code == 429
    assert "budget" in str(refused.value)
    assert iso(Periods(time.time()).day_ends) in str(refused.value)
    assert sum(fake.stats.by_path.values()) == 1
