"""Connections held open while nothing goes upstream (event streams, `Prefer: wait`) are capped
per caller and in total, nginx limit_conn-style: one tenant's idle streams cannot spend the
file descriptors every other tenant's connections need."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.conftest import Gateway, GatewayFactory

TENANT_A = {"Authorization": "Bearer sk-tenant-a"}
TENANT_B = {"Authorization": "Bearer sk-tenant-b"}
# Long enough that every task stays in progress, and every stream open, for the whole test.
SLOW = {"X-Fake-Latency": "8"}


async def _submit(http: aiohttp.ClientSession, gateway: Gateway, key: dict[str, str]) -> str:
    async with http.post(
        f"{gateway.url}/v1/images/generations",
        json={"model": "gpt-image-1", "prompt": "a lighthouse"},
        headers={**key, **SLOW, "Prefer": "respond-async"},
    ) as resp:
        assert resp.status == 202
        return gateway.url + resp.headers["Location"]


@contextlib.asynccontextmanager
async def _streams(
    http: aiohttp.ClientSession, urls: list[str], key: dict[str, str]
) -> AsyncIterator[list[aiohttp.ClientResponse]]:
    """Event streams held open, each with its first event read: surely counted."""
    opened: list[aiohttp.ClientResponse] = []
    try:
        for url in urls:
            resp = await http.get(url + "/events", headers=key)
            opened.append(resp)
            assert resp.status == 200
            assert (await resp.content.readline()).startswith(b"id:")
        yield opened
    finally:
        for resp in opened:
            resp.close()


async def _opens_within(
    http: aiohttp.ClientSession, url: str, key: dict[str, str], within_s: float
) -> bool:
    deadline = asyncio.get_running_loop().time() + within_s
    while asyncio.get_running_loop().time() < deadline:
        async with http.get(url + "/events", headers=key) as resp:
            if resp.status == 200:
                return True
        await asyncio.sleep(0.05)
    return False


async def _refused(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "5"
    assert resp.headers["x-should-retry"] == "true"
    error: dict[str, Any] = (await resp.json())["error"]
    assert error["type"] == "rate_limit_error"
    assert error["code"] == "too_many_connections"
    return error


async def test_a_caller_past_its_cap_gets_429_and_another_tenants_stream_opens(
    gateway_factory: GatewayFactory,
    store: dict[str, Any],
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    gateway = await gateway_factory(tasks=store, server={"held_per_caller": 3, "held_total": 100})
    tasks = [await _submit(http, gateway, TENANT_A) for _ in range(4)]
    theirs = await _submit(http, gateway, TENANT_B)
    with caplog.at_level(logging.WARNING, logger="gateway.admission"):
        async with _streams(http, tasks[:3], TENANT_A) as held:
            async with http.get(tasks[3] + "/events", headers=TENANT_A) as resp:
                await _refused(resp)
            wait = {**TENANT_A, "Prefer": "wait=5"}
            async with http.get(tasks[3] + "/result", headers=wait) as resp:
                await _refused(resp)
            # Another tenant is not affected by A's streams.
            async with _streams(http, [theirs], TENANT_B):
                pass
            # A submit with `wait` is not refused (the task exists: a 429 would have it paid
            # for twice): it is answered at once, not held.
            async with http.post(
                f"{gateway.url}/v1/images/generations",
                json={"model": "gpt-image-1", "prompt": "a lighthouse"},
                headers={**TENANT_A, **SLOW, "Prefer": "respond-async, wait=5"},
                timeout=aiohttp.ClientTimeout(total=2),
            ) as resp:
                assert resp.status == 202
            held[0].close()
            # A stream that closed gives its place back (once the gateway has seen it go).
            assert await _opens_within(http, tasks[3], TENANT_A, 2.0)
    assert gateway.sample("gateway_held_connections_refused_total", reason="per_caller") >= 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings  # one line for a burst of refusals
    assert "per caller" in warnings[0]
    assert "sk-tenant" not in warnings[0]


async def test_the_total_cap_refuses_every_caller_past_it(
    gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gateway = await gateway_factory(server={"held_per_caller": 10, "held_total": 2})
    mine = [await _submit(http, gateway, TENANT_A) for _ in range(2)]
    theirs = await _submit(http, gateway, TENANT_B)
    async with (
        _streams(http, mine, TENANT_A),
        http.get(theirs + "/events", headers=TENANT_B) as resp,
    ):
        await _refused(resp)
    assert await _opens_within(http, theirs, TENANT_B, 2.0)
    assert gateway.sample("gateway_held_connections_refused_total", reason="total") >= 1
