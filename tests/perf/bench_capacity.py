"""What a task costs Redis, and how many tasks a second 1, 2 and 3 gateways get through, on a
standalone Redis and on a Redis Cluster, in one run.

    python -m tests.perf.bench_capacity [--tasks 40] [--seconds 10] [--clients 64]

Real processes on loopback: the APIYI stand-in answering at once, a `redis-server` and a
six-node Redis Cluster (three primaries), and up to three `gateway serve` processes.
  1. Redis bytes per task at rest, from `MEMORY USAGE` over every key the tasks left, for a
     task whose result is a 3 MB image (about 4 MB of JSON);
  2. tasks per second, submit to completed (`Prefer: respond-async, wait=30`, one request per
     task), `--clients` callers spread over 1, 2 and 3 gateways with 16 workers each.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from tests.procs import GatewayProcess, free_port
from tests.redis_cluster import ClusterNodes
from tests.redis_server import RedisServer

BODY = {"model": "gpt-image-1", "prompt": "a lighthouse at dawn"}
KEY = {"Authorization": "Bearer sk-bench"}


async def _gateway(
    tmp: Path,
    name: str,
    upstream: str,
    redis_url: str,
    procs: list[GatewayProcess],
    prefix: str | None = None,
    results: Path | None = None,
) -> str:
    port = free_port()
    config = tmp / f"{name}.toml"
    config.write_text(
        "[server]\naccess_log = false\n"
        f"[upstream]\nurl = '{upstream}'\npool_size = 0\n"
        f"[tasks]\nredis_url = '{redis_url}'\nkey_prefix = '{prefix or name}'\nworkers = 16\n"
        + (f"results_url = 'file://{results}'\n" if results else "")
    )
    proc = GatewayProcess(
        ["serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
        tmp / f"{name}-{port}.log",
    )
    procs.append(proc)
    await proc.wait_listening(port)
    return f"http://127.0.0.1:{port}"


async def _task(http: aiohttp.ClientSession, url: str, **headers: str) -> None:
    async with http.post(
        f"{url}/v1/images/generations",
        json=BODY,
        headers={**KEY, "Prefer": "respond-async, wait=30", **headers},
    ) as resp:
        await resp.read()
        assert resp.status == 200, resp.status


async def bytes_per_task(
    http: aiohttp.ClientSession, url: str, client: Any, prefix: str, tasks: int
) -> float:
    for _ in range(tasks):
        await _task(http, url, **{"X-Fake-Image-Bytes": str(3_000_000)})
    total = 0
    async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        total += await client.memory_usage(key) or 0
    return total / tasks


async def tasks_per_second(
    http: aiohttp.ClientSession, urls: list[str], clients: int, seconds: float
) -> float:
    done = 0
    stop = time.monotonic() + seconds

    async def caller(i: int) -> None:
        nonlocal done
        while time.monotonic() < stop:
            await _task(http, urls[i % len(urls)])
            done += 1

    started = time.monotonic()
    await asyncio.gather(*(caller(i) for i in range(clients)))
    return done / (time.monotonic() - started)


async def _run(args: argparse.Namespace, tmp: Path) -> None:
    fake_port = free_port()
    fake = GatewayProcess(["fake-upstream", "--port", str(fake_port)], tmp / "fake.log")
    (tmp / "redis").mkdir()
    redis = RedisServer(tmp / "redis")
    cluster = ClusterNodes(tmp / "cluster")
    procs: list[GatewayProcess] = []
    try:
        await fake.wait_listening(fake_port)
        upstream = f"http://127.0.0.1:{fake_port}/v1"
        stores: dict[str, tuple[str, Any]] = {
            "standalone Redis": (redis.url, Redis.from_url(redis.url)),
            "Redis Cluster (3 primaries)": (cluster.url, RedisCluster.from_url(cluster.url)),
        }
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as http:
            print(f"\n## Redis bytes per task at rest, 3 MB image result, {args.tasks} tasks")
            for name, (url, client) in stores.items():
                for results in (None, tmp / f"results-{len(procs)}"):
                    prefix = f"mem{len(procs)}"
                    gateway = await _gateway(tmp, prefix, upstream, url, procs, results=results)
                    per_task = await bytes_per_task(http, gateway, client, prefix, args.tasks)
                    where = "in files" if results else "in Redis"
                    print(f"{name:<30} {per_task / 1024:10.1f} KB per task (results {where})")
            print(f"\n## Tasks per second, submit to completed, {args.clients} callers")
            for index, (name, (url, client)) in enumerate(stores.items()):
                urls: list[str] = []
                for count in (1, 2, 3):  # replicas of one deployment: one key prefix
                    gateway_name = f"tps{index}-{count}"
                    urls.append(
                        await _gateway(tmp, gateway_name, upstream, url, procs, f"tps{index}")
                    )
                    rate = await tasks_per_second(http, urls, args.clients, args.seconds)
                    print(f"{name:<30} {count} gateway(s): {rate:8.1f} tasks/s")
                for proc in procs:
                    proc.close()
                procs.clear()
                await client.aclose()
    finally:
        for proc in (*procs, fake):
            proc.close()
        redis.stop()
        cluster.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--clients", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        await _run(args, Path(name))


if __name__ == "__main__":
    asyncio.run(main())
