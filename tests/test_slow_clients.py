"""Slow and hostile clients are cut off by timeouts instead of holding the gateway."""

from __future__ import annotations

import asyncio
import time

from gateway.fake import png_b64
from tests.conftest import Fake, Gateway, GatewayFactory


async def _connect(gateway: Gateway) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", int(gateway.url.rsplit(":", 1)[1]))


async def test_headers_trickled_slowloris_style_are_cut_off(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = await gateway_factory(server={"idle_timeout_s": 1.0})
    reader, writer = await _connect(gateway)
    started = time.monotonic()
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
    cut = False
    for i in range(20):  # a header line every 0.5 s: never a whole request
        await asyncio.sleep(0.5)
        try:
            writer.write(b"X-Slow-%d: y\r\n" % i)
            await writer.drain()
        except ConnectionError:
            cut = True
            break
        if reader.at_eof():
            cut = True
            break
    assert cut
    assert time.monotonic() - started < 4
    writer.close()


async def test_a_body_trickled_slower_than_the_deadline_is_cut_off(
    gateway: Gateway, fake: Fake
) -> None:
    reader, writer = await _connect(gateway)
    started = time.monotonic()
    writer.write(
        b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-a\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000\r\n"
        b"X-Request-Timeout: 1\r\n\r\n{"
    )
    answer = b""
    for _ in range(10):  # a byte a second: the whole body would take 1000 s
        await asyncio.sleep(0.5)
        try:
            writer.write(b" ")
            await writer.drain()
        except ConnectionError:
            break
        if reader.at_eof() or (answer := answer + await _available(reader)):
            break
    assert time.monotonic() - started < 3
    # Nothing was sent upstream, so this is the caller's timeout (retry-safe), not the
    # upstream's 504 ("may still be billing").
    assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
    assert b"x-should-retry: true" in answer
    assert fake.stats.requests == 0  # nothing half-sent upstream
    writer.close()


async def _available(reader: asyncio.StreamReader) -> bytes:
    try:
        return await asyncio.wait_for(reader.read(1000), 0.01)
    except TimeoutError:
        return b""


async def test_a_caller_that_never_reads_a_large_answer_is_dropped_at_its_deadline(
    gateway: Gateway, fake: Fake
) -> None:
    png_b64(20_000_000)  # made once beforehand, so the answer starts streaming at once
    reader, writer = await _connect(gateway)
    body = b'{"model": "gpt-image-1", "prompt": "x"}'
    writer.write(
        b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-a\r\n"
        b"Content-Type: application/json\r\nX-Request-Timeout: 2\r\n"
        b"X-Fake-Image-Bytes: 20000000\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    await writer.drain()
    await asyncio.sleep(3)  # never reading while the deadline passes
    received, closed = 0, False
    try:
        while chunk := await asyncio.wait_for(reader.read(1 << 20), 2):
            received += len(chunk)
        closed = True
    except ConnectionError:
        closed = True
    assert closed  # cut off, not left hanging
    # The gateway gave up on the caller (the answer is 27 MB of base64): it did not buffer the
    # rest for it, and the upstream call it was reading is gone too.
    assert received < 20_000_000
    assert fake.stats.running == 0
    writer.close()
