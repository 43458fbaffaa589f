"""Async tasks across real gateway processes sharing a real Redis: cross-replica events,
kill -9, SIGTERM hand-over, a Redis restart and a Redis outage."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from gateway.fake import png
from tests.conftest import Fake, Spawn
from tests.helpers import KEY, submit, until_ended
from tests.procs import GatewayProcess
from tests.redis_cluster import ClusterNodes
from tests.redis_server import RedisServer

IMAGE_BYTES = 50_000


@pytest.fixture(params=["redis", "cluster"])
def shared_redis(request: pytest.FixtureRequest) -> Any:
    """The Redis the replicas of a test share: a standalone one, or a Redis Cluster."""
    return request.getfixturevalue(
        "redis_cluster" if request.param == "cluster" else "redis_server"
    )


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own, to stop and restart."""
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis")
    yield server
    server.stop()


def _config(fake: Fake, redis: RedisServer, prefix: str, **tasks: object) -> str:
    lines = [
        "[server]",
        "drain_timeout_s = 0.5",
        "[upstream]",
        f"url = '{fake.url}/v1'",
        "[tasks]",
        f"redis_url = '{redis.url}'",
        f"key_prefix = '{prefix}'",
        *(f"{name} = {value}" for name, value in tasks.items()),
    ]
    return "\n".join(lines) + "\n"


def _prefix() -> str:
    return f"rep-{uuid.uuid4().hex[:8]}"


async def _submit(http: aiohttp.ClientSession, url: str, latency_s: float) -> str:
    headers = {"X-Fake-Latency": str(latency_s), "X-Fake-Image-Bytes": str(IMAGE_BYTES)}
    task_id: str = (await submit(http, url, headers=headers))["id"]
    return task_id


async def _until_all_ended(
    http: aiohttp.ClientSession, url: str, task_ids: list[str], within_s: float
) -> list[Any]:
    urls = (f"{url}/v1/tasks/{task_id}" for task_id in task_ids)
    return await until_ended(http, *urls, within_s=within_s)


async def _events(
    http: aiohttp.ClientSession, url: str, task_id: str, last_id: str | None = None
) -> list[dict[str, str]]:
    """The whole event stream (it ends by itself after the terminal event)."""
    headers = {**KEY, **({"Last-Event-ID": last_id} if last_id else {})}
    async with http.get(f"{url}/v1/tasks/{task_id}/events", headers=headers) as resp:
        assert resp.status == 200
        raw = (await resp.read()).decode()
    return _parse(raw)


def _parse(raw: str) -> list[dict[str, str]]:
    blocks = raw.replace("\r\n", "\n").split("\n\n")
    parsed = (dict(line.split(": ", 1) for line in b.splitlines() if ": " in line) for b in blocks)
    return [fields for fields in parsed if "event" in fields]


async def _assert_completed_once(http: aiohttp.ClientSession, url: str, task_id: str) -> None:
    """Exactly one terminal event, `completed`, and the image a sync call would have got."""
    events = await _events(http, url, task_id)
    terminal = [e["event"] for e in events if e["event"] in ("completed", "failed", "cancelled")]
    assert terminal == ["completed"], [e["event"] for e in events]
    assert len({e["id"] for e in events}) == len(events)
    async with http.get(f"{url}/v1/tasks/{task_id}/result", headers=KEY) as resp:
        assert resp.status == 200
        image = base64.b64decode((await resp.json())["data"][0]["b64_json"])
    assert image == png(IMAGE_BYTES)  # byte for byte what the upstream made


async def test_a_client_on_one_replica_follows_a_task_run_by_another(
    spawn: Spawn, fake: Fake, shared_redis: Any
) -> None:
    prefix = _prefix()
    _, runner = await spawn(_config(fake, shared_redis, prefix, workers=4))
    _, watcher = await spawn(_config(fake, shared_redis, prefix, workers=0))  # runs nothing
    async with aiohttp.ClientSession() as http:
        task_id = await _submit(http, watcher, latency_s=0.5)
        events = await _events(http, watcher, task_id)
        assert [e["event"] for e in events] == ["queued", "in_progress", "completed"]
        # A client that lost its stream after the first event resumes on the other replica.
        resumed = await _events(http, runner, task_id, last_id=events[0]["id"])
        assert [e["id"] for e in resumed] == [e["id"] for e in events[1:]]
        await _assert_completed_once(http, runner, task_id)
    assert fake.stats.requests == 1


async def test_tasks_of_a_replica_killed_mid_run_complete_on_another_exactly_once(
    spawn: Spawn, fake: Fake, shared_redis: Any
) -> None:
    prefix = _prefix()
    victim, victim_url = await spawn(_config(fake, shared_redis, prefix, workers=16, lease_s=2))
    async with aiohttp.ClientSession() as http:
        task_ids = [await _submit(http, victim_url, latency_s=1.5) for _ in range(8)]
        await fake.until_running(8)
        _, survivor = await spawn(_config(fake, shared_redis, prefix, workers=16, lease_s=2))
        victim.proc.send_signal(signal.SIGKILL)
        assert await victim.wait_exit(within_s=5) == -signal.SIGKILL
        tasks = await _until_all_ended(http, survivor, task_ids, within_s=30)
        assert [t["status"] for t in tasks] == ["completed"] * 8
        for task_id in task_ids:
            await _assert_completed_once(http, survivor, task_id)
    assert fake.stats.requests == 16  # each generation was cut once, then run to the end once
    client = (RedisCluster if isinstance(shared_redis, ClusterNodes) else Redis).from_url(
        shared_redis.url
    )
    async with client as redis:
        assert await redis.xlen(f"{prefix}:{{queue}}") == 0  # nothing left queued or pending


async def test_sigterm_hands_running_tasks_over_and_ends_event_streams_cleanly(
    spawn: Spawn, fake: Fake, shared_redis: Any
) -> None:
    prefix = _prefix()
    # The default 30 s lease: finishing well inside it proves the hand-over, not a lapse.
    leaving, leaving_url = await spawn(_config(fake, shared_redis, prefix, workers=4))
    async with aiohttp.ClientSession() as http:
        task_ids = [await _submit(http, leaving_url, latency_s=6) for _ in range(3)]
        await fake.until_running(3)
        async with http.get(f"{leaving_url}/v1/tasks/{task_ids[0]}/events", headers=KEY) as sse:
            first = await sse.content.readuntil(b"\r\n\r\n")  # queued
            _, staying = await spawn(_config(fake, shared_redis, prefix, workers=4))
            leaving.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            rest = await sse.content.read()  # must end by itself, cleanly, without an error
        assert time.monotonic() - signalled < 2
        seen = _parse((first + rest).decode())
        assert seen[-1]["event"] == "in_progress"
        assert await leaving.wait_exit(within_s=5) == 0
        tasks = await _until_all_ended(http, staying, task_ids, within_s=15)
        assert time.monotonic() - signalled < 15  # a 6 s generation, run again at once
        assert [t["status"] for t in tasks] == ["completed"] * 3
        resumed = await _events(http, staying, task_ids[0], last_id=seen[-1]["id"])
        assert {e["id"] for e in resumed}.isdisjoint(e["id"] for e in seen)
        assert resumed[-1]["event"] == "completed"
    assert "handed over" in leaving.output()


async def test_tasks_complete_across_a_redis_restart(
    spawn: Spawn, fake: Fake, own_redis: RedisServer
) -> None:
    _, url = await spawn(_config(fake, own_redis, "gw", workers=4))
    async with aiohttp.ClientSession() as http:
        running = [await _submit(http, url, latency_s=1.5) for _ in range(2)]
        await fake.until_running(2)
        own_redis.stop()  # with AOF, as in production
        await asyncio.sleep(0.5)
        own_redis.start()
        tasks = await _until_all_ended(http, url, running, within_s=20)
        assert [t["status"] for t in tasks] == ["completed"] * 2
        for task_id in running:
            await _assert_completed_once(http, url, task_id)
    assert fake.stats.requests == 2


async def test_a_redis_outage_fails_async_fast_keeps_sync_working_then_recovers(
    spawn: Spawn, fake: Fake, own_redis: RedisServer
) -> None:
    _, url = await spawn(_config(fake, own_redis, "gw", workers=4))
    async with aiohttp.ClientSession() as http:
        own_redis.stop()
        await asyncio.sleep(1.5)  # readiness is the last background check's (once a second)
        async with http.get(f"{url}/readyz") as resp:
            assert resp.status == 503
        started = time.monotonic()
        async with http.post(
            f"{url}/v1/images/generations",
            json={"model": "gpt-image-1", "prompt": "x"},
            headers={**KEY, "Prefer": "respond-async"},
        ) as resp:
            assert resp.status == 503
            assert resp.headers["x-should-retry"] == "true"
            assert (await resp.json())["error"]["code"] == "store_unavailable"
        assert time.monotonic() - started < 1
        async with http.post(
            f"{url}/v1/images/generations",
            json={"model": "gpt-image-1", "prompt": "x"},
            headers=KEY,
        ) as resp:
            assert resp.status == 200  # the sync pass-through needs no Redis
            assert json.loads(await resp.read())["data"]
        own_redis.start()
        deadline = time.monotonic() + 10
        while True:
            async with http.get(f"{url}/readyz") as resp:
                if resp.status == 200:
                    break
            assert time.monotonic() < deadline, "never ready again"
            await asyncio.sleep(0.2)
        task_id = await _submit(http, url, latency_s=0.2)
        await _until_all_ended(http, url, [task_id], within_s=10)
        await _assert_completed_once(http, url, task_id)


async def test_gateway_worker_runs_tasks_that_a_serving_replica_accepted(
    spawn: Spawn, fake: Fake, shared_redis: Any
) -> None:
    prefix = _prefix()
    _, url = await spawn(_config(fake, shared_redis, prefix, workers=0))
    worker, _ = await spawn(_config(fake, shared_redis, prefix, workers=2), command="worker")
    async with aiohttp.ClientSession() as http:
        task_id = await _submit(http, url, latency_s=0.2)
        await _until_all_ended(http, url, [task_id], within_s=15)
        await _assert_completed_once(http, url, task_id)
    worker.proc.send_signal(signal.SIGTERM)
    assert await worker.wait_exit(within_s=5) == 0


async def test_gateway_worker_without_redis_refuses_to_start(spawn: Spawn) -> None:
    worker, _ = await spawn("", command="worker")
    assert await worker.wait_exit(within_s=15) == 2
    assert "needs Redis" in worker.output()


async def test_the_same_key_racing_on_two_replicas_makes_one_upstream_call(
    spawn: Spawn, fake: Fake, shared_redis: Any
) -> None:
    prefix = _prefix()
    _, first = await spawn(_config(fake, shared_redis, prefix, workers=4))
    _, second = await spawn(_config(fake, shared_redis, prefix, workers=4))

    async def call(http: aiohttp.ClientSession, url: str) -> bytes:
        async with http.post(
            f"{url}/v1/images/generations",
            json={"model": "gpt-image-1", "prompt": "a lighthouse"},
            headers={
                **KEY,
                "Idempotency-Key": "race-1",
                "X-Fake-Latency": "0.5",
                "X-Fake-Image-Bytes": str(IMAGE_BYTES),
            },
        ) as resp:
            assert resp.status == 200
            return base64.b64decode((await resp.json())["data"][0]["b64_json"])

    async with aiohttp.ClientSession() as http:
        images = await asyncio.gather(*(call(http, url) for url in (first, second) * 3))
    assert all(image == png(IMAGE_BYTES) for image in images)
    assert fake.stats.requests == 1


async def test_the_store_is_told_apart_at_start_up_from_any_cluster_node(
    spawn: Spawn, fake: Fake, redis_cluster: ClusterNodes, redis_server: RedisServer
) -> None:
    # Every node of the cluster will do, replicas too; the log says which kind of Redis it is.
    for node in redis_cluster.nodes:
        proc, gateway = await spawn(_config(fake, node, _prefix(), workers=2))
        assert f"task store: Redis Cluster at 127.0.0.1:{node.port}" in proc.output()
        async with aiohttp.ClientSession() as http:
            task_id = await _submit(http, gateway, latency_s=0.1)
            await _until_all_ended(http, gateway, [task_id], within_s=10)
            await _assert_completed_once(http, gateway, task_id)
        proc.close()
    proc, _ = await spawn(_config(fake, redis_server, _prefix(), workers=1))
    assert f"task store: standalone Redis at 127.0.0.1:{redis_server.port}" in proc.output()


async def _until(condition: Callable[[], bool], within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, "not within the time"
        await asyncio.sleep(0.02)


StalledPair = tuple[
    GatewayProcess,
    str,
    str,
    Callable[[aiohttp.ClientSession, str], Coroutine[Any, Any, tuple[bytes, str | None]]],
]


async def _stalled_pair(spawn: Spawn, fake: Fake, redis: Any, tmp_path: Path) -> StalledPair:
    """Two replicas with a short lease, results kept in files they share, and a keyed sync
    call to make on either: its body, and the stand-in's stamp of when it answered."""
    results = f"'file://{tmp_path / 'results'}'"
    config = _config(fake, redis, _prefix(), workers=4, lease_s=1, results_url=results)
    stalled, first = await spawn(config)
    _, second = await spawn(config)
    key = f"stall-{uuid.uuid4().hex}"

    async def call(http: aiohttp.ClientSession, url: str) -> tuple[bytes, str | None]:
        async with http.post(
            f"{url}/v1/images/generations",
            json={"model": "gpt-image-1", "prompt": "a lighthouse"},
            headers={
                **KEY,
                "Idempotency-Key": key,
                "X-Fake-Latency": "2",
                "X-Fake-Image-Bytes": str(IMAGE_BYTES),
            },
        ) as resp:
            assert resp.status == 200
            return await resp.read(), resp.headers.get("X-Fake-Sent-At")

    return stalled, first, second, call


def _one_image(answers: list[tuple[bytes, str | None]], fake: Fake) -> None:
    # The two runs' answers differ (`created`, a lease apart at least); one is everyone's.
    assert all(answer == answers[0] for answer in answers)
    body = json.loads(answers[0][0])
    assert base64.b64decode(body["data"][0]["b64_json"]) == png(IMAGE_BYTES)
    # Paid twice: a replica stalled past its lease cannot be told from a dead one.
    assert fake.stats.requests == 2


async def test_a_replica_stalled_past_its_lease_gives_every_caller_of_a_key_one_answer(
    spawn: Spawn, fake: Fake, shared_redis: Any, tmp_path: Path
) -> None:
    """A keyed sync call's replica stops (SIGSTOP) mid-generation past its lease: another
    replica runs the call again. The stalled run, resumed while the other goes on, is fenced
    out, and its own caller gets the answer the task keeps, as the retries do."""
    stalled, first, second, call = await _stalled_pair(spawn, fake, shared_redis, tmp_path)
    async with aiohttp.ClientSession() as http:
        caller = asyncio.create_task(call(http, first))
        await fake.until_running()
        stalled.proc.send_signal(signal.SIGSTOP)
        try:
            await _until(lambda: fake.stats.requests == 2, within_s=15)  # run again elsewhere
            # The stalled run's generation has answered, into a process that cannot read it.
            await _until(lambda: fake.stats.running == 1, within_s=5)
        finally:
            stalled.proc.send_signal(signal.SIGCONT)
        retry = asyncio.create_task(call(http, second))
        answers = [await caller, await retry, await call(http, first)]
    _one_image(answers, fake)


async def test_a_stalled_run_resumed_after_the_takeover_ended_leaves_its_answer_alone(
    spawn: Spawn, fake: Fake, shared_redis: Any, tmp_path: Path
) -> None:
    """The stalled run resumes only once the run that took it over has ended and a retry has
    its answer: writing its own answer's file then must not replace the one the task keeps."""
    stalled, first, second, call = await _stalled_pair(spawn, fake, shared_redis, tmp_path)
    async with aiohttp.ClientSession() as http:
        caller = asyncio.create_task(call(http, first))
        await fake.until_running()
        stalled.proc.send_signal(signal.SIGSTOP)
        try:
            await _until(lambda: fake.stats.requests == 2, within_s=15)
            retry = await call(http, second)  # waits for the other run's end
        finally:
            stalled.proc.send_signal(signal.SIGCONT)
        answers = [retry, await caller]
        await asyncio.sleep(1)  # the resumed run has written whatever it writes
        answers.append(await call(http, second))
    _one_image(answers, fake)
