"""What running once costs a call, and what one tenant's backlog costs another, in one run.

    python -m tests.perf.bench_runonce [--calls 500] [--backlog 400]

Real processes on loopback: the APIYI stand-in answering at once (`gateway fake-upstream`), one
`redis-server`, and two gateways, one on the embedded store and one on Redis.
  1. added latency of an OpenAI SDK call (`x-stainless-retry-count: 0`, so it runs once, as a
     task run by the replica holding the caller) over the same call made plainly, one
     connection, the two kinds interleaved so both see the same machine; p50 and p99;
  2. tenant B's one async task (`Prefer: respond-async, wait=60`) submitted behind tenant A's
     `--backlog` queued tasks of 0.5 s each on 4 workers: B's time to its answer, beside what
     A's backlog would take to drain (what B would wait in a first-come queue).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp

from tests.perf.bench_async import pct
from tests.procs import GatewayProcess, free_port
from tests.redis_server import RedisServer

BODY = {"model": "gpt-image-1", "prompt": "a lighthouse at dawn", "size": "1024x1024"}
IMAGE_BYTES = 2_000
WORKERS = 4
SLOT_S = 0.5


async def _gateway(
    tmp: Path, name: str, upstream: str, redis_url: str | None, procs: list[GatewayProcess]
) -> str:
    port = free_port()
    store = f"redis_url = '{redis_url}'\n" if redis_url else ""
    config = tmp / f"{name}.toml"
    config.write_text(
        "[server]\naccess_log = false\n"
        f"[upstream]\nurl = '{upstream}'\npool_size = 0\n"
        f"[tasks]\n{store}workers = {WORKERS}\n"
    )
    proc = GatewayProcess(
        ["serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
        tmp / f"{name}.log",
    )
    procs.append(proc)
    await proc.wait_listening(port)
    return f"http://127.0.0.1:{port}"


async def _call(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> float:
    started = time.perf_counter()
    async with http.post(f"{url}/v1/images/generations", json=BODY, headers=headers) as resp:
        await resp.read()
        assert resp.status == 200, resp.status
    return time.perf_counter() - started


async def bench_added(http: aiohttp.ClientSession, name: str, url: str, calls: int) -> None:
    key = {"Authorization": "Bearer sk-bench"}
    sdk = {**key, "x-stainless-retry-count": "0"}
    for _ in range(50):  # warm both paths
        await _call(http, url, key)
        await _call(http, url, sdk)
    plain: list[float] = []
    once: list[float] = []
    for _ in range(calls):
        plain.append(await _call(http, url, key))
        once.append(await _call(http, url, sdk))
    p50 = (statistics.median(once) - statistics.median(plain)) * 1000
    p99 = (pct(once, 0.99) - pct(plain, 0.99)) * 1000
    print(
        f"{name:<16} plain p50 {statistics.median(plain) * 1000:6.2f} ms  "
        f"p99 {pct(plain, 0.99) * 1000:6.2f} ms | SDK call p50 "
        f"{statistics.median(once) * 1000:6.2f} ms  p99 {pct(once, 0.99) * 1000:6.2f} ms | "
        f"added p50 {p50:5.2f} ms  p99 {p99:5.2f} ms"
    )


async def bench_backlog(http: aiohttp.ClientSession, name: str, url: str, backlog: int) -> None:
    flood = {
        "Authorization": "Bearer sk-tenant-a",
        "Prefer": "respond-async",
        "X-Fake-Latency": str(SLOT_S),
    }
    for _ in range(backlog):
        async with http.post(f"{url}/v1/images/generations", json=BODY, headers=flood) as resp:
            assert resp.status == 202, resp.status
    await asyncio.sleep(1.0)  # the workers are busy with A's tasks
    waits: list[float] = []
    for i in range(3):
        headers = {
            "Authorization": f"Bearer sk-tenant-b{i}",
            "Prefer": "respond-async, wait=60",
            "X-Fake-Latency": str(SLOT_S),
        }
        started = time.perf_counter()
        async with http.post(f"{url}/v1/images/generations", json=BODY, headers=headers) as resp:
            assert resp.status == 200, resp.status
            await resp.read()
        waits.append(time.perf_counter() - started - SLOT_S)
    drain_s = backlog * SLOT_S / WORKERS
    print(
        f"{name:<16} tenant B's wait for a worker behind {backlog} of A's tasks: "
        f"{', '.join(f'{w:.2f}' for w in waits)} s (one slot is {SLOT_S} s; "
        f"first-come would be up to {drain_s:.0f} s)"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--backlog", type=int, default=400)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        fake_port = free_port()
        fake = GatewayProcess(
            ["fake-upstream", "--port", str(fake_port), "--image-bytes", str(IMAGE_BYTES)],
            tmp / "fake.log",
        )
        redis = RedisServer(tmp)
        gateways: list[GatewayProcess] = []
        try:
            await fake.wait_listening(fake_port)
            upstream = f"http://127.0.0.1:{fake_port}/v1"
            urls = {
                "embedded store": await _gateway(tmp, "embedded", upstream, None, gateways),
                "Redis": await _gateway(tmp, "redis", upstream, redis.url, gateways),
            }
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
                print(f"\n## Added latency of running once, {args.calls} calls each, 1 connection")
                for store, url in urls.items():
                    await bench_added(http, store, url, args.calls)
                print(f"\n## Fairness: {WORKERS} workers, tasks of {SLOT_S} s")
                for store, url in urls.items():
                    await bench_backlog(http, store, url, args.backlog)
        finally:
            for proc in (*gateways, fake):
                proc.close()
            redis.stop()


if __name__ == "__main__":
    asyncio.run(main())
