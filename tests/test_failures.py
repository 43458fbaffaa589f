"""Every failure the gateway can see gets the status and retry hint that keeps callers safe."""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import Fake, Gateway, GatewayFactory

GENERATE = {"model": "gpt-image-1", "prompt": "x"}


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port  # closed again on exit: connecting to it is refused


async def _post(
    http: aiohttp.ClientSession, url: str, model: str = "gpt-image-1", **headers: str
) -> tuple[int, dict[str, str], dict[str, object], float]:
    started = time.monotonic()
    body = {"model": model, "prompt": "x"}
    async with http.post(f"{url}/v1/images/generations", json=body, headers=headers) as resp:
        body = await resp.json()
        return resp.status, dict(resp.headers), body, time.monotonic() - started


async def test_model_deadline_gives_504_that_sdks_do_not_retry(
    gateway_factory: GatewayFactory, fake: Fake
) -> None:
    gateway = await gateway_factory(timeouts={"models": {"gpt-image-1": 1.0}})
    async with openai.AsyncOpenAI(
        base_url=f"{gateway.url}/v1", api_key="sk-caller", max_retries=2
    ) as sdk:
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as caught:
            await sdk.images.generate(
                model="gpt-image-1", prompt="x", extra_headers={"X-Fake-Latency": "10"}
            )
    elapsed = time.monotonic() - started
    assert caught.value.status_code == 504
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert caught.value.response.json()["error"]["code"] == "upstream_timeout"
    assert abs(elapsed - 1.0) < 0.5
    # One generation paid for, not three: the SDK obeyed x-should-retry.
    assert fake.stats.requests == 1
    assert (
        gateway.sample("gateway_upstream_timeouts_total", model="gpt-image-1", phase="total") == 1
    )


async def test_caller_can_shorten_the_deadline_but_never_lengthen_it(
    gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gateway = await gateway_factory(timeouts={"models": {"gpt-image-1": 2.0}})
    status, _headers, _, elapsed = await _post(
        http, gateway.url, **{"X-Request-Timeout": "0.8", "X-Fake-Latency": "10"}
    )
    assert status == 504
    assert abs(elapsed - 0.8) < 0.5
    status, _, _, elapsed = await _post(
        http, gateway.url, **{"X-Request-Timeout": "60", "X-Fake-Latency": "10"}
    )
    assert status == 504
    assert abs(elapsed - 2.0) < 0.5


@pytest.mark.parametrize("value", ["soon", "-1", "0", "nan", "inf", ""])
async def test_bad_request_timeout_is_a_400(
    gateway: Gateway, fake: Fake, http: aiohttp.ClientSession, value: str
) -> None:
    status, _, body, _ = await _post(http, gateway.url, **{"X-Request-Timeout": value})
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert fake.stats.requests == 0


async def test_unreachable_upstream_is_a_retry_safe_502_after_one_more_try(
    gateway_factory: GatewayFactory, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.upstream")
    gateway = await gateway_factory(f"http://127.0.0.1:{_closed_port()}/v1")
    status, headers, body, _ = await _post(http, gateway.url)
    assert status == 502
    assert headers["x-should-retry"] == "true"
    assert body["error"]["code"] == "upstream_unreachable"  # type: ignore[index]
    attempts = [r for r in caplog.records if "connect failed" in r.getMessage()]
    assert len(attempts) == 2


async def test_connection_dropped_after_send_is_a_502_not_to_retry(
    gateway: Gateway, fake: Fake
) -> None:
    async with openai.AsyncOpenAI(
        base_url=f"{gateway.url}/v1", api_key="sk-caller", max_retries=2
    ) as sdk:
        with pytest.raises(openai.APIStatusError) as caught:
            await sdk.images.generate(
                model="gpt-image-1", prompt="x", extra_headers={"X-Fake-Fault": "drop"}
            )
    assert caught.value.status_code == 502
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert caught.value.response.json()["error"]["code"] == "upstream_connection_broken"
    assert fake.stats.requests == 1


async def test_reset_before_the_answer_starts_is_a_502(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    # A small answer is read whole before it is relayed, so a reset inside it is still a clean 502.
    status, headers, _body, _ = await _post(
        http, gateway.url, **{"X-Fake-Fault": "reset", "X-Fake-Image-Bytes": "10000"}
    )
    assert status == 502
    assert headers["x-should-retry"] == "false"


async def test_reset_while_streaming_breaks_the_callers_body(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    # Headers already went out: the caller must see a broken body, never a short "complete" one.
    async with http.post(
        f"{gateway.url}/v1/images/generations",
        json=GENERATE,
        headers={"X-Fake-Fault": "reset", "X-Fake-Image-Bytes": "2000000"},
    ) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


async def test_deadline_mid_stream_cuts_the_callers_body(
    gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gateway = await gateway_factory(timeouts={"models": {"gpt-image-1": 1.0}})
    async with http.post(
        f"{gateway.url}/v1/images/generations",
        json=GENERATE,
        headers={"X-Fake-Fault": "trickle", "X-Fake-Latency": "5", "X-Fake-Image-Bytes": "200000"},
    ) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    assert gateway.sample("gateway_upstream_timeouts_total", model="gpt-image-1", phase="read") == 1


async def test_hanging_upstream_meets_the_deadline(
    gateway_factory: GatewayFactory, fake: Fake, http: aiohttp.ClientSession
) -> None:
    # A model missing from the table gets the default deadline.
    gateway = await gateway_factory(timeouts={"default_s": 1.0})
    status, headers, _, elapsed = await _post(
        http, gateway.url, model="brand-new-model", **{"X-Fake-Fault": "hang"}
    )
    assert status == 504
    assert abs(elapsed - 1.0) < 0.5
    assert headers["x-should-retry"] == "false"


async def test_oversize_body_is_a_413_before_anything_is_sent(
    gateway_factory: GatewayFactory, fake: Fake, http: aiohttp.ClientSession
) -> None:
    gateway = await gateway_factory(server={"max_body_bytes": 100_000})
    async with http.post(
        f"{gateway.url}/v1/images/edits",
        data=b"x" * 200_000,
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    ) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"]["code"] == "request_too_large"
    assert fake.stats.requests == 0


@pytest.mark.parametrize("prefer", [None, "respond-async, wait=5"])
async def test_a_deadline_after_the_answers_headers_is_a_read_timeout_on_every_path(
    gateway_factory: GatewayFactory,
    store: dict[str, Any],
    http: aiohttp.ClientSession,
    prefer: str | None,
) -> None:
    # A small answer (read whole, not streamed) whose body trickles past the deadline: one
    # meaning for the dashboard's `phase` label, whether a caller or a task worker was reading.
    gateway = await gateway_factory(timeouts={"models": {"gpt-image-1": 1.0}}, tasks=store)
    headers = {
        "Authorization": "Bearer sk-a",
        "X-Fake-Fault": "trickle",
        "X-Fake-Latency": "5",
        "X-Fake-Image-Bytes": "2000",
        **({"Prefer": prefer} if prefer else {}),
    }
    async with http.post(
        f"{gateway.url}/v1/images/generations", json=GENERATE, headers=headers
    ) as resp:
        assert resp.status == 504
        assert (await resp.json())["error"]["code"] == "upstream_timeout"
    read = gateway.sample("gateway_upstream_timeouts_total", model="gpt-image-1", phase="read")
    total = gateway.sample("gateway_upstream_timeouts_total", model="gpt-image-1", phase="total")
    assert (read, total) == (1, 0)
