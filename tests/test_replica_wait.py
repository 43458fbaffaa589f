"""A Redis primary without a replica (its replica gone, or a primary a failover promoted) is not
waited on: WAIT there would time out on every write, a tenth of a second added to each call."""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

import openai
from redis.asyncio import Redis

from tests.conftest import Fake, GatewayFactory
from tests.redis_server import RedisServer


async def test_writes_to_a_primary_whose_replica_is_gone_do_not_wait_for_it(
    gateway_factory: GatewayFactory, fake: Fake, tmp_path: Path
) -> None:
    (tmp_path / "primary").mkdir()
    (tmp_path / "replica").mkdir()
    primary = RedisServer(tmp_path / "primary", "--repl-diskless-sync-delay", "0")
    replica = RedisServer(tmp_path / "replica", "--replicaof", "127.0.0.1", str(primary.port))
    client = Redis.from_url(primary.url)
    try:
        while (await client.info("replication"))["connected_slaves"] != 1:
            await asyncio.sleep(0.05)
        # A replica at start-up: each task write waits (WAIT 1 100) until one has it.
        tasks = {"redis_url": primary.url, "replica_ack_timeout_ms": 100}
        gateway = await gateway_factory(tasks=tasks)
        replica.proc.kill()
        while (await client.info("replication"))["connected_slaves"] != 0:
            await asyncio.sleep(0.05)
        seconds = []
        async with openai.AsyncOpenAI(
            base_url=f"{gateway.url}/v1", api_key="sk-caller", max_retries=0
        ) as sdk:
            for i in range(20):  # each a task: its creation and its end are written
                started = time.monotonic()
                await sdk.images.generate(model="gpt-image-1", prompt=f"a lighthouse {i}")
                seconds.append(time.monotonic() - started)
        assert statistics.median(seconds) < 0.05  # not 2 x 100 ms of WAIT
        assert fake.stats.requests == 20
        # The first write learned the node has no replica; the others skipped their wait.
        assert gateway.sample("gateway_store_wait_skipped_total") >= 2 * 20 - 2
    finally:
        await client.aclose()
        replica.proc.kill()
        replica.proc.wait()
        primary.stop()
