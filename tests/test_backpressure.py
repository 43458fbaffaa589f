"""Backpressure for sync calls: a per-model limit, a fair queue per credential in front of it,
and 429 with Retry-After for a caller whose deadline passes while it waits."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from gateway.admission import CallerOverloaded, Overloaded
from gateway.errors import QueueFull
from tests.conftest import Fake, Gateway, GatewayFactory
from tests.helpers import GENERATE

TENANT_A = {"Authorization": "Bearer sk-tenant-a"}
TENANT_B = {"Authorization": "Bearer sk-tenant-b"}


@pytest.fixture
async def gateway(gateway_factory: GatewayFactory) -> Gateway:
    return await gateway_factory(admission={"model_concurrency": {"gpt-image-1": 1}})


async def _call(
    http: aiohttp.ClientSession, gateway: Gateway, headers: dict[str, str]
) -> tuple[int, dict[str, str], float]:
    async with http.post(
        f"{gateway.url}/v1/images/generations", json=GENERATE, headers=headers
    ) as resp:
        await resp.read()
        return resp.status, dict(resp.headers), time.monotonic()


async def test_one_tenants_flood_does_not_starve_another(
    gateway: Gateway, fake: Fake, http: aiohttp.ClientSession
) -> None:
    slow = {"X-Fake-Latency": "0.3"}
    flood = [asyncio.ensure_future(_call(http, gateway, {**TENANT_A, **slow})) for _ in range(4)]
    await fake.until_running()
    await asyncio.sleep(0.05)  # the rest of the flood is queued by now
    status, _, b_ended = await _call(http, gateway, {**TENANT_B, **slow})
    a_ends = sorted(ended for _, _, ended in await asyncio.gather(*flood))
    assert status == 200
    assert fake.stats.peak_running == 1  # the model's limit held
    # Round robin: B went right after the call that was running and the next of A's, not
    # behind all of A's queued calls.
    assert b_ended < a_ends[2]
    assert fake.stats.requests == 5


async def test_a_caller_still_waiting_at_its_deadline_gets_429(
    gateway: Gateway, fake: Fake, http: aiohttp.ClientSession
) -> None:
    holder = asyncio.ensure_future(_call(http, gateway, {**TENANT_A, "X-Fake-Latency": "2"}))
    await fake.until_running()
    started = time.monotonic()
    async with http.post(
        f"{gateway.url}/v1/images/generations",
        json=GENERATE,
        headers={**TENANT_B, "X-Request-Timeout": "0.5"},
    ) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "1"
        assert resp.headers["x-should-retry"] == "true"  # nothing was sent: safe to retry
        assert (await resp.json())["error"]["code"] == "gateway_overloaded"
    assert 0.4 < time.monotonic() - started < 1.5
    assert (await holder)[0] == 200
    assert fake.stats.requests == 1


async def test_the_waiting_queue_is_bounded(
    gateway_factory: GatewayFactory, fake: Fake, http: aiohttp.ClientSession
) -> None:
    gateway = await gateway_factory(
        admission={"model_concurrency": {"gpt-image-1": 1}, "max_waiting": 1}
    )
    slow = {"X-Fake-Latency": "0.5"}
    holder = asyncio.ensure_future(_call(http, gateway, {**TENANT_A, **slow}))
    await fake.until_running()
    waiter = asyncio.ensure_future(_call(http, gateway, {**TENANT_A, **slow}))
    await asyncio.sleep(0.05)
    status, _, _ = await _call(http, gateway, TENANT_B)
    assert status == 429  # at once: the queue is full
    assert [(await holder)[0], (await waiter)[0]] == [200, 200]


async def test_other_models_are_not_held_back(
    gateway: Gateway, fake: Fake, http: aiohttp.ClientSession
) -> None:
    holder = asyncio.ensure_future(_call(http, gateway, {**TENANT_A, "X-Fake-Latency": "1"}))
    await fake.until_running()
    started = time.monotonic()
    async with http.post(
        f"{gateway.url}/v1/images/generations",
        json={**GENERATE, "model": "dall-e-3"},
        headers=TENANT_A,
    ) as resp:
        assert resp.status == 200
    assert time.monotonic() - started < 0.5
    await holder


def test_every_refusal_over_a_limit_says_rate_limit_error_as_openai_does() -> None:
    """The OpenAI SDK raises RateLimitError by status, but callers also read the body's type:
    a subclass of a refusal keeps its parent's type, not the generic caller-error one."""
    for refusal in (Overloaded(), CallerOverloaded(), QueueFull()):
        body = json.loads(refusal.response().text or "")
        assert (refusal.response().status, body["error"]["type"]) == (429, "rate_limit_error")
