"""A large request body of a call run as a task (keyed, async) waits in the results store until
its task ends, as a large answer does: Redis keeps a pointer, never the body."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import signal
from pathlib import Path

import aiohttp
import psutil
from redis.asyncio import Redis

from tests.conftest import Fake, GatewayFactory, Spawn
from tests.redis_server import RedisServer

GENERATE = "/v1/images/generations"
KEY = {"Authorization": "Bearer sk-tenant-a", "Content-Type": "application/json"}


def _config(fake: Fake, redis: RedisServer, prefix: str, results: Path) -> str:
    return (
        f"[upstream]\nurl = '{fake.url}/v1'\n"
        f"[tasks]\nredis_url = '{redis.url}'\nkey_prefix = '{prefix}'\n"
        f"results_url = 'file://{results}'\n"
    )


def _body(size: int) -> bytes:
    return b'{"model": "gpt-image-1", "prompt": "' + os.urandom(size // 2).hex().encode() + b'"}'


async def _redis_bytes(redis: Redis, prefix: str) -> int:
    """What the gateway's keys hold in Redis, in bytes."""
    held = 0
    async for key in redis.scan_iter(match=f"{prefix}:*"):
        held += await redis.memory_usage(key) or 0
    return held


async def test_a_large_keyed_body_waits_in_the_results_store_not_in_redis(
    spawn: Spawn, fake: Fake, redis_server: RedisServer, tmp_path: Path
) -> None:
    """4 keyed calls of 130 MB put 963 MB in Redis: the body sat in the task's job."""
    results = tmp_path / "results"
    _, url = await spawn(_config(fake, redis_server, "bodies", results))
    body = _body(20_000_000)
    redis = Redis.from_url(redis_server.url)
    try:
        async with aiohttp.ClientSession() as http:
            headers = {**KEY, "Idempotency-Key": "poster-1", "X-Fake-Latency": "2"}
            call = asyncio.create_task(
                http.post(url + GENERATE, data=io.BytesIO(body), headers=headers)
            )
            await fake.until_running()
            # While it runs: a pointer in Redis, the body a file of the results store.
            assert await _redis_bytes(redis, "bodies") < 64 * 1024
            assert [p.stat().st_size for p in results.glob("*.request")] == [len(body)]
            async with await call as resp:
                assert resp.status == 200
                first = await resp.read()
            # The upstream got the caller's exact bytes, and the retry the same answer.
            assert fake.stats.last["body_sha256"] == hashlib.sha256(body).hexdigest()
            async with http.post(url + GENERATE, data=io.BytesIO(body), headers=headers) as resp:
                assert resp.headers["Idempotent-Replayed"] == "true"
                assert await resp.read() == first
        assert fake.stats.requests == 1
        # The body went with its task's end; the retry's copy with its replay.
        assert not list(results.glob("*.request"))
    finally:
        await redis.aclose()


async def test_a_queued_task_is_sent_its_body_from_the_results_store(
    spawn: Spawn, fake: Fake, redis_server: RedisServer, tmp_path: Path
) -> None:
    """An async task is run by whichever worker takes it: that worker reads the body back."""
    results = tmp_path / "results"
    _, url = await spawn(_config(fake, redis_server, "queued-bodies", results))
    body = _body(5_000_000)
    async with aiohttp.ClientSession() as http:
        headers = {**KEY, "Prefer": "respond-async, wait=30"}
        async with http.post(url + GENERATE, data=io.BytesIO(body), headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            assert json.loads(await resp.read())["data"]
    assert fake.stats.last["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert fake.stats.last["body_bytes"] == len(body)
    assert not list(results.glob("*.request"))


async def test_a_task_whose_body_is_gone_fails_clearly_and_sends_nothing(
    gateway_factory: GatewayFactory, fake: Fake, tmp_path: Path
) -> None:
    """A body swept (or lost with its store) before its task ran: the task fails, the upstream
    gets no call to bill, and the key's retry runs the call anew."""
    results = tmp_path / "results"
    gateway = await gateway_factory(tasks={"workers": 1, "results_url": f"file://{results}"})
    body = _body(3_000_000)
    async with aiohttp.ClientSession() as http:

        async def submit(latency_s: str, key: str) -> str:
            headers = {
                **KEY,
                "Prefer": "respond-async",
                "X-Fake-Latency": latency_s,
                "Idempotency-Key": key,
            }
            async with http.post(
                gateway.url + GENERATE, data=io.BytesIO(body), headers=headers
            ) as resp:
                assert resp.status == 202
                task_id: str = (await resp.json())["id"]
                return task_id

        async def result(task_id: str) -> tuple[int, dict[str, str], bytes]:
            async with http.get(
                f"{gateway.url}/v1/tasks/{task_id}/result", headers={**KEY, "Prefer": "wait=20"}
            ) as resp:
                return resp.status, dict(resp.headers), await resp.read()

        await submit("1", "busy")  # the one worker is busy with it
        waiting = await submit("0", "poster-lost")
        (results / f"{waiting}.request").unlink()
        status, headers, answer = await result(waiting)
        assert status == 503
        # Reading it again reads the same answer; the call itself may be sent again.
        assert headers["x-should-retry"] == "false"
        assert json.loads(answer)["error"]["code"] == "request_body_unavailable"
        assert fake.stats.requests == 1
        retried = await submit("0", "poster-lost")
        assert retried != waiting  # nothing was sent, so nothing is kept for the key
        assert (await result(retried))[0] == 200
    assert fake.stats.requests == 2


async def test_keyed_bodies_kept_in_the_results_store_cost_the_replica_little_memory(
    spawn: Spawn, fake: Fake, redis_server: RedisServer, tmp_path: Path
) -> None:
    """6 keyed calls of 130 MB grew a replica by 1.56 GB: each body was read whole into the
    heap and packed into its job. Now each is checked, hashed and copied from its spool file."""
    proc, url = await spawn(_config(fake, redis_server, "rss-bodies", tmp_path / "results"))
    rss_before = psutil.Process(proc.proc.pid).memory_info().rss
    body = _body(40_000_000)
    async with aiohttp.ClientSession() as http:

        async def call(n: int) -> int:
            headers = {
                **KEY,
                "Authorization": f"Bearer sk-tenant-{n}",
                "Idempotency-Key": f"poster-{n}",
                "X-Fake-Latency": "2",
            }
            async with http.post(url + GENERATE, data=io.BytesIO(body), headers=headers) as resp:
                await resp.read()
                return resp.status

        calls = asyncio.gather(*(call(n) for n in range(6)))
        await fake.until_running(6)
        peak_mb = (psutil.Process(proc.proc.pid).memory_info().rss - rss_before) / 2**20
        assert await calls == [200] * 6
    assert peak_mb < 150, peak_mb  # 240 MB of bodies in flight


async def test_a_caller_that_leaves_while_its_task_is_created_leaves_no_body_behind(
    spawn: Spawn, fake: Fake, redis_server: RedisServer, tmp_path: Path
) -> None:
    """A keyed call's body is put in the results store, then its task created. A caller that
    hung up in between (Redis slow, or the caller quick) had its handler cancelled, and its
    body stayed on the volume for the sweep, a day: 140 MB a drop, at a hostile caller's pace."""
    results = tmp_path / "results"
    _, url = await spawn(_config(fake, redis_server, "dropped", results))
    body = _body(3_000_000)
    host, port = url.removeprefix("http://").split(":")
    redis_server.proc.send_signal(signal.SIGSTOP)  # the creation waits: the window, held open
    try:
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"POST " + GENERATE.encode() + b" HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer sk-tenant-a\r\nContent-Type: application/json\r\n"
            b"Idempotency-Key: dropped-1\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        for _ in range(100):  # until the body is kept and its task's creation under way
            if list(results.glob("*.request")):
                break
            await asyncio.sleep(0.05)
        assert list(results.glob("*.request"))
        writer.close()
        await asyncio.sleep(3)  # past tasks.store_timeout_s: the creation gave up, fenced
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    await asyncio.sleep(1)
    assert not list(results.glob("*.request"))
    assert fake.stats.requests == 0


async def test_a_task_whose_body_cannot_be_read_from_a_hung_store_fails_in_seconds(
    gateway_factory: GatewayFactory, fake: Fake, tmp_path: Path
) -> None:
    """A results volume that hangs (a dead NFS server: the body's open never returns) held the
    worker that took the task, and the task, until the store came back: the task's deadline
    starts with its upstream call. It fails retryable, nothing sent, in the store's time."""
    results = tmp_path / "results"
    gateway = await gateway_factory(tasks={"workers": 1, "results_url": f"file://{results}"})
    async with aiohttp.ClientSession() as http:

        async def submit(latency_s: str) -> str:
            headers = {**KEY, "Prefer": "respond-async", "X-Fake-Latency": latency_s}
            async with http.post(
                gateway.url + GENERATE, data=io.BytesIO(_body(3_000_000)), headers=headers
            ) as resp:
                assert resp.status == 202
                task_id: str = (await resp.json())["id"]
                return task_id

        await submit("1")  # the one worker is busy with it
        waiting = await submit("0")
        hung = results / f"{waiting}.request"
        hung.unlink()
        os.mkfifo(hung)  # opening it for reading waits for a writer that never comes
        kept = tmp_path / "fifo"
        os.link(hung, kept)  # the failed task removes its body's name
        try:
            async with http.get(
                f"{gateway.url}/v1/tasks/{waiting}/result",
                headers={**KEY, "Prefer": "wait=25"},
                timeout=aiohttp.ClientTimeout(total=30),
            ) as resp:
                assert resp.status == 503
                assert json.loads(await resp.read())["error"]["code"] == (
                    "request_body_unavailable"
                )
        finally:
            with contextlib.suppress(OSError):  # lets a thread still opening it go
                os.close(os.open(kept, os.O_WRONLY | os.O_NONBLOCK))
    assert fake.stats.requests == 1
