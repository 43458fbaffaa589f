"""A large task answer kept in Redis (no results URL, the default) is sent a range at a time as
its caller takes it: slow readers of a 30 MB answer cost the replica a chunk each, not a copy
each, and one caller may read only so many large answers at once."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import time
import uuid
from typing import Any

import aiohttp
import psutil
import redis.asyncio
from yarl import URL

from gateway.fake import png
from tests.conftest import Fake, Gateway, GatewayFactory, Spawn
from tests.helpers import GENERATE, KEY
from tests.redis_server import RedisServer

IMAGE_BYTES = 22_000_000  # 29.3 MB of base64 in the JSON answer


async def _completed(
    http: aiohttp.ClientSession, url: str, image_bytes: int, within_s: float = 60
) -> str:
    """A completed task's result URL, its answer `image_bytes` of image."""
    async with http.post(
        url + "/v1/images/generations",
        json=GENERATE,
        headers={**KEY, "Prefer": "respond-async", "X-Fake-Image-Bytes": str(image_bytes)},
    ) as resp:
        assert resp.status == 202
        task = url + resp.headers["Location"]
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        async with http.get(task, headers=KEY) as resp:
            status = (await resp.json())["status"]
        assert status in ("queued", "in_progress", "completed"), status
        if status == "completed":
            return task + "/result"
        await asyncio.sleep(0.1)
    raise AssertionError("task did not complete")


async def _stalled_reader(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A caller that asks for the result, reads its head and a little, then stops reading."""
    target = URL(url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (target.host, target.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    auth = KEY["Authorization"]
    writer.write(f"GET {target.path} HTTP/1.1\r\nHost: g\r\nAuthorization: {auth}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    await reader.readexactly(256 * 1024)
    return reader, writer


def _rss_mb(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / 2**20


async def test_twenty_slow_readers_of_a_30_mb_answer_cost_far_less_than_twenty_copies(
    spawn: Spawn, fake: Fake, redis_server: RedisServer
) -> None:
    proc, url = await spawn(
        f"[upstream]\nurl = '{fake.url}/v1'\n"
        f"[tasks]\nredis_url = '{redis_server.url}'\nkey_prefix = 'big-{uuid.uuid4().hex[:8]}'\n"
        "[server]\nresult_readers_per_caller = 20\n"
    )
    async with aiohttp.ClientSession() as http:
        result = await _completed(http, url, IMAGE_BYTES)
        # One whole read first: the answer is exactly the upstream's, and whatever a read
        # allocates once is in the baseline.
        async with http.get(result, headers=KEY) as resp:
            assert resp.status == 200
            answer = json.loads(await resp.read())
        assert base64.b64decode(answer["data"][0]["b64_json"]) == png(IMAGE_BYTES)
        del answer
        await asyncio.sleep(0.5)
        before_mb = _rss_mb(proc.proc.pid)
        readers = [await _stalled_reader(result) for _ in range(20)]
        try:
            await asyncio.sleep(2)  # the gateway sends each as far as it can
            growth_mb = _rss_mb(proc.proc.pid) - before_mb
            print(f"RSS {before_mb:.0f} MB before 20 slow readers, grew {growth_mb:.0f} MB")
            # Past the caller's cap on large answers read at once: 429 at once.
            async with http.get(result, headers=KEY) as resp:
                assert resp.status == 429
                assert resp.headers["Retry-After"] == "5"
                assert resp.headers["x-should-retry"] == "true"
                error: dict[str, Any] = (await resp.json())["error"]
                assert error["code"] == "too_many_connections"
        finally:
            for _, writer in readers:
                writer.close()
    # Twenty copies would be 600 MB (the whole answer read for each reader took the replica
    # from 64 MB to 1.5 GB); twenty chunks and socket buffers are a few MB.
    assert growth_mb < 100, growth_mb


async def test_an_answer_that_expires_mid_read_is_cut_short_never_completed(
    gateway_factory: GatewayFactory, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    prefix = f"big-{uuid.uuid4().hex[:8]}"
    gateway: Gateway = await gateway_factory(
        tasks={"redis_url": redis_server.url, "key_prefix": prefix}
    )
    result = await _completed(http, gateway.url, IMAGE_BYTES)  # far past socket buffers
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        async with http.get(result, headers=KEY) as resp:
            assert resp.status == 200
            size = resp.content_length
            assert size is not None
            got = await resp.content.readexactly(64 * 1024)
            task_id = result.rsplit("/", 2)[1]
            assert await client.delete(f"{prefix}:{{{task_id}}}:result") == 1
            with contextlib.suppress(aiohttp.ClientPayloadError):
                got += await resp.content.read()
        assert len(got) < size  # cut, so the caller knows it is not the answer
    finally:
        await client.aclose()
