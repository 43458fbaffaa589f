"""Never worse than a plain call: the run-once extras, met with the official OpenAI SDK over real
sockets, on both stores. SDK calls are not capped by the task workers, retries after a 429 or
a 503 go upstream again, an answer that is ready comes back at once, and without its store the
SDK call still works."""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from redis.asyncio import Redis

from gateway.fake import png
from gateway.metrics import METRICS
from tests.capture import raw_request
from tests.conftest import Fake, GatewayFactory
from tests.redis_server import RedisServer

IMAGE = png(64 * 1024)  # what the stand-in of these tests generates


def _sdk(url: str, key: str = "sk-caller", **options: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, **options)


async def test_sdk_calls_are_not_capped_by_the_task_workers(
    gateway_factory: GatewayFactory, fake: Fake, store: dict[str, Any]
) -> None:
    # Two task workers; twelve SDK calls of 1 s at once. As queued tasks they would take six
    # rounds; run by the replica that holds each caller, one round, as plain calls do.
    gateway = await gateway_factory(tasks={**store, "workers": 2})
    async with _sdk(gateway.url) as sdk:
        started = time.monotonic()
        results = await asyncio.gather(
            *(
                sdk.images.generate(
                    model="gpt-image-1",
                    prompt=f"lighthouse {i}",
                    extra_headers={"X-Fake-Latency": "1"},
                )
                for i in range(12)
            )
        )
        elapsed = time.monotonic() - started
    assert all(base64.b64decode(r.data[0].b64_json or "") == IMAGE for r in results if r.data)
    assert fake.stats.peak_running == 12
    assert elapsed < 2.5


@pytest.mark.parametrize("fault", ["429", "503", "500"])
async def test_sdk_retries_after_a_refusal_reach_the_upstream_again(
    gateway_factory: GatewayFactory, fake: Fake, store: dict[str, Any], fault: str
) -> None:
    # The upstream refuses the first attempt; straight to APIYI the SDK's retry would succeed,
    # and so it must through the gateway: a refusal is not kept for replay.
    gateway = await gateway_factory(tasks=store)
    headers = {"X-Fake-Fault": fault, "X-Fake-Fault-Times": "1", "X-Fake-Retry-After": "0"}
    async with _sdk(gateway.url) as sdk:
        result = await sdk.images.generate(
            model="gpt-image-1", prompt="a lighthouse", extra_headers=headers
        )
    assert result.data is not None
    assert base64.b64decode(result.data[0].b64_json or "") == IMAGE
    assert fake.stats.requests == 2  # the refused attempt and the retry that succeeded


async def test_a_keyed_call_refused_upstream_runs_again_with_its_key(
    gateway_factory: GatewayFactory, fake: Fake, store: dict[str, Any], http: aiohttp.ClientSession
) -> None:
    gateway = await gateway_factory(tasks=store)
    headers = {
        "Authorization": "Bearer sk-caller",
        "Idempotency-Key": "order-7",
        "X-Fake-Fault": "429",
        "X-Fake-Fault-Times": "1",
    }
    body = {"model": "gpt-image-1", "prompt": "a lighthouse"}
    statuses = []
    for _ in range(3):
        async with http.post(
            f"{gateway.url}/v1/images/generations", json=body, headers=headers
        ) as resp:
            statuses.append((resp.status, resp.headers.get("Idempotent-Replayed")))
    # Refused, then run (the refusal was not kept), then that success replayed.
    assert statuses == [(429, None), (200, None), (200, "true")]
    assert fake.stats.requests == 2


async def test_answers_of_an_instant_upstream_come_back_at_once_on_every_path(
    gateway_factory: GatewayFactory, store: dict[str, Any], http: aiohttp.ClientSession
) -> None:
    gateway = await gateway_factory(tasks=store)
    url = f"{gateway.url}/v1/images/generations"
    body = {"model": "gpt-image-1", "prompt": "a lighthouse"}
    key = {"Authorization": "Bearer sk-caller"}
    paths: dict[str, dict[str, str]] = {
        "plain": {},
        "sdk": {"x-stainless-retry-count": "0"},
        "keyed": {"Idempotency-Key": "k"},
        "wait": {"Prefer": "respond-async, wait=10"},
    }
    for name, extra in paths.items():
        for i in range(5):
            headers = {**key, **extra}
            if "Idempotency-Key" in headers:
                headers["Idempotency-Key"] = f"k-{i}"
            started = time.monotonic()
            async with http.post(url, json={**body, "n": i + 1}, headers=headers) as resp:
                assert resp.status == 200, name
                await resp.read()
            assert time.monotonic() - started < 0.5, name
    for _ in range(3):  # and followed over SSE: submit, then the events to the last one
        started = time.monotonic()
        async with http.post(url, json=body, headers={**key, "Prefer": "respond-async"}) as resp:
            task = await resp.json()
        async with http.get(f"{gateway.url}{task['events_url']}", headers=key) as stream:
            events = await stream.read()
        assert b"event: completed" in events
        assert time.monotonic() - started < 0.5, "sse"


async def test_sdk_calls_work_while_the_store_is_down_and_keyed_calls_say_so(
    gateway_factory: GatewayFactory, fake: Fake, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    redis = RedisServer(tmp_path)
    gateway = await gateway_factory(tasks={"redis_url": redis.url})
    redis.stop()
    try:
        async with _sdk(gateway.url, max_retries=0) as sdk:
            for _ in range(3):
                result = await sdk.images.generate(model="gpt-image-1", prompt="a lighthouse")
                assert result.data is not None
        started = time.monotonic()
        async with http.post(
            f"{gateway.url}/v1/images/generations",
            json={"model": "gpt-image-1", "prompt": "a lighthouse"},
            headers={"Authorization": "Bearer sk-caller", "Idempotency-Key": "order-8"},
        ) as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "1"
            assert (await resp.json())["error"]["code"] == "store_unavailable"
        assert time.monotonic() - started < 1.0
        async with http.get(f"{gateway.url}/metrics") as resp:
            assert "gateway_run_once_bypassed_total 3.0" in await resp.text()
    finally:
        redis.stop()
    assert fake.stats.requests == 3


async def test_google_genai_paths_under_v1_are_gemini_calls(
    gateway_factory: GatewayFactory, fake: Fake, store: dict[str, Any], http: aiohttp.ClientSession
) -> None:
    # google-genai with api_version="v1" calls /v1/models/{model}:generateContent.
    gateway = await gateway_factory(
        tasks=store, timeouts={"models": {"gemini-2.5-flash-image": 77.0}}
    )
    url = f"{gateway.url}/v1/models/gemini-2.5-flash-image:generateContent"
    body = {"contents": [{"parts": [{"text": "a lighthouse"}]}]}
    headers = {"x-goog-api-key": "sk-caller", "Prefer": "respond-async"}
    async with http.post(url, json=body, headers=headers) as resp:
        assert resp.status == 202
        task = await resp.json()
    assert task["model"] == "gemini-2.5-flash-image"
    async with http.get(f"{gateway.url}/metrics") as resp:
        metrics = await resp.text()
    assert (
        'gateway_requests_total{mode="async",model="gemini-2.5-flash-image",'
        'route="/v1/models/{model}:generateContent",status="202"} 1.0'
    ) in metrics


async def test_one_tenants_backlog_does_not_hold_up_another(
    gateway_factory: GatewayFactory, fake: Fake, store: dict[str, Any], http: aiohttp.ClientSession
) -> None:
    # Two workers; tenant A queues 60 tasks of 0.5 s (15 s of work). Tenant B's one task
    # waits for one free worker, not for A's backlog.
    gateway = await gateway_factory(tasks={**store, "workers": 2})
    url = f"{gateway.url}/v1/images/generations"
    body = {"model": "gpt-image-1", "prompt": "a lighthouse"}
    flood = {"Authorization": "Bearer sk-tenant-a", "Prefer": "respond-async"}
    for _ in range(60):
        async with http.post(url, json=body, headers={**flood, "X-Fake-Latency": "0.5"}) as resp:
            assert resp.status == 202
    started = time.monotonic()
    headers = {"Authorization": "Bearer sk-tenant-b", "Prefer": "respond-async, wait=10"}
    async with http.post(url, json=body, headers=headers) as resp:
        assert resp.status == 200  # its answer, within the wait
        await resp.read()
    assert time.monotonic() - started < 1.5
    assert fake.stats.requests < 10  # A's backlog is still there: B did not wait it out


async def test_an_open_event_stream_ends_cleanly_when_the_store_goes(
    gateway_factory: GatewayFactory, fake: Fake, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    redis = RedisServer(tmp_path)
    try:
        gateway = await gateway_factory(tasks={"redis_url": redis.url})
        key = {"Authorization": "Bearer sk-caller"}
        async with http.post(
            f"{gateway.url}/v1/images/generations",
            json={"model": "gpt-image-1", "prompt": "a lighthouse"},
            headers={**key, "Prefer": "respond-async", "X-Fake-Latency": "30"},
        ) as resp:
            task = await resp.json()
        async with http.get(f"{gateway.url}{task['events_url']}", headers=key) as stream:
            assert stream.status == 200
            first = await stream.content.readuntil(b"\r\n\r\n")
            assert b"event: queued" in first or b"event: in_progress" in first
            redis.stop()
            started = time.monotonic()
            rest = await asyncio.wait_for(stream.content.read(), 10)  # to the end: EOF
        assert time.monotonic() - started < 5
        assert b": the task store is unreachable; resume with Last-Event-ID" in rest
        assert b"HTTP/1.1" not in rest  # no second response inside this one
    finally:
        redis.stop()


async def test_tasks_carry_their_links_and_a_result_can_be_waited_for(
    gateway_factory: GatewayFactory, store: dict[str, Any], http: aiohttp.ClientSession
) -> None:
    gateway = await gateway_factory(tasks=store)
    key = {"Authorization": "Bearer sk-caller"}
    async with http.post(
        f"{gateway.url}/v1/images/generations",
        json={"model": "gpt-image-1", "prompt": "a lighthouse"},
        headers={**key, "Prefer": "respond-async", "X-Fake-Latency": "0.5"},
    ) as resp:
        task = await resp.json()
    path = f"/v1/tasks/{task['id']}"
    assert (task["url"], task["events_url"], task["result_url"]) == (
        path,
        f"{path}/events",
        f"{path}/result",
    )
    async with http.get(f"{gateway.url}{task['result_url']}", headers=key) as resp:
        assert resp.status == 202  # still running, and said at once
    started = time.monotonic()
    waiting = {**key, "Prefer": "wait=5"}
    async with http.get(f"{gateway.url}{task['result_url']}", headers=waiting) as resp:
        assert resp.status == 200
        assert base64.b64decode((await resp.json())["data"][0]["b64_json"]) == IMAGE
    assert time.monotonic() - started < 2


async def test_the_readme_sdk_recipes_work(
    gateway_factory: GatewayFactory, fake: Fake, store: dict[str, Any]
) -> None:
    # The README's recipe, sync and async: submit with Prefer, read the result into the SDK's
    # own type with Prefer: wait on the result link joined to base_url.
    from openai.types import ImagesResponse

    gateway = await gateway_factory(tasks=store)
    headers = {"Prefer": "respond-async", "Idempotency-Key": "poster-42", "X-Fake-Latency": "1"}

    def sync_recipe() -> ImagesResponse:
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="sk-caller")
        task = client.images.with_raw_response.generate(
            model="gpt-image-1", prompt="a lighthouse", extra_headers=headers
        ).http_response.json()
        result_url = str(client.base_url.join(task["result_url"]))
        answer: Any = {"object": "task"}
        while answer.get("object") == "task":
            answer = client.get(
                result_url, cast_to=object, options={"headers": {"Prefer": "wait=50"}}
            )
        return ImagesResponse.model_validate(answer)

    image = await asyncio.to_thread(sync_recipe)
    assert image.data is not None
    assert base64.b64decode(image.data[0].b64_json or "") == IMAGE
    async with _sdk(gateway.url) as client:
        raw = await client.images.with_raw_response.generate(
            model="gpt-image-1", prompt="a lighthouse", extra_headers=headers
        )
        task = raw.http_response.json()
        assert raw.http_response.headers["Idempotent-Replayed"] == "true"  # the same key
        answer = await client.get(
            str(client.base_url.join(task["result_url"])),
            cast_to=object,
            options={"headers": {"Prefer": "wait=50"}},
        )
        again = ImagesResponse.model_validate(answer)
    assert again.data == image.data
    assert fake.stats.requests == 1


async def test_the_stand_in_answers_by_address_when_asked(
    gateway: Any, http: aiohttp.ClientSession
) -> None:
    async with _sdk(gateway.url) as sdk:
        result = await sdk.images.generate(
            model="gpt-image-1", prompt="a lighthouse", response_format="url"
        )
    assert result.data is not None
    url = result.data[0].url
    assert url is not None
    assert result.data[0].b64_json is None
    async with http.get(url) as resp:
        assert resp.status == 200
        assert resp.content_type == "image/png"
        assert await resp.read() == IMAGE


async def test_an_answer_reaches_its_caller_though_the_store_goes_mid_call(
    gateway_factory: GatewayFactory, fake: Fake, tmp_path: Path
) -> None:
    redis = RedisServer(tmp_path)
    try:
        gateway = await gateway_factory(tasks={"redis_url": redis.url, "lease_s": 30.0})
        async with _sdk(gateway.url, max_retries=0) as sdk:
            call = asyncio.ensure_future(
                sdk.images.generate(
                    model="gpt-image-1",
                    prompt="a lighthouse",
                    extra_headers={"X-Fake-Latency": "1"},
                )
            )
            await asyncio.sleep(0.5)
            redis.stop()  # the upstream answers in 0.5 s; keeping it would wait out a lease
            started = time.monotonic()
            result = await call
        assert time.monotonic() - started < 2
        assert result.data is not None
        assert fake.stats.requests == 1
    finally:
        redis.stop()


async def test_a_replica_starts_and_serves_sdk_calls_while_its_store_is_down(
    gateway_factory: GatewayFactory, fake: Fake, tmp_path: Path
) -> None:
    redis = RedisServer(tmp_path)
    redis.stop()
    gateway = await gateway_factory(tasks={"redis_url": redis.url})
    async with _sdk(gateway.url, max_retries=0) as sdk:
        result = await sdk.images.generate(model="gpt-image-1", prompt="a lighthouse")
    assert result.data is not None
    assert fake.stats.requests == 1


async def test_a_full_redis_is_a_store_outage_not_a_failed_call(
    gateway_factory: GatewayFactory, fake: Fake, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    redis = RedisServer(tmp_path)
    try:
        gateway = await gateway_factory(tasks={"redis_url": redis.url})
        client = Redis.from_url(redis.url)
        await client.config_set("maxmemory", 1)  # every write now fails with OOM
        try:
            async with _sdk(gateway.url, max_retries=0) as sdk:
                result = await sdk.images.generate(model="gpt-image-1", prompt="a lighthouse")
            assert result.data is not None  # went upstream plainly
            async with http.post(
                f"{gateway.url}/v1/images/generations",
                json={"model": "gpt-image-1", "prompt": "a lighthouse"},
                headers={"Authorization": "Bearer sk-caller", "Prefer": "respond-async"},
            ) as resp:
                assert resp.status == 503
                assert (await resp.json())["error"]["code"] == "store_unavailable"
        finally:
            await client.config_set("maxmemory", 0)
            await client.aclose()
    finally:
        redis.stop()


@pytest.mark.parametrize("api_version", ["v1beta", "v1"])
async def test_google_genai_works_through_the_gateway_as_the_readme_says(
    gateway_factory: GatewayFactory, fake: Fake, api_version: str
) -> None:
    from google import genai
    from google.genai import types

    gateway = await gateway_factory(timeouts={"models": {"gemini-2.5-flash-image": 77.0}})
    client = genai.Client(
        api_key="sk-caller",
        http_options=types.HttpOptions(
            base_url=gateway.url, api_version=api_version, timeout=600_000
        ),
    )
    reply = await asyncio.to_thread(
        client.models.generate_content, model="gemini-2.5-flash-image", contents="a lighthouse"
    )
    assert reply.candidates
    content = reply.candidates[0].content
    assert content is not None
    assert content.parts
    data = content.parts[0].inline_data
    assert data is not None
    assert data.mime_type == "image/png"
    assert fake.stats.by_path == {
        f"/{api_version}/models/gemini-2.5-flash-image:generateContent": 1
    }
    metrics = gateway.app[METRICS].registry
    route = f"/{api_version}/models/{{model}}:generateContent"
    labels = {"route": route, "model": "gemini-2.5-flash-image", "status": "200", "mode": "sync"}
    assert metrics.get_sample_value("gateway_requests_total", labels) == 1.0


async def test_an_oversized_async_upload_is_refused_before_its_body_is_read(
    gateway_factory: GatewayFactory, fake: Fake, store: dict[str, Any]
) -> None:
    # 140 MiB declared, 1 KiB sent: the 413 comes from the headers alone.
    gateway = await gateway_factory(server={"max_body_bytes": 100 * 2**20}, tasks=store)
    head = (
        b"POST /v1/images/generations HTTP/1.1\r\nHost: g\r\n"
        b"Authorization: Bearer sk-caller\r\nPrefer: respond-async\r\n"
        b"Content-Type: application/json\r\nContent-Length: 146800640"
    )
    started = time.monotonic()
    status, answer = await raw_request(gateway.url, head, b"{" * 1024)
    assert status == 413
    assert b"request_too_large" in answer
    assert time.monotonic() - started < 1
    assert fake.stats.requests == 0
