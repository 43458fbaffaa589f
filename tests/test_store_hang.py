"""A hung Redis (SIGSTOP: connections open, nothing answered) is an outage callers meet within
`tasks.store_timeout_s`, not a stall of the socket timeout: probes and scrapes do not wait on it
at all, an SDK call goes upstream plainly, keyed and async calls get a retryable 503, and none
of the tasks those calls began runs when Redis resumes."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import Fake, Gateway, GatewayFactory
from tests.redis_server import RedisServer

KEY = {"Authorization": "Bearer sk-caller"}
BODY = {"model": "gpt-image-1", "prompt": "a lighthouse"}
LEASE_S = 2.0
# What a caller of these tests waits at most: well under the socket timeout (15 s) a hung
# Redis cost before, so a test of the code before the fix fails rather than times out.
PATIENCE = aiohttp.ClientTimeout(total=4)


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    yield server
    server.proc.send_signal(signal.SIGCONT)
    server.stop()


@pytest.fixture
async def hung(
    gateway_factory: GatewayFactory, redis: RedisServer
) -> AsyncIterator[tuple[Gateway, RedisServer]]:
    """A gateway whose Redis is stopped (resumed when the test ends)."""
    tasks = {"redis_url": redis.url, "store_timeout_s": 1.0, "lease_s": LEASE_S}
    gateway = await gateway_factory(tasks=tasks)
    redis.proc.send_signal(signal.SIGSTOP)
    yield gateway, redis
    redis.proc.send_signal(signal.SIGCONT)


async def _timed(
    http: aiohttp.ClientSession, method: str, url: str, **options: Any
) -> tuple[int, str, float]:
    """Status, body and seconds of one request; status 0 if the caller gave up waiting."""
    started = time.monotonic()
    try:
        async with http.request(method, url, timeout=PATIENCE, **options) as resp:
            return resp.status, await resp.text(), time.monotonic() - started
    except TimeoutError:
        return 0, "", time.monotonic() - started


async def test_probes_and_scrapes_never_wait_on_a_hung_store(
    hung: tuple[Gateway, RedisServer], http: aiohttp.ClientSession
) -> None:
    gateway, _ = hung
    await asyncio.sleep(2.5)  # the background check has met the hang by now
    status, _, seconds = await _timed(http, "GET", f"{gateway.url}/readyz")
    assert (status, seconds < 0.5) == (503, True)
    status, text, seconds = await _timed(http, "GET", f"{gateway.url}/metrics")
    assert (status, seconds < 0.5) == (200, True)  # Prometheus's scrape timeout is 10 s
    assert "gateway_task_queue_depth" in text


async def test_an_sdk_call_with_default_retries_goes_upstream_plainly_during_a_hang(
    hung: tuple[Gateway, RedisServer], fake: Fake
) -> None:
    gateway, _ = hung
    started = time.monotonic()
    async with openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="sk-caller") as sdk:
        result = await asyncio.wait_for(
            sdk.images.generate(model="gpt-image-1", prompt="a lighthouse"), 10
        )
    assert result.data is not None
    assert time.monotonic() - started < 2.5  # the 1 s deadline, then the plain call
    assert fake.stats.requests == 1  # one attempt: no 503 for the SDK to retry
    assert gateway.sample("gateway_run_once_bypassed_total") == 1
    labels = {"op": "find_or_create", "reason": "timeout"}
    assert gateway.sample("gateway_store_errors_total", **labels) == 1


async def test_calls_told_to_retry_during_a_hang_never_run_after_it(
    gateway_factory: GatewayFactory, redis: RedisServer, fake: Fake, http: aiohttp.ClientSession
) -> None:
    tasks = {"redis_url": redis.url, "store_timeout_s": 1.0, "lease_s": LEASE_S}
    gateway = await gateway_factory(tasks=tasks)
    url = f"{gateway.url}/v1/images/generations"
    async with http.post(url, json=BODY, headers={**KEY, "Prefer": "respond-async"}) as resp:
        task = await resp.json()  # made before the hang: its events are asked for during it
    waiting = {**KEY, "Prefer": "wait=5"}
    async with http.get(f"{gateway.url}{task['result_url']}", headers=waiting) as resp:
        assert resp.status == 200
    ran_before = fake.stats.requests
    redis.proc.send_signal(signal.SIGSTOP)
    try:
        answers = [
            await _timed(http, "POST", url, json=BODY, headers={**KEY, **extra})
            for extra in (
                {"Idempotency-Key": "order-1"},  # a keyed sync call
                {"Prefer": "respond-async"},
                {"Prefer": "respond-async", "Idempotency-Key": "order-2"},
            )
        ]
        answers.append(await _timed(http, "GET", f"{gateway.url}{task['events_url']}", headers=KEY))
    finally:
        redis.proc.send_signal(signal.SIGCONT)
    await asyncio.sleep(3 * LEASE_S)  # a lapsed lease is found, a queued task taken, by now
    assert fake.stats.requests == ran_before  # nothing a caller was told to retry ran
    for status, text, seconds in answers:
        assert status == 503, text
        assert '"store_unavailable"' in text
        assert seconds < 1.5
    # The store is back: the keyed call, retried, runs once.
    async with http.post(url, json=BODY, headers={**KEY, "Idempotency-Key": "order-1"}) as resp:
        assert resp.status == 200
    assert fake.stats.requests == ran_before + 1
