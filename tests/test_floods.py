"""A flood of bodies from one caller, or from callers made up by the hundred, costs a replica a
bounded amount of memory, and everyone else's calls still go through."""

from __future__ import annotations

import asyncio
import io
import json

import aiohttp
import psutil

from tests.conftest import Fake, Spawn

GENERATE = "/v1/images/generations"


def _body(size: int) -> bytes:
    """A JSON generation call of about `size` bytes (an edit's inline image, say)."""
    return b'{"model": "gpt-image-1", "prompt": "' + b"x" * size + b'"}'


async def test_async_submits_under_made_up_keys_cost_bounded_memory(
    spawn: Spawn, fake: Fake
) -> None:
    """Pass-through names a caller by any bearer it sends: 600 submits under 600 made-up keys
    took the embedded store from 62 to 702 MB. Queued jobs past a share of the heap wait on
    disk, and the queue's total caps every caller together."""
    proc, url = await spawn(
        f"[upstream]\nurl = '{fake.url}/v1'\n[tasks]\nworkers = 1\nmax_queued_total = 300\n"
    )
    rss_before = psutil.Process(proc.proc.pid).memory_info().rss
    body = _body(1_000_000)
    statuses: list[int] = []
    async with aiohttp.ClientSession() as http:

        async def submit(i: int) -> None:
            headers = {
                "Authorization": f"Bearer sk-made-up-{i}",
                "Prefer": "respond-async",
                "Content-Type": "application/json",
                "X-Fake-Latency": "10",  # the one worker is busy with the first: the rest wait
            }
            async with http.post(url + GENERATE, data=body, headers=headers) as resp:
                await resp.read()
                statuses.append(resp.status)

        for start in range(0, 320, 16):
            await asyncio.gather(*(submit(i) for i in range(start, start + 16)))
        growth_mb = (psutil.Process(proc.proc.pid).memory_info().rss - rss_before) / 2**20
        async with http.get(url + "/healthz") as resp:
            assert resp.status == 200
    assert statuses.count(202) == 301  # the one running and 300 queued
    assert statuses.count(429) == 19  # past the total, whoever the callers claim to be
    # 300 MB of queued requests: on disk past 64 MiB of them, not in the heap.
    assert growth_mb < 150, growth_mb


async def test_bodies_of_calls_run_once_are_capped_per_caller_and_in_all(
    spawn: Spawn, fake: Fake
) -> None:
    """A keyed call's body is held whole while it runs (6 x 130 MB took +1.56 GB): past the
    caller's share of bytes in flight the next is refused at once, safe to retry, and another
    caller still gets through until the replica's total is reached."""
    proc, url = await spawn(
        f"[upstream]\nurl = '{fake.url}/v1'\n"
        "[server]\ntask_body_bytes_per_caller = 50000000\ntask_body_bytes_total = 90000000\n"
    )
    rss_before = psutil.Process(proc.proc.pid).memory_info().rss
    body = _body(40_000_000)
    async with aiohttp.ClientSession() as http:

        async def call(key: str, n: int) -> tuple[int, dict[str, str], bytes]:
            headers = {
                "Authorization": f"Bearer {key}",
                "Idempotency-Key": f"poster-{n}",
                "Content-Type": "application/json",
                "X-Fake-Latency": "3",
            }
            data = io.BytesIO(body)
            async with http.post(url + GENERATE, data=data, headers=headers) as resp:
                return resp.status, dict(resp.headers), await resp.read()

        answers = await asyncio.gather(
            *(call("sk-tenant-a", n) for n in range(3)), call("sk-tenant-b", 9)
        )
        peak_mb = (psutil.Process(proc.proc.pid).memory_info().rss - rss_before) / 2**20
        later = await call("sk-tenant-a", 1)  # the refused call, retried once the first ended
    statuses = sorted(status for status, _, _ in answers)
    assert statuses == [200, 200, 429, 429], statuses
    refused = [(headers, answer) for status, headers, answer in answers if status == 429]
    for headers, answer in refused:
        assert headers["x-should-retry"] == "true"
        assert headers["Retry-After"] == "5"
        assert json.loads(answer)["error"]["code"] == "too_many_bytes_in_flight"
    assert later[0] == 200
    assert fake.stats.requests == 3  # nothing refused went upstream
    assert peak_mb < 250, peak_mb  # two 40 MB bodies held, not four
