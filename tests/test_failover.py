"""A Redis Cluster primary killed mid-run, its replica promoted: every accepted task ends exactly
once with the upstream's exact bytes, and submits during the failover get a fast, retryable 503
and succeed after it."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from pathlib import Path

import aiohttp
import pytest
from redis import Redis as SyncRedis
from redis.cluster import RedisCluster as SyncRedisCluster

from tests.conftest import Fake, Spawn
from tests.helpers import KEY
from tests.redis_cluster import ClusterNodes
from tests.redis_server import RedisServer
from tests.test_replicas import (
    IMAGE_BYTES,
    _assert_completed_once,
    _config,
    _submit,
    _until_all_ended,
)


def _primary_of(cluster: ClusterNodes, key: str) -> int:
    """The index, among the cluster's nodes, of the primary that holds `key`'s slot."""
    client = SyncRedisCluster.from_url(cluster.url)
    try:
        port = client.get_node_from_key(key).port  # type: ignore[no-untyped-call]
    finally:
        client.close()
    return next(i for i, node in enumerate(cluster.nodes) if node.port == port)


@pytest.mark.parametrize("holding", ["the queue", "task keys"])
async def test_a_primary_killed_mid_run_loses_no_task(
    spawn: Spawn, fake: Fake, tmp_path: Path, holding: str
) -> None:
    cluster = ClusterNodes(tmp_path / "cluster")
    try:
        prefix = "fo"
        config = _config(fake, cluster.nodes[0], prefix, workers=8, lease_s=3)
        _, url = await spawn(config)
        _, other = await spawn(config)
        async with aiohttp.ClientSession() as http:
            accepted = [await _submit(http, url, latency_s=2.0) for _ in range(8)]
            await fake.until_running(8)
            queue = _primary_of(cluster, f"{prefix}:{{queue}}")
            if holding == "the queue":
                victim = queue
            else:  # a primary holding some running tasks' keys, not the queue's
                owners = {_primary_of(cluster, f"{prefix}:{{{t}}}:task") for t in accepted}
                victim = next(iter(owners - {queue}))
            cluster.nodes[victim].proc.kill()  # mid-run
            refused = 0
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                started = time.monotonic()
                async with http.post(
                    f"{other}/v1/images/generations",
                    json={"model": "gpt-image-1", "prompt": "a lighthouse"},
                    headers={
                        **KEY,
                        "Prefer": "respond-async",
                        "X-Fake-Latency": "0.2",
                        "X-Fake-Image-Bytes": str(IMAGE_BYTES),
                    },
                ) as resp:
                    body = await resp.json()
                if resp.status == 202:
                    accepted.append(body["id"])
                    break
                assert resp.status == 503, body
                assert resp.headers["Retry-After"] == "1"
                assert time.monotonic() - started < 5  # fast: a client retries, not hangs
                refused += 1
                await asyncio.sleep(0.5)
            else:
                raise AssertionError("submits never succeeded after the failover")
            if refused:  # what an SRE sees of it: errors by reason, not one opaque count
                async with http.get(f"{other}/metrics") as resp:
                    exposed = await resp.text()
                reasons = re.findall(
                    r'gateway_store_errors_total\{op="\w+",reason="(\w+)"', exposed
                )
                assert set(reasons) & {"failover", "unreachable", "timeout"}, reasons
            tasks = await _until_all_ended(http, other, accepted, within_s=60)
            assert [t["status"] for t in tasks] == ["completed"] * len(accepted)
            for task_id in accepted:
                await _assert_completed_once(http, other, task_id)
    finally:
        cluster.stop()


async def test_a_caller_hears_of_a_task_and_of_its_answer_only_once_a_replica_has_them(
    spawn: Spawn, fake: Fake, tmp_path: Path
) -> None:
    """Replication is asynchronous: without WAIT a primary acknowledges what its replica may
    never get. A stopped replica holds the 202 and the answer back until it has them, so a
    failover promoting it loses neither."""
    (tmp_path / "primary").mkdir()
    (tmp_path / "replica").mkdir()
    primary = RedisServer(tmp_path / "primary", "--repl-diskless-sync-delay", "0")
    replica = RedisServer(tmp_path / "replica", "--replicaof", "127.0.0.1", str(primary.port))
    on_replica = SyncRedis(port=replica.port)
    try:
        while on_replica.info("replication")["master_link_status"] != "up":
            await asyncio.sleep(0.05)
        config = _config(fake, primary, "ack", workers=2, replica_ack_timeout_ms=10_000)
        _, url = await spawn(config)
        async with aiohttp.ClientSession() as http:
            replica.proc.send_signal(signal.SIGSTOP)
            submit = asyncio.create_task(_submit(http, url, latency_s=1.5))
            await asyncio.sleep(0.5)
            assert not submit.done()  # held while no replica has the task
            replica.proc.send_signal(signal.SIGCONT)
            task_id = await asyncio.wait_for(submit, 5)
            assert on_replica.hget(f"ack:{{{task_id}}}:task", "status") is not None

            await fake.until_running(1)
            replica.proc.send_signal(signal.SIGSTOP)
            waiting = {**KEY, "Prefer": "wait=20"}
            answer = asyncio.create_task(
                http.get(f"{url}/v1/tasks/{task_id}/result", headers=waiting)
            )
            await asyncio.sleep(2.0)  # the upstream has answered by now
            assert not answer.done()  # the answer waits for the replica too
            replica.proc.send_signal(signal.SIGCONT)
            resp = await asyncio.wait_for(answer, 5)
            assert resp.status == 200
            resp.release()
            assert on_replica.hget(f"ack:{{{task_id}}}:task", "status") == b"completed"
    finally:
        replica.proc.send_signal(signal.SIGCONT)
        on_replica.close()
        replica.stop()
        primary.stop()
