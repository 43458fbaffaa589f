"""A Redis Cluster primary killed mid-run, its replica promoted: every accepted task ends exactly
once with the upstream's exact bytes, and submits during the failover get a fast, retryable 503
and succeed after it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest
from redis.cluster import RedisCluster as SyncRedisCluster

from tests.conftest import Fake, Spawn
from tests.redis_cluster import ClusterNodes
from tests.test_replicas import (
    IMAGE_BYTES,
    KEY,
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
            tasks = await _until_all_ended(http, other, accepted, within_s=60)
            assert [t["status"] for t in tasks] == ["completed"] * len(accepted)
            for task_id in accepted:
                await _assert_completed_once(http, other, task_id)
    finally:
        cluster.stop()
