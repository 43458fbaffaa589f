"""`Prefer: respond-async`: a task id at once, the call run by the gateway, the answer kept."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import aiohttp
import openai
import pytest

from gateway.fake import png
from tests.conftest import Fake, Gateway, GatewayFactory
from tests.helpers import GENERATE, KEY, OTHER, post_task, until_ended


@pytest.fixture
async def gateway(gateway_factory: GatewayFactory, store: dict[str, Any]) -> Gateway:
    return await gateway_factory(tasks=store)


async def _submit(
    http: aiohttp.ClientSession, gateway: Gateway, prefer: str = "respond-async", **headers: str
) -> tuple[int, dict[str, str], Any]:
    return await post_task(http, gateway.url, headers={"Prefer": prefer, **headers})


async def _until_ended(http: aiohttp.ClientSession, url: str, key: dict[str, str] = KEY) -> Any:
    return (await until_ended(http, url, key=key))[0]


async def test_submit_answers_202_at_once_and_the_result_is_the_sync_answer(
    gateway: Gateway, fake: Fake, http: aiohttp.ClientSession
) -> None:
    started = time.monotonic()
    status, headers, task = await _submit(
        http, gateway, **{"X-Fake-Latency": "1", "X-Fake-Image-Bytes": "300000"}
    )
    assert time.monotonic() - started < 0.5
    assert status == 202
    assert headers["Location"] == f"/v1/tasks/{task['id']}"
    assert headers["Preference-Applied"] == "respond-async"
    assert headers["Vary"] == "Prefer"
    assert task["object"] == "task"
    assert task["status"] in ("queued", "in_progress")
    assert task["model"] == "gpt-image-1"
    assert len(task["id"]) >= 5 + 22
    ended = await _until_ended(http, gateway.url + headers["Location"])
    assert ended["status"] == "completed"
    async with http.get(f"{gateway.url}/v1/tasks/{task['id']}/result", headers=KEY) as resp:
        assert resp.status == 200
        answer = await resp.json()
    assert base64.b64decode(answer["data"][0]["b64_json"]) == png(300_000)
    assert fake.stats.requests == 1
    # The gateway consumed the preference; the upstream saw the caller's own key.
    sent = {k.lower(): v for k, v in fake.stats.last["headers"]}
    assert "prefer" not in sent
    assert sent["authorization"] == KEY["Authorization"]


async def test_wait_returns_the_ordinary_answer_when_ready_in_time(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    status, _, answer = await _submit(http, gateway, "respond-async, wait=5")
    assert status == 200
    assert "data" in answer
    status, _, task = await _submit(
        http, gateway, "respond-async, wait=0.2", **{"X-Fake-Latency": "2"}
    )
    assert status == 202
    assert task["object"] == "task"


async def test_events_stream_every_change_and_resume_after_the_last_seen(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    _, _, task = await _submit(http, gateway, **{"X-Fake-Latency": "0.5"})
    url = f"{gateway.url}/v1/tasks/{task['id']}/events"
    events = await _read_events(http, url)
    assert [e["event"] for e in events] == ["queued", "in_progress", "completed"]
    assert all(json.loads(e["data"])["id"] == task["id"] for e in events)
    resumed = await _read_events(http, url, {"Last-Event-ID": events[0]["id"]})
    assert [e["id"] for e in resumed] == [e["id"] for e in events[1:]]


async def _read_events(
    http: aiohttp.ClientSession, url: str, extra: dict[str, str] | None = None
) -> list[dict[str, str]]:
    events: list[dict[str, str]] = []
    async with http.get(url, headers={**KEY, **(extra or {})}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["X-Accel-Buffering"] == "no"
        raw = (await resp.read()).decode()  # ends by itself after the terminal event
    for block in raw.replace("\r\n", "\n").split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in fields:
            events.append(fields)
    return events


async def test_cancel_aborts_the_running_upstream_call(
    gateway: Gateway, fake: Fake, http: aiohttp.ClientSession
) -> None:
    _, _, task = await _submit(http, gateway, **{"X-Fake-Latency": "30"})
    url = f"{gateway.url}/v1/tasks/{task['id']}"
    while fake.stats.requests == 0:
        await asyncio.sleep(0.02)
    async with http.delete(url, headers=KEY) as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == "cancelled"
    cancelled_at = time.monotonic()
    while fake.stats.cancelled == 0 and time.monotonic() - cancelled_at < 1.0:
        await asyncio.sleep(0.02)
    assert fake.stats.cancelled == 1
    async with http.get(url + "/result", headers=KEY) as resp:
        assert resp.status == 409
    async with http.get(url, headers=KEY) as resp:
        assert (await resp.json())["status"] == "cancelled"


async def test_upstream_errors_fail_the_task_and_replay_as_sync(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    _, headers, task = await _submit(http, gateway, **{"X-Fake-Fault": "503"})
    ended = await _until_ended(http, gateway.url + headers["Location"])
    assert ended["status"] == "failed"
    assert ended["error"]["code"] == "503"
    async with http.get(f"{gateway.url}/v1/tasks/{task['id']}/result", headers=KEY) as resp:
        assert resp.status == 503
        assert (await resp.json())["error"]["message"].startswith("The model is overloaded")


async def test_a_kept_upstream_error_read_with_the_sdk_is_not_retried(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    """The SDK retried a kept 429 for 14 s, reading the same answer each time: a kept error
    says `x-should-retry: false`."""
    _, headers, task = await _submit(http, gateway, **{"X-Fake-Fault": "429"})
    await _until_ended(http, gateway.url + headers["Location"])
    async with openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="sk-tenant-a") as sdk:
        started = time.monotonic()
        with pytest.raises(openai.RateLimitError) as refused:
            await sdk.get(f"/tasks/{task['id']}/result", cast_to=object)
        elapsed_s = time.monotonic() - started
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert elapsed_s < 0.5  # no retry: the SDK's first backoff alone is 0.5 s


@pytest.mark.parametrize(
    ("method", "suffix"), [("GET", ""), ("GET", "/result"), ("GET", "/events"), ("DELETE", "")]
)
async def test_another_credential_sees_no_task(
    gateway: Gateway, http: aiohttp.ClientSession, method: str, suffix: str
) -> None:
    _, headers, _ = await _submit(http, gateway, **{"X-Fake-Latency": "1"})
    async with http.request(
        method, gateway.url + headers["Location"] + suffix, headers=OTHER
    ) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "not_found"
    async with http.get(gateway.url + headers["Location"], headers=KEY) as resp:
        assert (await resp.json())["status"] != "cancelled"


async def test_bad_input_is_refused_and_nothing_runs(
    gateway: Gateway, fake: Fake, http: aiohttp.ClientSession
) -> None:
    async with http.post(
        f"{gateway.url}/v1/images/generations",
        data=b'{"model": "gpt-image-1", "prompt": ',
        headers={**KEY, "Prefer": "respond-async", "Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 400
    async with http.post(
        f"{gateway.url}/v1/images/generations",
        json=GENERATE,
        headers={**KEY, "Prefer": "respond-async, wait=soon"},
    ) as resp:
        assert resp.status == 400
    async with http.post(
        f"{gateway.url}/v1/images/edits",
        data=b'--xyz\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-image-1',
        headers={
            **KEY,
            "Prefer": "respond-async",
            "Content-Type": "multipart/form-data; boundary=xyz",
        },
    ) as resp:
        assert resp.status == 400
        assert "multipart" in (await resp.json())["error"]["message"]
    async with http.get(f"{gateway.url}/v1/tasks/task_bogus", headers=KEY) as resp:
        assert resp.status == 404
    await asyncio.sleep(0.2)
    assert fake.stats.requests == 0


async def test_a_bogus_last_event_id_is_refused(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    _, headers, _ = await _submit(http, gateway)
    # Past Redis's list indexes (signed 64 bit) too: 2**63 once answered 500 on a Redis store.
    past_list_index = (str(2**63), str(2**64 - 2), str(2**64 - 1), "0" * 30 + "1")
    for bogus in (
        "99999999999999-0",
        "99999",
        "-1",
        "not-an-id",
        "../../etc/passwd",
        *past_list_index,
    ):
        async with http.get(
            gateway.url + headers["Location"] + "/events",
            headers={**KEY, "Last-Event-ID": bogus},
        ) as resp:
            assert resp.status == 400, bogus
            assert (await resp.json())["error"]["type"] == "invalid_request_error"


async def _run_all(
    http: aiohttp.ClientSession, gateway: Gateway, jobs: list[tuple[str, dict[str, str]]]
) -> list[float]:
    """Submit (model, credential) tasks at once; the time each one ended, in submit order."""
    submitted = [
        await post_task(
            http,
            gateway.url,
            body={**GENERATE, "model": model},
            key=key,
            headers={"X-Fake-Latency": "0.4"},
        )
        for model, key in jobs
    ]

    async def ended_at(location: str, key: dict[str, str]) -> float:
        assert (await _until_ended(http, gateway.url + location, key=key))["status"] == "completed"
        return time.monotonic()

    return await asyncio.gather(
        *(ended_at(h["Location"], key) for (_, h, _), (_, key) in zip(submitted, jobs, strict=True))
    )


async def test_a_models_limit_keeps_extra_tasks_queued_and_other_models_go_on(
    gateway_factory: GatewayFactory, store: dict[str, Any], fake: Fake, http: aiohttp.ClientSession
) -> None:
    gateway = await gateway_factory(tasks={**store, "model_concurrency": {"gpt-image-1": 1}})
    ends = await _run_all(http, gateway, [("gpt-image-1", KEY)] * 3 + [("dall-e-3", KEY)])
    assert fake.stats.requests == 4
    assert fake.stats.peak_running == 2  # one gpt-image-1 at a time, dall-e-3 beside it
    assert ends[3] < max(ends[:3])  # dall-e-3 did not wait behind the queued gpt-image-1s


async def test_a_credentials_limit_does_not_hold_back_another_credential(
    gateway_factory: GatewayFactory, store: dict[str, Any], fake: Fake, http: aiohttp.ClientSession
) -> None:
    gateway = await gateway_factory(tasks={**store, "credential_concurrency": 1})
    ends = await _run_all(http, gateway, [("gpt-image-1", KEY)] * 3 + [("gpt-image-1", OTHER)])
    assert fake.stats.requests == 4
    assert fake.stats.peak_running == 2
    assert ends[3] < max(ends[:3])


async def test_an_answer_over_the_result_limit_fails_the_task_clearly(
    gateway_factory: GatewayFactory, store: dict[str, Any], http: aiohttp.ClientSession
) -> None:
    gateway = await gateway_factory(tasks={**store, "result_max_bytes": 100_000})
    _, headers, _ = await _submit(http, gateway, **{"X-Fake-Image-Bytes": "200000"})
    ended = await _until_ended(http, gateway.url + headers["Location"])
    assert ended["status"] == "failed"
    assert ended["error"]["code"] == "result_too_large"
    async with http.get(gateway.url + headers["Location"] + "/result", headers=KEY) as resp:
        assert resp.status == 502
        assert resp.headers["x-should-retry"] == "false"  # it was generated, and billed


async def test_an_oversize_async_body_is_refused_and_nothing_runs(
    gateway_factory: GatewayFactory, store: dict[str, Any], fake: Fake, http: aiohttp.ClientSession
) -> None:
    gateway = await gateway_factory(server={"max_body_bytes": 10_000}, tasks=store)
    async with http.post(
        f"{gateway.url}/v1/images/generations",
        json={**GENERATE, "prompt": "x" * 20_000},
        headers={**KEY, "Prefer": "respond-async"},
    ) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"]["code"] == "request_too_large"
    await asyncio.sleep(0.2)
    assert fake.stats.requests == 0


async def test_task_outcomes_queue_and_streams_are_measured(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    _, done, _ = await _submit(http, gateway, **{"X-Fake-Latency": "0.2"})
    _, failed, _ = await _submit(http, gateway, **{"X-Fake-Fault": "503"})
    _, cancelled, _ = await _submit(http, gateway, **{"X-Fake-Latency": "30"})
    async with http.delete(gateway.url + cancelled["Location"], headers=KEY) as resp:
        assert resp.status == 200
    events = asyncio.ensure_future(_read_events(http, gateway.url + done["Location"] + "/events"))
    while gateway.sample("gateway_sse_clients") == 0 and not events.done():
        await asyncio.sleep(0.01)
    assert gateway.sample("gateway_sse_clients") == 1 or events.done()
    await events
    for location in (done["Location"], failed["Location"]):
        await _until_ended(http, gateway.url + location)
    assert gateway.sample("gateway_sse_clients") == 0

    def outcomes() -> tuple[float, ...]:
        return tuple(
            gateway.sample("gateway_tasks_total", model="gpt-image-1", status=status)
            for status in ("completed", "failed", "cancelled")
        )

    # A worker counts its task just after the task's end is stored (and seen by callers).
    for _ in range(100):
        if outcomes() == (1, 1, 1):
            break
        await asyncio.sleep(0.01)
    assert outcomes() == (1, 1, 1)
    assert gateway.sample("gateway_task_wait_seconds_count", model="gpt-image-1") >= 2
    duration = "gateway_task_duration_seconds_sum"
    assert gateway.sample(duration, model="gpt-image-1", status="completed") >= 0.2
    async with http.get(f"{gateway.url}/metrics") as resp:
        assert "gateway_task_queue_depth 0.0" in await resp.text()
