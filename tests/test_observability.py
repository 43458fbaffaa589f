"""What operators see: metrics beyond the request counters, JSON access logs, the metrics port."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import Fake, Gateway, GatewayFactory, Spawn
from tests.procs import free_port

KEY = {"Authorization": "Bearer sk-secret-tenant-key"}
GENERATE = {"model": "gpt-image-1", "prompt": "a secret lighthouse"}


async def test_store_pool_workers_and_build_are_exported(
    gateway_factory: GatewayFactory, store: dict[str, Any], http: aiohttp.ClientSession
) -> None:
    gateway = await gateway_factory(tasks={**store, "workers": 3})
    async with http.post(
        f"{gateway.url}/v1/images/generations",
        json=GENERATE,
        headers={**KEY, "Prefer": "respond-async, wait=5"},
    ) as resp:
        assert resp.status == 200
    async with http.get(f"{gateway.url}/metrics") as resp:
        text = await resp.text()
    assert 'gateway_build_info{python="' in text
    assert gateway.sample("gateway_task_workers") == 3
    assert gateway.sample("gateway_task_worker_heartbeat_timestamp_seconds") > 0
    assert gateway.sample("gateway_upstream_connections_idle") >= 1  # kept alive after the call
    assert gateway.sample("gateway_upstream_connections_in_use") == 0
    created = gateway.sample("gateway_store_duration_seconds_count", op="create")
    assert created == (1 if store else 0)  # the embedded store makes no round trips to time


async def test_json_access_log_lines_carry_the_call_and_no_secrets(
    gateway_factory: GatewayFactory,
    fake: Fake,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    gateway = await gateway_factory(server={"access_log_json": True})
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        async with http.post(
            f"{gateway.url}/v1/images/generations",
            json=GENERATE,
            headers={**KEY, "X-Request-ID": "req-42"},
        ) as resp:
            assert resp.status == 200
            await resp.read()
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.access"]
    assert lines[-1]["request_id"] == "req-42"
    assert lines[-1]["route"] == "/v1/images/generations"
    assert lines[-1]["model"] == "gpt-image-1"
    assert lines[-1]["status"] == 200
    assert lines[-1]["upstream_ms"] >= 0
    logged = caplog.text
    assert "sk-secret-tenant-key" not in logged
    assert "secret lighthouse" not in logged


async def test_the_metrics_port_keeps_metrics_away_from_tenants(spawn: Spawn, fake: Fake) -> None:
    port = free_port()
    _, url = await spawn(f"[server]\nmetrics_port = {port}\n[upstream]\nurl = '{fake.url}/v1'\n")
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/metrics") as resp:
            assert resp.status == 404
        async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
            assert resp.status == 200
            assert "gateway_requests_total" in await resp.text()
        for probe in ("/healthz", "/readyz"):
            async with http.get(f"http://127.0.0.1:{port}{probe}") as resp:
                assert resp.status == 200


async def test_the_task_api_is_measured_and_named_like_every_other_route(
    gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    # One request boundary: the task API gets request ids, request metrics and OpenAI-shaped
    # errors exactly as the pass-through does.
    gateway = await gateway_factory()
    auth = {"Authorization": "Bearer sk-a", "X-Request-ID": "trace-42"}
    async with http.get(f"{gateway.url}/v1/tasks/task_{'x' * 22}", headers=auth) as resp:
        assert resp.status == 404
        assert resp.headers["X-Request-ID"] == "trace-42"
        assert (await resp.json())["error"]["code"] == "not_found"
    labels = {"route": "/v1/tasks/{task_id}", "model": "other", "status": "404", "mode": "sync"}
    assert gateway.sample("gateway_requests_total", **labels) == 1


async def test_a_served_gateway_writes_one_access_line_per_call_like_its_other_lines(
    spawn: Spawn, fake: Fake, http: aiohttp.ClientSession
) -> None:
    proc, url = await spawn(f'[upstream]\nurl = "{fake.url}/v1"\n')
    for i in range(5):
        async with http.post(
            f"{url}/v1/images/generations",
            json={"model": "gpt-image-1", "prompt": "a lighthouse"},
            headers={"Authorization": "Bearer sk-a", "X-Request-ID": f"call-{i}"},
        ) as resp:
            assert resp.status == 200
    await asyncio.sleep(0.3)
    lines = proc.output().splitlines()
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} "
    assert re.match(stamp + "INFO gateway.edge.server ", lines[0])  # the start-up line's shape
    access = [
        re.fullmatch(
            stamp + r"INFO gateway\.access (call-\d) POST /v1/images/generations "
            r"model=gpt-image-1 status=200 duration_ms=[\d.]+ upstream_ms=[\d.]+ "
            r"bytes_in=\d+ bytes_out=\d+",
            line,
        )
        for line in lines
        if " gateway.access " in line
    ]
    assert [match.group(1) for match in access if match] == [f"call-{i}" for i in range(5)]
    assert all(access)


async def test_a_caller_that_leaves_gets_an_access_line_and_an_honest_log(
    gateway_factory: GatewayFactory, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = await gateway_factory()
    caplog.set_level(logging.INFO)
    for extra in ({}, {"x-stainless-retry-count": "0"}):  # a plain call, then an SDK call
        headers = {"Authorization": "Bearer sk-a", "X-Fake-Latency": "1", **extra}
        with contextlib.suppress(TimeoutError):
            async with http.post(
                f"{gateway.url}/v1/images/generations",
                json={"model": "gpt-image-1", "prompt": "a lighthouse"},
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=0.3),
            ) as resp:
                await resp.read()
    await asyncio.sleep(0.3)
    access = [r.getMessage() for r in caplog.records if r.name == "gateway.access"]
    assert sum(" status=499 " in line for line in access) == 2
    assert "caller disconnected; upstream call cancelled" in caplog.text  # the plain call
    assert "caller disconnected; the call goes on for its retry" in caplog.text  # the SDK's


async def test_probes_and_scrapes_are_not_counted_as_requests_and_no_created_series(
    gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gateway = await gateway_factory()
    async with http.post(f"{gateway.url}/v1/images/generations", json=GENERATE, headers=KEY) as r:
        assert r.status == 200
    for _ in range(3):
        for probe in ("/healthz", "/readyz", "/metrics"):
            async with http.get(f"{gateway.url}{probe}") as resp:
                assert resp.status == 200
                text = await resp.text()
    requests = [line for line in text.splitlines() if line.startswith("gateway_request")]
    assert any('route="/v1/images/generations"' in line for line in requests)
    for probe in ("/healthz", "/readyz", "/metrics"):
        assert not [line for line in requests if f'route="{probe}"' in line]
    assert "_created" not in text


async def test_an_sdk_call_run_as_a_task_logs_its_upstream_time(
    gateway: Gateway, sdk: openai.AsyncOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        await sdk.images.generate(
            model="gpt-image-1", prompt="a lighthouse", extra_headers={"X-Fake-Latency": "0.2"}
        )
    assert gateway.sample("gateway_tasks_total", model="gpt-image-1", status="completed") == 1
    line = [r.getMessage() for r in caplog.records if r.name == "gateway.access"][-1]
    upstream_ms = re.search(r" status=200 duration_ms=[\d.]+ upstream_ms=([\d.]+) ", line)
    assert upstream_ms is not None, line
    assert 200 <= float(upstream_ms.group(1)) < 2000  # the stand-in took 0.2 s to answer
