"""What one queue costs Redis, and what waiting for a replica costs a submit, in one run.

    python -m tests.perf.bench_queue [--tasks 3000] [--concurrency 32]

The store itself, no HTTP: `--tasks` tasks created by ten callers and claimed and finished by
`--concurrency` workers, on a standalone Redis with a replica and on a six-node Redis Cluster,
each with the replica wait (`tasks.replica_ack_timeout_ms`) on and off. Printed per run: the
tasks per second this one Python client drives, the latency of a create alone (the first 300
tasks, one at a time: p50/p99), the Redis commands and CPU per
task over all primaries and on the primary that holds the queue, and what that primary alone
could carry: every task passes its one stream, so that is the queue's ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from redis import Redis as SyncRedis
from redis.cluster import RedisCluster as SyncRedisCluster

from gateway.config import TasksConfig
from gateway.tasks.models import Job, StoredResponse, Task, TaskRecord
from gateway.tasks.redis import connect
from gateway.tasks.redis.observed import unobserved
from tests.redis_cluster import ClusterNodes
from tests.redis_server import RedisServer

_JOB = Job(
    method="POST",
    path_qs="/v1/images/generations",
    headers=[("content-type", "application/json")],
    body=b'{"model": "gpt-image-1", "prompt": "a lighthouse at dawn"}',
    deadline_s=300.0,
)
_ALONE = 300  # tasks created one at a time first
_ANSWER = StoredResponse(
    status=200, headers=[("content-type", "application/json")], body=b"x" * 2000
)


def _usage(port: int) -> tuple[float, int]:
    """A Redis's CPU seconds so far, and the commands it has run."""
    info = SyncRedis(port=port).info()
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"]), info[
        "total_commands_processed"
    ]


async def _run(url: str, primaries: list[int], queue_port: int, ack_ms: int, args: Any) -> str:
    prefix = f"q{ack_ms}{time.monotonic_ns()}"
    config = TasksConfig(
        redis_url=url, key_prefix=prefix, replica_ack_timeout_ms=ack_ms, workers=args.concurrency
    )
    store = connect(config, unobserved)
    created: list[float] = []  # one at a time: what a submit waits for, Redis alone

    async def create(i: int) -> None:
        task = Task(id=f"t{i}", status="queued", model="gpt-image-1", created_at=0)
        started = time.perf_counter()
        await store.create(TaskRecord(task=task, owner=f"caller{i % 10}"), _JOB)
        created.append(time.perf_counter() - started)

    async def submit(n: int) -> None:
        for i in range(_ALONE + n, args.tasks, 8):
            await create(i)

    finished = 0

    async def work() -> None:
        nonlocal finished
        while finished < args.tasks:
            claim = await store.claim(0.2)
            if claim is not None:
                await store.finish(claim.record.task.id, claim.record.attempt, _ANSWER)
                finished += 1

    for i in range(_ALONE):
        await create(i)
    p50, p99 = (statistics.quantiles(created, n=100)[q] * 1000 for q in (49, 98))
    before = {port: _usage(port) for port in primaries}
    started = time.perf_counter()
    await asyncio.gather(*(submit(n) for n in range(8)), *(work() for _ in range(args.concurrency)))
    seconds = time.perf_counter() - started
    used = {port: _usage(port)[0] - before[port][0] for port in primaries}
    commands = sum(_usage(port)[1] - before[port][1] for port in primaries) / args.tasks
    await store.close()
    total_us = sum(used.values()) / args.tasks * 1e6
    queue_us = used[queue_port] / args.tasks * 1e6
    return (
        f"{args.tasks / seconds:>7.0f} {p50:>8.2f} {p99:>8.2f} {commands:>6.1f} {total_us:>9.0f}"
        f" {queue_us:>9.0f}"
        f" {1e6 / queue_us:>10,.0f}"
    )


async def _main(args: Any) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-queue-"))
    (tmp / "primary").mkdir()
    (tmp / "replica").mkdir()
    primary = RedisServer(tmp / "primary", "--repl-diskless-sync-delay", "0")
    replica = RedisServer(tmp / "replica", "--replicaof", "127.0.0.1", str(primary.port))
    cluster = ClusterNodes(tmp / "cluster")
    try:
        while SyncRedis(port=replica.port).info("replication")["master_link_status"] != "up":
            await asyncio.sleep(0.05)
        nodes: Any = SyncRedisCluster.from_url(cluster.url)  # untyped in redis-py
        cluster_primaries = [node.port for node in nodes.get_primaries()]
        queue_port = nodes.get_node_from_key("any:{queue}").port  # the tag alone picks the slot
        nodes.close()
        print(f"{args.tasks} tasks, {args.concurrency} workers, one client process")
        print(
            f"{'store':<34} {'tasks/s':>7} {'new p50':>8} {'new p99':>8} {'cmds':>6}"
            f" {'Redis µs':>9} {'queue µs':>9} {'queue max/s':>10}"
        )
        for ack_ms in (0, 100):
            wait = "replica wait" if ack_ms else "no wait"
            line = await _run(primary.url, [primary.port], primary.port, ack_ms, args)
            print(f"{'standalone + replica, ' + wait:<34} {line}")
            line = await _run(cluster.url, cluster_primaries, queue_port, ack_ms, args)
            print(f"{'cluster 3+3, ' + wait:<34} {line}")
    finally:
        cluster.stop()
        replica.stop()
        primary.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    asyncio.run(_main(parser.parse_args()))
