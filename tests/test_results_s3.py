"""Results in S3-compatible storage (`GATEWAY_RESULTS_URL=s3://bucket/prefix`), against moto's
S3 server as a real process: a large answer lives in an object the task points to and streams
back byte for byte, goes with its retention (and nothing else in the bucket does), and storage
that is down or missing says so loudly instead of losing answers or hiding them behind a 500."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import logging
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
from aiobotocore.session import get_session
from botocore.exceptions import ClientError

from gateway.tasks.service import TASKS
from tests.conftest import Fake, Gateway, GatewayFactory
from tests.moto_server import MotoServer
from tests.redis_server import RedisServer
from tests.test_results import BODY, KEY, answered_as_the_sync_call, async_answer

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

# Never to be seen in a log line.
SECRET = "gateway-test-secret-never-logged"


@dataclasses.dataclass
class S3:
    server: MotoServer
    client: S3Client  # the test's own look at the bucket
    bucket: str

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    async def size(self, key: str) -> int | None:
        try:
            return (await self.client.head_object(Bucket=self.bucket, Key=key))["ContentLength"]
        except ClientError:
            return None

    async def keys(self) -> list[str]:
        listing = await self.client.list_objects_v2(Bucket=self.bucket)
        return sorted(item["Key"] for item in listing.get("Contents", []))


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    yield server
    server.kill()


@asynccontextmanager
async def _s3_on(server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[S3]:
    """The standard AWS environment pointed at `server` (the in-process gateway reads it when
    it starts), and a fresh bucket there."""
    for var in ("AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    for var in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.setenv(var, "/nonexistent")  # a developer's ~/.aws stays out of it
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.url)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAGATEWAYTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    async with get_session().create_client("s3", region_name="us-east-1") as client:
        bucket = f"gw-{uuid.uuid4().hex[:12]}"
        await client.create_bucket(Bucket=bucket)
        yield S3(server, client, bucket)


@pytest.fixture
async def s3(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[S3]:
    async with _s3_on(moto_server, monkeypatch) as s3:
        yield s3


@pytest.fixture
async def s3_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[S3]:
    """On a moto server of its own, for a test that kills it."""
    server = MotoServer(tmp_path)
    try:
        async with _s3_on(server, monkeypatch) as s3:
            yield s3
    finally:
        server.kill()


async def _result(http: aiohttp.ClientSession, gateway: Gateway, task_id: str) -> Any:
    async with http.get(f"{gateway.url}/v1/tasks/{task_id}", headers=KEY) as resp:
        return await resp.json()


async def test_a_large_result_lives_in_s3_and_streams_back_byte_for_byte(
    gateway_factory: GatewayFactory, store: dict[str, Any], s3: S3, http: aiohttp.ClientSession
) -> None:
    gateway = await gateway_factory(tasks={**store, "results_url": s3.url("gw/results")})
    task_id, answer = await answered_as_the_sync_call(http, gateway.url, 1_000_000)
    assert await s3.size(f"gw/results/{task_id}") == len(answer)  # the bucket holds it
    async with http.get(f"{gateway.url}/v1/tasks/{task_id}/result", headers=KEY) as resp:
        assert resp.content_length == len(answer)
        assert await resp.read() == answer  # byte for byte, every time
    # A small result stays in the task store: no object for it.
    _, status, _ = await async_answer(http, gateway.url, 2_000)
    assert status == 200
    assert await s3.keys() == [f"gw/results/{task_id}"]


async def test_results_in_s3_go_with_their_retention_and_nothing_else_does(
    gateway_factory: GatewayFactory, store: dict[str, Any], s3: S3, http: aiohttp.ClientSession
) -> None:
    gateway = await gateway_factory(tasks={**store, "results_url": s3.url("gw")})
    task_id, status, _ = await async_answer(http, gateway.url, 500_000)
    assert status == 200
    # Another prefix's objects, and names under ours that no result has, are not the sweep's.
    others = ["gw/README.md", "gw/notes/task_x", "other/task_abc"]
    for key in others:
        await s3.client.put_object(Bucket=s3.bucket, Key=key, Body=b"keep me")
    results = gateway.app[TASKS].results
    assert results is not None
    assert await results.sweep(older_than_s=3600) == 0  # a fresh result stays
    assert await results.sweep(older_than_s=0) == 1
    assert await s3.keys() == others
    async with http.get(f"{gateway.url}/v1/tasks/{task_id}/result", headers=KEY) as resp:
        assert resp.status == 404
        assert "no longer kept" in (await resp.json())["error"]["message"]


async def test_an_s3_outage_fails_new_results_loudly_and_reads_say_so(
    gateway_factory: GatewayFactory,
    store: dict[str, Any],
    s3_alone: S3,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway")
    # One retry instead of the standard mode's two: the same path, half the wait.
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    gateway = await gateway_factory(tasks={**store, "results_url": s3_alone.url("gw")})
    kept_id, status, _ = await async_answer(http, gateway.url, 500_000)
    assert status == 200
    s3_alone.server.kill()

    started = time.monotonic()
    task_id, status, answer = await async_answer(http, gateway.url, 1_000_000)
    assert time.monotonic() - started < 5  # seconds, not botocore's default minutes
    assert status == 502
    assert b"result_store_unavailable" in answer
    task = await _result(http, gateway, task_id)
    assert task["status"] == "failed"
    assert task["error"]["code"] == "result_store_unavailable"
    assert gateway.sample("gateway_result_store_errors_total") == 1

    # An answer kept before the outage: a clear 502 while it lasts, not a 500 or a 404.
    async with http.get(f"{gateway.url}/v1/tasks/{kept_id}/result", headers=KEY) as resp:
        assert resp.status == 502
        assert resp.headers["x-should-retry"] == "true"
        error = (await resp.json())["error"]
    assert error["code"] == "result_store_unavailable"
    assert "cannot be read right now" in error["message"]
    assert "Could not connect to the endpoint URL" in caplog.text
    assert SECRET not in caplog.text


async def test_a_missing_bucket_fails_tasks_loudly(
    gateway_factory: GatewayFactory,
    s3: S3,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway")
    gateway = await gateway_factory(tasks={"results_url": f"s3://{s3.bucket}-gone/results"})
    task_id, status, answer = await async_answer(http, gateway.url, 1_000_000)
    assert status == 502
    assert b"result_store_unavailable" in answer
    assert (await _result(http, gateway, task_id))["error"]["code"] == "result_store_unavailable"
    assert gateway.sample("gateway_result_store_errors_total") == 1
    assert "NoSuchBucket" in caplog.text
    assert SECRET not in caplog.text


async def test_a_hung_s3_fails_its_task_in_seconds_and_never_runs_it_again(
    gateway_factory: GatewayFactory,
    fake: Fake,
    redis_server: RedisServer,
    s3_alone: S3,
    http: aiohttp.ClientSession,
) -> None:
    """S3 stopped (not gone: connections open, nothing answers) while a task's answer is put:
    the task fails result_store_unavailable within seconds, and its lease, renewed meanwhile,
    never lapses into another paid generation."""
    lease_s = 1.5
    tasks = {
        "redis_url": redis_server.url,
        "key_prefix": f"test-{uuid.uuid4().hex[:8]}",
        "results_url": s3_alone.url("gw"),
        "lease_s": lease_s,
        "result_store_timeout_s": 2.0,
    }
    gateway = await gateway_factory(tasks=tasks)
    headers = {
        **KEY,
        "Prefer": "respond-async",
        "X-Fake-Image-Bytes": "1000000",
        "X-Fake-Latency": "0.5",
    }
    async with http.post(
        f"{gateway.url}/v1/images/generations", json=BODY, headers=headers
    ) as resp:
        task_id = (await resp.json())["id"]
    await fake.until_running()
    os.kill(s3_alone.server.proc.pid, signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        waiting = {**KEY, "Prefer": "wait=20"}
        async with http.get(f"{gateway.url}/v1/tasks/{task_id}/result", headers=waiting) as resp:
            assert resp.status == 502
            assert b"result_store_unavailable" in await resp.read()
        assert time.monotonic() - stopped < 5  # the generation's 0.5 s and the put's 2 s
        task = await _result(http, gateway, task_id)
        assert task["status"] == "failed"
        assert task["error"]["code"] == "result_store_unavailable"
        await asyncio.sleep(3 * lease_s)  # a lapsed lease would have run it again by now
        assert fake.stats.requests == 1  # one paid generation
        assert gateway.sample("gateway_result_store_errors_total") == 1
    finally:
        os.kill(s3_alone.server.proc.pid, signal.SIGCONT)


async def test_a_large_request_body_waits_in_s3_until_its_task_ends(
    gateway_factory: GatewayFactory, fake: Fake, s3: S3, http: aiohttp.ClientSession
) -> None:
    gateway = await gateway_factory(
        server={"body_memory_bytes": 100_000}, tasks={"results_url": s3.url("gw")}
    )
    body = b'{"model": "gpt-image-1", "prompt": "' + b"x" * 3_000_000 + b'"}'
    headers = {
        **KEY,
        "Prefer": "respond-async",
        "Content-Type": "application/json",
        "X-Fake-Latency": "1",
    }
    async with http.post(
        f"{gateway.url}/v1/images/generations", data=io.BytesIO(body), headers=headers
    ) as resp:
        task_id = (await resp.json())["id"]
    await fake.until_running()
    assert await s3.size(f"gw/{task_id}.request") == len(body)  # not in the task store
    result = f"{gateway.url}/v1/tasks/{task_id}/result"
    async with http.get(result, headers={**KEY, "Prefer": "wait=30"}) as resp:
        assert resp.status == 200
    assert fake.stats.last["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert await s3.size(f"gw/{task_id}.request") is None  # gone with its task's end
