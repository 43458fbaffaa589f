"""Calls that run once: Idempotency-Key (async and sync) and the OpenAI SDK's own retries,
on both stores, with the stand-in counting the upstream calls."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import aiohttp
import openai
import pytest

from gateway.fake import png
from gateway.tasks.idempotency import fingerprint
from tests.conftest import Fake, Gateway, GatewayFactory
from tests.helpers import GENERATE, KEY, OTHER

IMAGE = png(64 * 1024)  # what the stand-in of these tests generates


@pytest.fixture
async def gateway(gateway_factory: GatewayFactory, store: dict[str, Any]) -> Gateway:
    return await gateway_factory(tasks=store)


async def _post(
    http: aiohttp.ClientSession,
    gateway: Gateway,
    headers: dict[str, str],
    body: dict[str, Any] = GENERATE,
    timeout_s: float | None = None,
) -> tuple[int, dict[str, str], Any]:
    async with http.post(
        f"{gateway.url}/v1/images/generations",
        json=body,
        headers=headers,
        timeout=aiohttp.ClientTimeout(total=timeout_s),
    ) as resp:
        return resp.status, dict(resp.headers), await resp.json()


def _image(answer: Any) -> bytes:
    return base64.b64decode(answer["data"][0]["b64_json"])


async def _settle(fake: Fake) -> None:
    """Let anything still under way reach the stand-in before it is counted."""
    await asyncio.sleep(0.3)
    while fake.stats.running:
        await asyncio.sleep(0.05)


async def test_sdk_retries_after_client_timeouts_pay_for_one_generation(
    gateway: Gateway, fake: Fake
) -> None:
    # A 3 s generation, a 1 s client timeout, the SDK's default retries: without the gateway
    # every attempt would be a new, paid, lost generation.
    started = time.monotonic()
    async with openai.AsyncOpenAI(
        base_url=f"{gateway.url}/v1", api_key="sk-caller", timeout=1.0
    ) as sdk:
        result = await sdk.images.generate(
            model="gpt-image-1", prompt="a lighthouse", extra_headers={"X-Fake-Latency": "3"}
        )
    assert time.monotonic() - started > 3  # so the SDK did time out, and retried
    assert result.data is not None
    assert base64.b64decode(result.data[0].b64_json or "") == IMAGE
    await _settle(fake)
    assert fake.stats.requests == 1
    assert fake.stats.cancelled == 0


async def test_an_sdk_edits_keyed_retries_are_the_same_call_whatever_their_boundary(
    gateway: Gateway, fake: Fake
) -> None:
    """The SDK builds a multipart body anew for each retry, with a new random boundary: the
    key's retry must attach to the generation under way, not get 422 for another request."""
    async with openai.AsyncOpenAI(
        base_url=f"{gateway.url}/v1", api_key="sk-caller", timeout=1.0
    ) as sdk:
        result = await sdk.images.edit(
            model="gpt-image-1",
            image=("in.png", png(200_000), "image/png"),
            prompt="a lighthouse",
            extra_headers={"Idempotency-Key": "edit-1", "X-Fake-Latency": "3"},
        )
    assert result.data is not None
    await _settle(fake)
    assert fake.stats.requests == 1


def test_a_forms_fingerprint_ignores_its_boundary_and_nothing_else() -> None:
    def form(boundary: bytes, prompt: bytes) -> bytes:
        part = b'Content-Disposition: form-data; name="prompt"\r\n\r\n' + prompt + b"\r\n"
        return b"--" + boundary + b"\r\n" + part + b"--" + boundary + b"--\r\n"

    def print_of(boundary: bytes, prompt: bytes) -> str:
        return fingerprint("POST", "/v1/images/edits", "owner", form(boundary, prompt), boundary)

    assert print_of(b"abc123", b"a lighthouse") == print_of(b"zz9", b"a lighthouse")
    assert print_of(b"abc123", b"a lighthouse") != print_of(b"abc123", b"a lighthouse!")


async def test_the_sdks_first_attempts_are_new_generations(gateway: Gateway, fake: Fake) -> None:
    async with openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="sk-caller") as sdk:
        for _ in range(2):  # a user re-rolling the same prompt on purpose
            await sdk.images.generate(model="gpt-image-1", prompt="a lighthouse")
    assert fake.stats.requests == 2


async def test_plain_calls_without_key_are_always_new_and_untouched(
    gateway: Gateway, fake: Fake, http: aiohttp.ClientSession
) -> None:
    for _ in range(2):
        status, headers, _ = await _post(http, gateway, KEY)
        assert status == 200
        assert "Idempotent-Replayed" not in headers
    assert fake.stats.requests == 2


async def test_an_async_key_returns_the_original_task_and_one_upstream_call(
    gateway: Gateway, fake: Fake, http: aiohttp.ClientSession
) -> None:
    keyed = {**KEY, "Prefer": "respond-async", "Idempotency-Key": "order-1"}
    status, _, first = await _post(http, gateway, {**keyed, "X-Fake-Latency": "0.3"})
    assert status == 202
    status, headers, again = await _post(http, gateway, {**keyed, "X-Fake-Latency": "0.3"})
    assert status == 202
    assert again["id"] == first["id"]
    assert headers["Idempotent-Replayed"] == "true"
    # The same key with another request is refused, and stores nothing.
    status, _, refused = await _post(
        http, gateway, keyed, body={**GENERATE, "prompt": "a different lighthouse"}
    )
    assert status == 422
    assert refused["error"]["code"] == "idempotency_key_reused"
    # Keys are per credential: another tenant's "order-1" is its own call.
    status, _, theirs = await _post(http, gateway, {**keyed, **OTHER})
    assert status == 202
    assert theirs["id"] != first["id"]
    await _settle(fake)
    assert fake.stats.requests == 2


async def test_a_keyed_sync_caller_that_drops_gets_the_image_on_retry_from_one_call(
    gateway: Gateway, fake: Fake, http: aiohttp.ClientSession
) -> None:
    keyed = {**KEY, "Idempotency-Key": "render-7", "X-Fake-Latency": "1.5"}
    with pytest.raises(TimeoutError):
        await _post(http, gateway, keyed, timeout_s=0.5)  # a proxy cut the caller off
    status, headers, answer = await _post(http, gateway, keyed)
    assert status == 200
    assert headers["Idempotent-Replayed"] == "true"
    assert _image(answer) == IMAGE
    # RunOnce finished, a retry gets the stored answer at once.
    status, _, again = await _post(http, gateway, keyed, timeout_s=0.5)
    assert status == 200
    assert _image(again) == IMAGE
    assert fake.stats.requests == 1
    assert fake.stats.cancelled == 0  # the dropped caller did not cancel what it paid for


async def test_a_keyed_sync_error_where_the_upstream_ran_is_kept_and_a_refusal_is_not(
    gateway: Gateway, fake: Fake, http: aiohttp.ClientSession
) -> None:
    # A deadline cut after sending: the upstream may have run (and billed) it, so the retry
    # gets the same 504 without another upstream call.
    cut = {**KEY, "Idempotency-Key": "cut-1", "X-Request-Timeout": "1", "X-Fake-Latency": "2"}
    for _ in range(2):
        status, _, answer = await _post(http, gateway, cut)
        assert status == 504
        assert answer["error"]["code"] == "upstream_timeout"
    await _settle(fake)
    assert fake.stats.requests == 1
    # A 503 is a refusal: the caller gets it, and its retry goes upstream again.
    refused = {**KEY, "Idempotency-Key": "broken-1", "X-Fake-Fault": "503"}
    for _ in range(2):
        status, _, answer = await _post(http, gateway, refused)
        assert status == 503
        assert answer["error"]["message"].startswith("The model is overloaded")
    assert fake.stats.requests == 3


async def test_keys_are_forgotten_after_their_window(
    gateway_factory: GatewayFactory,
    store: dict[str, Any],
    fake: Fake,
    http: aiohttp.ClientSession,
) -> None:
    gateway = await gateway_factory(tasks=store, idempotency={"retention_s": 0.5})
    keyed = {**KEY, "Idempotency-Key": "short-lived"}
    assert (await _post(http, gateway, keyed))[0] == 200
    await asyncio.sleep(0.7)
    status, headers, _ = await _post(http, gateway, keyed)
    assert status == 200
    assert "Idempotent-Replayed" not in headers
    assert fake.stats.requests == 2


@pytest.mark.parametrize("key", ["", "x" * 256, "tab\there", "caf\u00e9"])
async def test_a_malformed_key_is_refused(
    gateway: Gateway, fake: Fake, http: aiohttp.ClientSession, key: str
) -> None:
    async with http.post(
        f"{gateway.url}/v1/images/generations",
        json=GENERATE,
        headers={**KEY, "Idempotency-Key": key},
    ) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] == "invalid_request_error"
    assert fake.stats.requests == 0


async def test_an_sdk_retry_attaches_only_to_its_own_credentials_call(
    gateway: Gateway, fake: Fake, http: aiohttp.ClientSession
) -> None:
    first = asyncio.ensure_future(
        _post(http, gateway, {**KEY, "x-stainless-retry-count": "0", "X-Fake-Latency": "0.5"})
    )
    await fake.until_running()
    retry = {"x-stainless-retry-count": "1", "X-Fake-Latency": "0.5"}
    (_, mine, _), (_, theirs, _) = await asyncio.gather(
        _post(http, gateway, {**KEY, **retry}), _post(http, gateway, {**OTHER, **retry})
    )
    assert (await first)[0] == 200
    assert mine["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in theirs
    assert fake.stats.requests == 2  # tenant A's one generation, and tenant B's own


@pytest.mark.parametrize(
    "extra", [{"x-stainless-retry-count": "0"}, {"Prefer": "respond-async, wait=10"}]
)
async def test_an_answer_that_is_ready_reaches_its_caller_at_once(
    gateway: Gateway, http: aiohttp.ClientSession, extra: dict[str, str]
) -> None:
    # The stand-in answers at once; a call run as a task must not wait on a poll period (the
    # worker's cancel watcher once held each answer for 5 s when redis-py swallowed its cancel).
    for _ in range(4):
        started = time.monotonic()
        status, _, answer = await _post(http, gateway, {**KEY, **extra})
        assert status == 200
        assert _image(answer) == IMAGE
        assert time.monotonic() - started < 1.0
