"""What a call run as a task costs in CPU, beside the same call made plainly (issue 14).

    python -m tests.perf.bench_taskcpu [--calls 1000] [--rate 100] [--store both] [--monitor 20]
                                       [--rounds 1]

Real processes on loopback: the APIYI stand-in answering at once, one redis-server, and one
`gateway serve` per store (default config: 16 workers inside, a caller concurrency slot).
Each mode sends `--calls` calls at `--rate` per second (open loop), after a warm-up:
  plain  POST /v1/images/generations;       wait  the same with `Prefer: respond-async, wait=120`;
  sse    `Prefer: respond-async`, 202, then GET .../events to `completed` and GET .../result;
  sdk    `x-stainless-retry-count: 0` (an OpenAI SDK call: run once, as a task run here);
  202    `Prefer: respond-async` answered 202 only, at `--submit-rate` (the submit p99 target).
CPU is utime+stime from /proc of the gateway and of redis-server, not wall time: the machine is
shared. Commands and round trips are INFO deltas (round trips: `total_reads_processed`, one per
request or pipeline read). `--monitor N` then runs N tasks per mode one at a time under MONITOR,
the HTTP side (`serve`, no workers) and the workers (`gateway worker`) in two processes, so a
command is told apart by the process that sent it and put in a phase: submit, claim, start,
renew, watch (a worker's cancel watcher), finish, deliver (wait=N, SSE and result reads).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import re
import statistics
import tempfile
import time
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from redis.asyncio import Redis

from gateway.tasks.redis.scripts import script
from tests.perf.bench_async import pct
from tests.perf.bench_sync import cpu_s
from tests.procs import GatewayProcess, free_port
from tests.redis_server import RedisServer

BODY = {"model": "gpt-image-1", "prompt": "a lighthouse at dawn", "size": "1024x1024"}
KEY = {"Authorization": "Bearer sk-bench"}
ASYNC = {"Prefer": "respond-async"}
MODES = {"plain": {}, "wait": {"Prefer": "respond-async, wait=120"}, "sse": ASYNC}
MODES |= {"sdk": {"x-stainless-retry-count": "0"}, "202": ASYNC}
LUA = resources.files("gateway.tasks.redis").joinpath("lua")
TEXT = {p.name[:-4]: script(p.name[:-4]) for p in LUA.iterdir() if p.name.endswith(".lua")}
# MONITOR shows a script by its text (EVAL, escaped) or its SHA1 (EVALSHA): both are told by
# the SHA1 of the text the gateway sends (some with libraries prepended: `fair`, `slots`, `task`).
LIBRARIES = ("fair", "slots", "task")
PREFIXES = ("", *(TEXT[lib] for lib in LIBRARIES), TEXT["slots"] + TEXT["fair"] + TEXT["task"])
SHAS = {
    hashlib.sha1((prefix + TEXT[name]).encode()).hexdigest(): name
    for name in TEXT
    if name not in LIBRARIES
    for prefix in PREFIXES
}
PHASE = {"create": "submit", "enqueue": "submit", "open": "submit", "take": "claim"}
PHASE |= {"requeue_lost": "claim"}
PHASE |= {"put_back": "claim", "acquire": "start", "start": "start", "renew_slots": "renew"}
PHASE |= {"end": "finish", "requeue": "finish", "forget_name": "finish", "ended": "finish"}
OTHER = {"SET": "submit", "GET": "start", "XCLAIM": "renew", "XAUTOCLAIM": "claim"}
OTHER |= {"XPENDING": "claim", "XACK": "finish", "XDEL": "finish", "ZREM": "finish"}
PHASES = ("submit", "claim", "start", "renew", "watch", "finish", "deliver", "other")
_LINE = re.compile(r"\+(\d+\.\d+) \[\d+ ([^\]]+)\] (.*)")
_ARG = re.compile(r'"((?:[^"\\]|\\.)*)"')


async def gateway(
    tmp: Path, name: str, upstream: str, redis: str | None, *, more: str = "", cmd: str = "serve"
) -> tuple[GatewayProcess, str]:
    """A gateway on the default config but for its store (and `more` [tasks] settings)."""
    store = f"redis_url = '{redis}'\n" if redis else ""
    config = tmp / f"{name}.toml"
    config.write_text(
        f"[server]\naccess_log = false\n[upstream]\nurl = '{upstream}'\n[tasks]\n{store}{more}"
    )
    if cmd == "worker":
        proc = GatewayProcess(["worker", "--config", str(config)], tmp / f"{name}.log")
        await asyncio.sleep(2)  # no port to wait for
        return proc, ""
    port = free_port()
    argv = ["serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    proc = GatewayProcess(argv, tmp / f"{name}.log")
    await proc.wait_listening(port)
    return proc, f"http://127.0.0.1:{port}"


async def call(http: aiohttp.ClientSession, url: str, mode: str) -> float:
    started = time.perf_counter()
    headers = KEY | MODES[mode]
    async with http.post(f"{url}/v1/images/generations", json=BODY, headers=headers) as resp:
        task = await resp.json()
        assert resp.status == (202 if mode in ("sse", "202") else 200), (resp.status, task)
    if mode == "sse":
        async with http.get(url + task["events_url"], headers=KEY) as events:
            assert b"event: completed" in await events.read()
        async with http.get(url + task["result_url"], headers=KEY) as resp:
            assert resp.status == 200, resp.status
            await resp.read()
    return time.perf_counter() - started


async def paced(http: aiohttp.ClientSession, url: str, mode: str, n: int, rate: float) -> Any:
    start, pending = time.monotonic(), []
    for i in range(n):  # open loop: a slow answer does not hold back the next call
        await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
        pending.append(asyncio.ensure_future(call(http, url, mode)))
    return await asyncio.gather(*pending)


async def settled(http: aiohttp.ClientSession, fake: str, upstream_calls: int) -> None:
    """Every upstream call answered (a 202's task too), then time for the bookkeeping after."""
    while True:
        async with http.get(f"{fake}/_fake/stats") as resp:
            stats = await resp.json()
        if stats["requests"] >= upstream_calls and not stats["running"]:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)


async def info(redis: Redis | None) -> dict[str, tuple[int, int]]:
    """Redis's counters: (calls, usec) per command; (read events, 0) and (connections, 0)."""
    if redis is None:
        return {}
    got = await redis.info("all")  # one command: its own read is the one taken off
    stats = {k[8:]: (v["calls"], v["usec"]) for k, v in got.items() if k.startswith("cmdstat_")}
    reads, conns = got["total_reads_processed"] - 1, got["total_connections_received"]
    return stats | {"reads": (reads, 0), "conns": (conns, 0)}


class Bench:
    """One gateway under measurement: its process and Redis's, the fake's upstream count."""

    def __init__(self, args: Any, http: aiohttp.ClientSession, url: str, fake: str) -> None:
        self.args, self.http, self.url, self.fake = args, http, url, fake
        self.pids: tuple[int, int] = (0, 0)
        self.redis: Redis | None = None
        self.upstream = 0

    def cpu(self) -> list[float]:
        return [cpu_s(pid) if pid else 0.0 for pid in self.pids]

    async def mode(self, store: str, mode: str, plain: float) -> tuple[float, float]:
        """Run `mode` once (a warm-up, then the measured calls) and print its line: gateway
        and Redis CPU ms per call."""
        args = self.args
        rate = args.submit_rate if mode == "202" else args.rate
        for n in (args.warm, args.calls):
            cpu0, info0 = self.cpu(), await info(self.redis)
            ms = sorted(t * 1000 for t in await paced(self.http, self.url, mode, n, rate))
            self.upstream += n
            await settled(self.http, self.fake, self.upstream)
            cpu1, info1 = self.cpu(), await info(self.redis)
        gw, rd = ((b - a) / n * 1000 for a, b in zip(cpu0, cpu1, strict=True))
        per = {
            k: [(b - a) / n for a, b in zip(info0.get(k, (0, 0)), v, strict=True)]
            for k, v in info1.items()
        }
        trips, conns = per.pop("reads", [0.0])[0], per.pop("conns", [0.0])[0]
        print(
            f"{mode:5} {store:6} {rate:3.0f}/s  gateway {gw:5.2f} ms x{gw / (plain or gw):4.1f}  "
            f"Redis {rd:5.3f} ms {sum(c for c, _ in per.values()):5.1f} cmds "
            f"{trips:4.1f} round trips {conns:4.2f} connects  "
            f"p50 {statistics.median(ms):5.2f} ms p99 {pct(ms, 0.99):6.2f} ms"
        )
        # By Redis-side time; a script's includes the commands it ran, listed as well.
        top = sorted(((u, c, k) for k, (c, u) in per.items() if c), reverse=True)
        if top and args.rounds == 1:
            print("   " + ", ".join(f"{k} {c:.1f}x {u:.0f}us" for u, c, k in top[:12]))
        return gw, rd


async def bench_store(args: Any, tmp: Path, fake: str, server: RedisServer | None) -> None:
    store = "redis" if server else "memory"
    proc, url = await gateway(tmp, store, f"{fake}/v1", server.url if server else None)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            bench = Bench(args, http, url, fake)
            bench.pids = (proc.proc.pid, server.proc.pid if server else 0)
            bench.redis = Redis.from_url(server.url) if server else None
            async with http.get(f"{fake}/_fake/stats") as resp:
                bench.upstream = (await resp.json())["requests"]
            before = bench.cpu()
            await asyncio.sleep(3)  # idle workers and Redis's own timers, for scale
            idle = [(b - a) / 3 * 1000 for a, b in zip(before, bench.cpu(), strict=True)]
            # Each subscription gets every wake-up, and wakes a worker on each `queue` one.
            subs = (await bench.redis.pubsub_numsub("gw:wake"))[0][1] if bench.redis else 0
            print(
                f"\n{store}: idle CPU ms/s gateway {idle[0]:.2f}, Redis {idle[1]:.2f}; {subs} "
                "subscriptions to the wake-up channel"
            )
            rows: dict[str, list[tuple[float, float, float]]] = {mode: [] for mode in MODES}
            for _ in range(args.rounds):  # every mode in turn, again: the machine drifts
                plain = 0.0
                for mode in MODES:
                    gw, rd = await bench.mode(store, mode, plain)
                    plain = plain or gw
                    rows[mode].append((gw, gw / plain, rd))
            if bench.redis is not None:
                await bench.redis.aclose()
        if args.rounds > 1:
            print(f"{store}: medians of {args.rounds} rounds (x: to the plain call of its round)")
            for mode, got in rows.items():
                gw, ratio, rd = (statistics.median(column) for column in zip(*got, strict=True))
                print(f"  {mode:5} gateway {gw:5.2f} ms x{ratio:4.2f}  Redis {rd:5.3f} ms")
    finally:
        proc.close()


def phase_of(cmd: str, argv: list[str], front: bool, sdk: bool) -> tuple[str, str]:
    """(phase, label) of a command a gateway sent (not one a script ran)."""
    name = SHAS.get(argv[0], "") if cmd == "EVALSHA" and argv else ""
    if cmd == "EVAL" and argv:
        text = argv[0].encode("latin-1").decode("unicode_escape")  # as MONITOR escaped it
        name = SHAS.get(hashlib.sha1(text.encode()).hexdigest(), "?")
    if name == "hold_here":
        return ("renew" if argv[-1] == "XX" else "submit"), f"{cmd} {name}"
    if name:
        return PHASE.get(name, "other"), f"{cmd} {name}"
    key = argv[0] if argv else ""
    if cmd in ("LRANGE", "LLEN", "HGET", "HMGET", "GET") and not key.endswith(":job"):
        if front:  # a task run here has no waiter in front: its reads are its cancel watcher's
            return ("watch" if sdk and not key.endswith(":result") else "deliver"), cmd
        return ("start" if cmd == "HMGET" else "watch"), cmd
    return OTHER.get(cmd, "other"), cmd


async def bench_phases(args: Any, tmp: Path, fake: str, server: RedisServer) -> None:
    more = "key_prefix = 'mon'\n"  # apart from the tasks of the runs before
    up = f"{fake}/v1"
    front, url = await gateway(tmp, "front", up, server.url, more=more + "workers = 0\n")
    back, _ = await gateway(tmp, "back", up, server.url, more=more, cmd="worker")
    print(
        f"\nPer task by phase, MONITOR over {args.monitor} tasks one at a time: round trips, "
        "commands sent (+ run by scripts), what was sent"
    )
    try:
        async with aiohttp.ClientSession() as http:
            for mode in ("wait", "sse", "sdk", "202"):
                for _ in range(5):  # warm: connections, scripts, subscriptions
                    await call(http, url, mode)
                await asyncio.sleep(0.5)
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(b"MONITOR\r\n")
                await reader.readline()
                lines = asyncio.ensure_future(reader.read())  # to EOF, after QUIT
                for _ in range(args.monitor):
                    await call(http, url, mode)
                    await asyncio.sleep(0.05)  # its bookkeeping after the answer
                connections = psutil.Process(front.proc.pid).net_connections("tcp")
                writer.write(b"QUIT\r\n")
                text = (await lines).decode(errors="replace")
                writer.close()
                report(mode, text.splitlines(), {c.laddr.port for c in connections}, args.monitor)
    finally:
        front.close()
        back.close()


def report(mode: str, lines: list[str], front_ports: set[int], n: int) -> None:
    count: dict[str, Counter[str]] = {k: Counter() for k in ("rt", "cmds", "ran")}
    labels: dict[str, Counter[str]] = {p: Counter() for p in PHASES}
    client, last_at, phase = "", 0.0, "other"
    for line in lines:
        if not (m := _LINE.match(line)):
            continue
        at, (cmd, *argv) = float(m[1]), _ARG.findall(m[3])
        if m[2] == "lua":  # run by the script just sent: its phase's
            count["ran"][phase] += 1
            labels[phase]["PUBLISH" if cmd == "PUBLISH" else "(by scripts)"] += 1
        else:
            front = int(m[2].rpartition(":")[2]) in front_ports
            phase, label = phase_of(cmd.upper(), argv, front, mode == "sdk")
            # A pipeline is read at once: the same client again, right after its last command.
            count["rt"][phase] += m[2] != client or at - last_at > 30e-6
            count["cmds"][phase] += 1
            labels[phase][label] += 1
            client = m[2]
        last_at = at
    print(f"{mode}:")
    for p in (*PHASES, "total"):
        rt, cmds, ran = (c.total() if p == "total" else c[p] for c in count.values())
        what = ", ".join(f"{k} {v / n:.1f}" for k, v in labels.get(p, Counter()).most_common())
        if cmds:
            print(f"  {p:8} {rt / n:4.1f} rt {cmds / n:4.1f} cmds (+{ran / n:4.1f})  {what}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--submit-rate", type=float, default=200.0, help="of the 202 mode")
    parser.add_argument("--warm", type=int, default=100)
    parser.add_argument("--store", choices=("redis", "memory", "both"), default="both")
    parser.add_argument("--monitor", type=int, default=20, help="tasks per mode; 0: none")
    parser.add_argument("--rounds", type=int, default=1, help="of all modes; >1: medians")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        port = free_port()
        argv = ["fake-upstream", "--port", str(port), "--image-bytes", "2000"]
        fake = GatewayProcess(argv, tmp / "fake.log")
        server = RedisServer(tmp)
        try:
            await fake.wait_listening(port)
            url = f"http://127.0.0.1:{port}"
            for store in ("redis", "memory") if args.store == "both" else (args.store,):
                await bench_store(args, tmp, url, server if store == "redis" else None)
            if args.monitor and args.store != "memory":
                await bench_phases(args, tmp, url, server)
        finally:
            fake.close()
            server.stop()


if __name__ == "__main__":
    asyncio.run(main())
