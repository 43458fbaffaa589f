"""Streams both ways: events arrive as they are made, large bodies never wait to be whole."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import AsyncIterator

import aiohttp
import openai

from gateway.fake import png, png_b64
from tests.conftest import Fake, Gateway, GatewayFactory


async def test_chat_stream_arrives_event_by_event(sdk: openai.AsyncOpenAI) -> None:
    started = time.monotonic()
    arrivals: list[float] = []
    text = ""
    stream = await sdk.chat.completions.create(
        model="gemini-2.5-flash-image",
        messages=[{"role": "user", "content": "draw"}],
        stream=True,
        extra_headers={"X-Fake-Latency": "1.0", "X-Fake-Image-Bytes": "20000"},
    )
    async for chunk in stream:
        arrivals.append(time.monotonic() - started)
        text += chunk.choices[0].delta.content or ""
    assert text == f"![image](data:image/png;base64,{png_b64(20000)})"
    assert len(arrivals) == 4
    # The stand-in spaces its five events (four chunks and [DONE]) 0.2 s apart.
    assert arrivals[0] < 0.45
    assert arrivals[-1] > 0.7


async def test_image_stream_with_multi_megabyte_event_lines(sdk: openai.AsyncOpenAI) -> None:
    started = time.monotonic()
    events = []
    stream = await sdk.images.generate(
        model="gpt-image-1",
        prompt="a harbour",
        stream=True,
        partial_images=2,
        extra_headers={"X-Fake-Latency": "0.9", "X-Fake-Image-Bytes": "3000000"},
    )
    async for event in stream:
        events.append((time.monotonic() - started, event))
    kinds = [e.type for _, e in events]
    assert kinds == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    assert events[0][0] < 0.6
    assert events[-1][0] > 0.8
    assert base64.b64decode(events[-1][1].b64_json) == png(3_000_000)


async def test_twenty_megabyte_answer_streams_through(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    received = bytearray()
    async with http.post(
        f"{gateway.url}/v1/images/generations",
        json={"model": "gpt-image-1", "prompt": "big"},
        headers={"X-Fake-Image-Bytes": str(15 * 2**20)},
    ) as resp:
        assert resp.status == 200
        async for chunk in resp.content.iter_chunked(256 * 1024):
            received += chunk
    assert len(received) > 20 * 2**20
    assert len(received) == resp.content_length
    answer = json.loads(received)
    assert answer["data"][0]["b64_json"] == png_b64(15 * 2**20)


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def test_chunked_upload_is_streamed_and_its_model_found_late(
    gateway_factory: GatewayFactory, fake: Fake, http: aiohttp.ClientSession
) -> None:
    # A chat call carrying images puts `model` after megabytes of `messages`; its deadline
    # (1 s here, against the 300 s default) must still be the one that applies.
    gateway = await gateway_factory(timeouts={"models": {"gemini-2.5-flash-image": 1.0}})
    filler = b"A" * (3 * 2**20)
    parts = (
        b'{"messages":[{"role":"user","content":"',
        filler,
        b'"}],',
        b'"model":"gemini-2.5-flash-image"}',
    )
    started = time.monotonic()
    async with http.post(
        f"{gateway.url}/v1/chat/completions",
        data=_chunks(*parts),
        headers={"Content-Type": "application/json", "X-Fake-Latency": "5"},
    ) as resp:
        assert resp.status == 504
    assert 0.9 < time.monotonic() - started < 1.5
    assert fake.stats.last["body_sha256"] == hashlib.sha256(b"".join(parts)).hexdigest()


async def test_multipart_model_field_picks_the_deadline(
    gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gateway = await gateway_factory(timeouts={"models": {"gpt-image-1": 1.0}})
    form = aiohttp.FormData()
    form.add_field("prompt", "add a hat")
    form.add_field("model", "gpt-image-1")
    form.add_field("image", png(200_000), filename="in.png", content_type="image/png")
    started = time.monotonic()
    async with http.post(
        f"{gateway.url}/v1/images/edits", data=form, headers={"X-Fake-Latency": "5"}
    ) as resp:
        assert resp.status == 504
    assert abs(time.monotonic() - started - 1.0) < 0.5
