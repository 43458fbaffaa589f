"""Async tasks benchmark: three gateway processes on one real Redis, all in one run.

    python -m tests.perf.bench_async [--rate 200] [--seconds 10] [--tasks 2000]

Replicas A and B run tasks; replica C runs none, so every event C streams is another
replica's. The APIYI stand-in is a process of its own (`gateway fake-upstream`) and stamps each
answer with the wall-clock time it left (`X-Fake-Sent-At`), which the task result keeps.
  1. submit-to-202 latency at a fixed rate (open loop, spread over A and B), beside a Redis
     PING and a sync pass-through call measured by the same client in the same run;
  2. cross-replica event latency: from the stand-in sending a task's answer (to replica A or B)
     to the `completed` event reaching an SSE client on C;
  3. `--tasks` tasks in flight over A and B, A killed with SIGKILL half-way and started again:
     tasks lost, tasks with other than exactly one terminal event, results that differ from what
     the upstream made, and upstream calls made.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from redis.asyncio import Redis

from gateway.fake import png
from tests.perf.bench_sync import cpu_s
from tests.procs import GatewayProcess, free_port
from tests.redis_server import RedisServer

KEY = {"Authorization": "Bearer sk-bench"}
IMAGE_BYTES = 2_000
TERMINAL = ("completed", "failed", "cancelled")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(name: str, values_s: list[float]) -> str:
    ms = [v * 1000 for v in values_s]
    return (
        f"{name:<44} n={len(ms):>5}  p50 {statistics.median(ms):7.2f} ms  "
        f"p99 {pct(ms, 0.99):7.2f} ms  max {max(ms):7.2f} ms"
    )


class Cluster:
    def __init__(self, tmp: Path, redis: RedisServer, upstream: str) -> None:
        self._tmp, self.redis_url, self._upstream = tmp, redis.url, upstream
        self.redis_pid = redis.proc.pid
        self.procs: dict[str, GatewayProcess] = {}
        self.urls: dict[str, str] = {}

    async def start(self, name: str, workers: int, command: str = "serve") -> None:
        port = free_port()
        config = self._tmp / f"{name}.toml"
        config.write_text(
            "[server]\naccess_log = false\ndrain_timeout_s = 1.0\n"
            f"[upstream]\nurl = '{self._upstream}'\npool_size = 0\n"
            f"[tasks]\nredis_url = '{self.redis_url}'\nworkers = {workers}\nlease_s = 5.0\n"
            # One key submits every task here: past the default cap it would get 429s.
            "max_queued_per_caller = 100000\n"
        )
        args = [command, "--config", str(config)]
        if command == "serve":
            args += ["--host", "127.0.0.1", "--port", str(port)]
        proc = GatewayProcess(args, self._tmp / f"{name}-{port}.log")
        self.procs[name], self.urls[name] = proc, f"http://127.0.0.1:{port}"
        if command == "serve":
            await proc.wait_listening(port)
        else:
            await asyncio.sleep(2)  # no port to wait for; it logs when it runs

    def close(self) -> None:
        for proc in self.procs.values():
            proc.close()


async def submit(http: aiohttp.ClientSession, url: str, latency_s: float) -> tuple[str, float]:
    started = time.monotonic()
    async with http.post(
        f"{url}/v1/images/generations",
        json={"model": "gpt-image-1", "prompt": "a lighthouse"},
        headers={
            **KEY,
            "Prefer": "respond-async",
            "X-Fake-Latency": str(latency_s),
            "X-Fake-Image-Bytes": str(IMAGE_BYTES),
        },
    ) as resp:
        body = await resp.json()
        assert resp.status == 202, body
    return body["id"], time.monotonic() - started


async def bench_submit(
    http: aiohttp.ClientSession, cluster: Cluster, rate: int, seconds: int, run: bool
) -> None:
    redis = Redis.from_url(cluster.redis_url)
    pings = []
    for _ in range(500):
        started = time.monotonic()
        await redis.ping()
        pings.append(time.monotonic() - started)
    await redis.aclose()
    syncs = []
    for _ in range(300):
        started = time.monotonic()
        async with http.get(f"{cluster.urls['A']}/v1/models", headers=KEY) as resp:
            await resp.read()
        syncs.append(time.monotonic() - started)
    urls = [cluster.urls["A"], cluster.urls["B"]]
    pids = [p.proc.pid for p in cluster.procs.values()]

    def cpu() -> tuple[float, float]:  # every gateway process's, and Redis's
        return sum(cpu_s(pid) for pid in pids), cpu_s(cluster.redis_pid)

    before = cpu()
    start = time.monotonic()
    pending = []
    for i in range(rate * seconds):
        await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
        pending.append(asyncio.ensure_future(submit(http, urls[i % 2], latency_s=0.5)))
    results = await asyncio.gather(*pending)
    took = time.monotonic() - start
    print(f"\n1. submit-to-202 at {rate}/s for {seconds} s (achieved {len(results) / took:.0f}/s)")
    print(summary("Redis PING (same client, for scale)", pings))
    print(summary("sync GET /v1/models through the gateway", syncs))
    print(summary("async submit, 202 received", [t for _, t in results]))
    if run:
        await wait_all(http, cluster.urls["C"], [t for t, _ in results], within_s=120)
    # Submit to completed (or submit alone, with no workers), the follower's polls included.
    spent = [(b - a) / len(results) * 1000 for a, b in zip(before, cpu(), strict=True)]
    what = "submit to completed" if run else "submit"
    print(f"CPU per task, {what}: gateways {spent[0]:.2f} ms, Redis {spent[1]:.3f} ms")


async def bench_events(http: aiohttp.ClientSession, cluster: Cluster, count: int) -> None:
    lags: list[float] = []

    async def one(i: int) -> None:
        task_id, _ = await submit(http, cluster.urls["AB"[i % 2]], latency_s=0.2)
        url = f"{cluster.urls['C']}/v1/tasks/{task_id}"
        async with http.get(f"{url}/events", headers=KEY) as sse:
            async for line in sse.content:
                if line.startswith(b"event: completed"):
                    arrived = time.time()
                    break
        async with http.get(f"{url}/result", headers=KEY) as resp:
            lags.append(arrived - float(resp.headers["X-Fake-Sent-At"]))

    for batch in range(0, count, 10):
        await asyncio.gather(*(one(i) for i in range(batch, batch + 10)))
    print(f"\n2. completion event on another replica ({count} tasks, 10 at a time)")
    print(summary("upstream answer sent -> SSE event on C", lags))


async def wait_all(
    http: aiohttp.ClientSession, url: str, task_ids: list[str], within_s: float
) -> dict[str, Any]:
    deadline = time.monotonic() + within_s
    open_ids, ended = set(task_ids), {}
    while open_ids and time.monotonic() < deadline:
        for task_id in list(open_ids):
            async with http.get(f"{url}/v1/tasks/{task_id}", headers=KEY) as resp:
                task = await resp.json() if resp.status == 200 else {"status": "?"}
            if task["status"] in TERMINAL:
                ended[task_id] = task
                open_ids.discard(task_id)
        await asyncio.sleep(0.5)
    return ended


async def check(http: aiohttp.ClientSession, url: str, task_id: str) -> str | None:
    """None when the task completed exactly once with the upstream's image; else what is wrong."""
    async with http.get(f"{url}/v1/tasks/{task_id}/events", headers=KEY) as resp:
        raw = (await resp.read()).decode()
    terminal = [
        line.split(": ", 1)[1]
        for line in raw.splitlines()
        if line.startswith("event: ") and line.split(": ", 1)[1] in TERMINAL
    ]
    if terminal != ["completed"]:
        return f"terminal events {terminal}"
    async with http.get(f"{url}/v1/tasks/{task_id}/result", headers=KEY) as resp:
        image = base64.b64decode((await resp.json())["data"][0]["b64_json"])
    return None if image == png(IMAGE_BYTES) else "result differs from the upstream's"


async def bench_kill(
    http: aiohttp.ClientSession, cluster: Cluster, fake_url: str, count: int, victim: str
) -> None:
    async def stats() -> Any:
        async with http.get(f"{fake_url}/_fake/stats") as resp:
            return await resp.json()

    before = (await stats())["requests"]
    started = time.monotonic()
    ids: list[str] = []
    sem = asyncio.Semaphore(64)

    async def one(i: int) -> None:
        async with sem:
            ids.append((await submit(http, cluster.urls["AB"[i % 2]], latency_s=3.0))[0])

    await asyncio.gather(*(one(i) for i in range(count)))
    # Half-way: about half the generations have been answered.
    while (now := await stats())["requests"] - before - now["running"] < count // 2:
        await asyncio.sleep(0.05)
    running_at_kill = now["running"]
    cluster.procs[victim].proc.send_signal(signal.SIGKILL)
    cluster.procs[victim].proc.wait()
    # A replacement, as an orchestrator would start one.
    await cluster.start(victim, workers=200, command="worker" if victim == "WA" else "serve")
    ended = await wait_all(http, cluster.urls["C"], ids, within_s=300)
    problems = [p for p in [await check(http, cluster.urls["C"], t) for t in ended] if p]
    print(f"\n3. {count} tasks over two replicas, {victim} killed with SIGKILL half-way")
    print(f"   tasks submitted {len(ids)}, ended {len(ended)}, lost {len(ids) - len(ended)}")
    print(f"   not exactly one `completed` with the upstream's image: {len(problems)}")
    for problem in sorted(set(problems))[:5]:
        print(f"     {problems.count(problem)} x {problem}")
    print(
        f"   upstream calls {(await stats())['requests'] - before} for {count} tasks "
        f"(generations in flight at the kill: {running_at_kill}, on A and B); "
        f"{time.monotonic() - started:.0f} s"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=200)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--workers", type=int, default=200, help="task workers on A and on B")
    parser.add_argument(
        "--split",
        action="store_true",
        help="A and B only serve HTTP; the workers run in two `gateway worker` processes, "
        "WA and WB (WA is the one killed)",
    )
    args = parser.parse_args()

    fake_port = free_port()
    fake_url = f"http://127.0.0.1:{fake_port}"
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisServer(Path(tmp))
        cluster = Cluster(Path(tmp), redis, f"{fake_url}/v1")
        fake = GatewayProcess(
            ["fake-upstream", "--port", str(fake_port), "--image-bytes", str(IMAGE_BYTES)],
            Path(tmp) / "fake.log",
        )
        try:
            await fake.wait_listening(fake_port)
            serving = 0 if args.split else args.workers
            await cluster.start("A", workers=serving)
            await cluster.start("B", workers=serving)
            await cluster.start("C", workers=0)
            if args.split:
                await cluster.start("WA", workers=args.workers, command="worker")
                await cluster.start("WB", workers=args.workers, command="worker")
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=connector) as http:
                await bench_submit(http, cluster, args.rate, args.seconds, args.workers > 0)
                if args.workers == 0:
                    return  # submit latency alone, with no task running beside it
                await bench_events(http, cluster, args.events)
                await bench_kill(http, cluster, fake_url, args.tasks, "WA" if args.split else "A")
        finally:
            cluster.close()
            fake.close()
            redis.stop()


if __name__ == "__main__":
    asyncio.run(main())
