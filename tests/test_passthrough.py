"""Calls reach the upstream and come back exactly as if made directly."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging

import aiohttp
import openai
import pytest
from yarl import URL

from gateway.fake import png
from tests.conftest import Fake, Gateway


async def test_generation_through_the_sdk_returns_the_image(
    sdk: openai.AsyncOpenAI, fake: Fake
) -> None:
    result = await sdk.images.generate(
        model="gpt-image-1", prompt="a lighthouse", extra_headers={"X-Fake-Image-Bytes": "1500000"}
    )
    assert result.data is not None
    image = base64.b64decode(result.data[0].b64_json or "")
    assert len(image) >= 1_000_000
    assert image == png(1_500_000)
    assert fake.stats.requests == 1


async def test_multipart_edit_reaches_upstream_byte_for_byte(
    sdk: openai.AsyncOpenAI, fake: Fake
) -> None:
    upload = png(300_000)
    result = await sdk.images.edit(
        model="gpt-image-1", image=("in.png", io.BytesIO(upload), "image/png"), prompt="add a hat"
    )
    assert result.data is not None
    # The stand-in's edit returns the uploaded image unchanged: both directions are checked.
    assert base64.b64decode(result.data[0].b64_json or "") == upload
    last = fake.stats.last
    assert last["path_qs"] == "/v1/images/edits"
    assert dict(last["headers"])["Content-Type"].startswith("multipart/form-data; boundary=")


async def test_request_body_is_forwarded_unchanged(
    gateway: Gateway, fake: Fake, http: aiohttp.ClientSession
) -> None:
    # Odd but valid JSON: key order, spacing and unicode escapes must survive untouched.
    body = b'{ "prompt" : "caf\\u00e9 \xe2\x98\x95",\n"model":"gpt-image-1" ,"n":1}'
    async with http.post(
        f"{gateway.url}/v1/images/generations",
        data=body,
        headers={"Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 200
    assert fake.stats.last["body_sha256"] == hashlib.sha256(body).hexdigest()


async def test_chat_completion_and_models(sdk: openai.AsyncOpenAI) -> None:
    chat = await sdk.chat.completions.create(
        model="gemini-2.5-flash-image", messages=[{"role": "user", "content": "draw a fox"}]
    )
    assert (chat.choices[0].message.content or "").startswith("![image](data:image/png;base64,")
    models = [m.id async for m in sdk.models.list()]
    assert "gpt-image-1" in models


async def test_unknown_path_and_query_pass_byte_identical(
    gateway: Gateway, fake: Fake, http: aiohttp.ClientSession
) -> None:
    # Escapes stay escapes (an encoded slash is refused in a path segment, not in a query).
    raw = "/v1/some/new%20thing;v=2?b=%2F&a=1&a=2&empty=&sp=a+b"
    body = b"opaque \x00\xff bytes"
    async with http.request("PATCH", URL(gateway.url + raw, encoded=True), data=body) as resp:
        assert resp.status == 404
        echo = (await resp.json())["echo"]
    assert echo == {
        "method": "PATCH",
        "path_qs": raw,
        "body_sha256": hashlib.sha256(body).hexdigest(),
    }


async def test_gemini_native_path(
    gateway: Gateway, fake: Fake, http: aiohttp.ClientSession
) -> None:
    async with http.post(
        f"{gateway.url}/v1beta/models/gemini-3-pro-image-preview:generateContent?alt=json",
        json={"contents": [{"parts": [{"text": "a red fox"}]}]},
        headers={"X-Fake-Image-Bytes": "2000000"},
    ) as resp:
        assert resp.status == 200
        answer = await resp.json()
    data = answer["candidates"][0]["content"]["parts"][0]["inlineData"]["data"]
    assert base64.b64decode(data) == png(2_000_000)
    assert fake.stats.last["path_qs"] == (
        "/v1beta/models/gemini-3-pro-image-preview:generateContent?alt=json"
    )


async def _generate_with_fault(
    http: aiohttp.ClientSession, gateway: Gateway, fault: str
) -> tuple[int, dict[str, str], bytes]:
    async with http.post(
        f"{gateway.url}/v1/images/generations",
        json={"model": "gpt-image-1", "prompt": "x"},
        headers={"X-Fake-Fault": fault},
    ) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def test_upstream_errors_pass_through_unchanged(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    status, headers, body = await _generate_with_fault(http, gateway, "429")
    assert status == 429
    assert headers["Retry-After"] == "7"
    assert "x-should-retry" not in headers
    assert json.loads(body)["error"]["code"] == 429

    status, _, body = await _generate_with_fault(http, gateway, "503")
    assert status == 503
    assert json.loads(body)["error"]["message"].startswith("The model is overloaded")

    # A broken body from the upstream is the upstream's answer: relayed, not rewritten.
    status, _, body = await _generate_with_fault(http, gateway, "malformed")
    assert status == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(body)


async def test_hop_by_hop_headers_are_not_forwarded(
    gateway: Gateway, fake: Fake, http: aiohttp.ClientSession
) -> None:
    async with http.get(
        f"{gateway.url}/v1/hop",
        headers={
            "Connection": "keep-alive, X-Caller-Hop",
            "X-Caller-Hop": "secret",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic c2VjcmV0",
            "X-Caller-End-To-End": "kept",
            "Authorization": "Bearer sk-caller",
        },
    ) as resp:
        assert resp.status == 404
        assert resp.headers["X-Upstream-End-To-End"] == "kept"
        for name in ("X-Upstream-Hop", "Keep-Alive", "Proxy-Authenticate"):
            assert name not in resp.headers
    sent = {k.lower(): v for k, v in fake.stats.last["headers"]}
    assert sent["x-caller-end-to-end"] == "kept"
    assert sent["authorization"] == "Bearer sk-caller"
    for name in ("x-caller-hop", "keep-alive", "te", "proxy-authorization"):
        assert name not in sent
    assert sent.get("connection", "keep-alive") == "keep-alive"  # the gateway's own hop


async def test_request_id_is_kept_or_made_and_logged_without_secrets(
    gateway: Gateway,
    fake: Fake,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    async with http.post(
        f"{gateway.url}/v1/images/generations",
        json={"model": "gpt-image-1", "prompt": "TOP-SECRET-PROMPT"},
        headers={"X-Request-ID": "req-42", "Authorization": "Bearer sk-SECRET-KEY"},
    ) as resp:
        assert resp.status == 200
        assert resp.headers["X-Request-ID"] == "req-42"
        await resp.read()
    assert dict(fake.stats.last["headers"])["X-Request-ID"] == "req-42"
    async with http.get(
        f"{gateway.url}/v1/models", headers={"X-Request-ID": "bad id with spaces %0a"}
    ) as resp:
        made = resp.headers["X-Request-ID"]
        assert len(made) == 32
        assert made != "req-42"
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.access"]
    generation = next(line for line in lines if line.startswith("req-42 "))
    assert "POST /v1/images/generations model=gpt-image-1 status=200" in generation
    assert "upstream_ms=" in generation
    assert "bytes_out=" in generation
    everything = "\n".join(r.getMessage() for r in caplog.records)
    assert "TOP-SECRET-PROMPT" not in everything
    assert "SECRET-KEY" not in everything


async def test_health_readiness_and_metrics(
    gateway: Gateway, http: aiohttp.ClientSession, sdk: openai.AsyncOpenAI
) -> None:
    await sdk.images.generate(model="gpt-image-1", prompt="x")
    await sdk.images.generate(model="my-private-model", prompt="x")
    for path, status in (("/healthz", 200), ("/readyz", 200)):
        async with http.get(gateway.url + path) as resp:
            assert resp.status == status
    async with http.get(f"{gateway.url}/metrics") as resp:
        text = await resp.text()
    labels = 'mode="sync",model="gpt-image-1",route="/v1/images/generations",status="200"'
    assert f"gateway_requests_total{{{labels}}} 1.0" in text
    # A model outside the config table cannot mint its own series.
    assert 'model="other"' in text
    assert "my-private-model" not in text


async def test_gateway_errors_use_the_openai_shape(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{gateway.url}/nowhere") as resp:
        assert resp.status == 404
        error = (await resp.json())["error"]
        assert set(error) == {"message", "type", "code"}


async def test_expect_100_continue_is_answered_by_the_gateway(
    gateway: Gateway, fake: Fake, http: aiohttp.ClientSession
) -> None:
    body = b'{"model":"gpt-image-1","prompt":"' + b"p" * 5000 + b'"}'
    async with http.post(
        f"{gateway.url}/v1/images/generations",
        data=body,
        headers={"Content-Type": "application/json"},
        expect100=True,
    ) as resp:
        assert resp.status == 200
    assert "expect" not in {k.lower() for k, _ in fake.stats.last["headers"]}
    assert fake.stats.last["body_sha256"] == hashlib.sha256(body).hexdigest()
