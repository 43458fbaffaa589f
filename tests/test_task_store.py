"""The task-store contract: every store keeps it (the Redis store joins the parametrization)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from gateway.config import TasksConfig
from gateway.errors import QueueFull
from gateway.tasks.memory import MemoryStore
from gateway.tasks.models import (
    Job,
    OnceName,
    QueueCaps,
    StoredResponse,
    Task,
    TaskError,
    TaskRecord,
    TaskStore,
)
from gateway.tasks.redis import _SPARE_CONNECTIONS, RedisStore, connect
from gateway.tasks.redis.observed import unobserved
from tests.redis_server import RedisServer

JOB = Job(
    method="POST",
    path_qs="/v1/images/generations",
    headers=[("Authorization", "Bearer sk-caller")],
    body=b'{"model":"gpt-image-1","prompt":"x"}',
    deadline_s=300.0,
)
ANSWER = StoredResponse(status=200, headers=[("Content-Type", "application/json")], body=b"{}")


@pytest.fixture(params=["memory", "redis", "cluster"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[TaskStore]:
    made: TaskStore
    caps = QueueCaps(per_caller=50, bytes_per_caller=2**20, total=80, bytes_total=2**30)
    if request.param == "memory":
        made = MemoryStore(60.0, caps)
    else:
        cluster = request.param == "cluster"
        client: Any
        if cluster:
            server: Any = request.getfixturevalue("redis_cluster")
            client = AsyncRedisCluster.from_url(server.url)
        else:
            server = request.getfixturevalue("redis_server")
            client = Redis.from_url(server.url)
        await client.flushall()
        made = RedisStore(
            client,
            consumer="test-worker",
            retention_s=60.0,
            lease_s=0.5,
            cluster=cluster,
            caps=caps,
        )
    yield made
    await made.close()


def record(task_id: str = "t1", owner: str = "owner-hash") -> TaskRecord:
    task = Task(id=task_id, status="queued", model="gpt-image-1", created_at=int(time.time()))
    return TaskRecord(task=task, owner=owner)


async def answer(store: TaskStore, task_id: str) -> StoredResponse | None:
    got = await store.answered(task_id)
    return None if got is None else got[1]


async def statuses(store: TaskStore, task_id: str) -> list[str]:
    return [e.task.status for e in await store.events(task_id, None, 0)]


async def test_a_task_runs_once_and_keeps_its_answer(store: TaskStore) -> None:
    await store.create(record(), JOB)
    claim = await store.claim(1.0)
    assert claim is not None
    assert claim.job == JOB
    assert claim.record.attempt == 1
    assert (await store.get("t1")) == claim.record
    assert await store.claim(0.05) is None  # nothing else queued: no second run
    done = await store.finish("t1", 1, ANSWER)
    assert done is not None
    assert done.status == "completed"
    assert await answer(store, "t1") == ANSWER
    assert await statuses(store, "t1") == ["queued", "in_progress", "completed"]


async def test_terminal_states_never_change(store: TaskStore) -> None:
    await store.create(record(), JOB)
    await store.claim(1.0)
    failed = StoredResponse(status=503, headers=[], body=b"busy")
    await store.finish("t1", 1, failed, TaskError("busy", "upstream_error", "503"))
    assert await store.finish("t1", 1, ANSWER) is None
    cancelled = await store.cancel("t1")
    assert cancelled is not None
    assert cancelled.status == "failed"
    assert await answer(store, "t1") == failed  # the answer it failed with, kept
    assert await statuses(store, "t1") == ["queued", "in_progress", "failed"]


async def test_a_stale_attempt_cannot_write(store: TaskStore) -> None:
    await store.create(record(), JOB)
    await store.claim(1.0)
    assert await store.finish("t1", 7, ANSWER) is None
    current = await store.get("t1")
    assert current is not None
    assert current.task.status == "in_progress"


async def test_cancelled_while_queued_is_never_run(store: TaskStore) -> None:
    await store.create(record("a"), JOB)
    await store.create(record("b"), JOB)
    cancelled = await store.cancel("a")
    assert cancelled is not None
    assert cancelled.status == "cancelled"
    claim = await store.claim(1.0)
    assert claim is not None
    assert claim.record.task.id == "b"


async def test_cancel_while_running_discards_the_late_answer(store: TaskStore) -> None:
    await store.create(record(), JOB)
    await store.claim(1.0)
    await store.cancel("t1")
    assert await store.finish("t1", 1, ANSWER) is None
    assert await answer(store, "t1") is None
    assert await statuses(store, "t1") == ["queued", "in_progress", "cancelled"]


async def test_racing_calls_with_one_name_make_one_task_that_exists(store: TaskStore) -> None:
    # Ten retries of one keyed call arrive together: one creates the task, the others are told
    # its name's value, and the task that value names can be read at once (no "pending").
    def named(i: int) -> OnceName:
        return OnceName("order-1", f"print t{i}", 60.0)

    found = await asyncio.gather(
        *(store.find_or_create(record(f"t{i}"), JOB, None, named(i)) for i in range(10))
    )
    winners = [i for i, value in enumerate(found) if value is None]
    assert len(winners) == 1
    assert set(found) == {None, f"print t{winners[0]}"}
    assert await store.get(f"t{winners[0]}") is not None
    losers = [i for i in range(10) if i != winners[0]]
    assert all([await store.get(f"t{i}") is None for i in losers])  # nothing else stored
    assert (claim := await store.claim(1.0)) is not None
    assert claim.record.task.id == f"t{winners[0]}"
    assert await store.claim(0.05) is None  # and only one runs


async def test_a_replacing_name_always_makes_a_new_task(store: TaskStore) -> None:
    # The SDK's first attempts are new generations, each taking the name over.
    for i in range(2):
        held = OnceName("sdk-call", f"t{i}", 60.0, replace=True)
        assert await store.find_or_create(record(f"t{i}"), JOB, None, held) is None
    retry = OnceName("sdk-call", "t9", 60.0)
    assert await store.find_or_create(record("t9"), JOB, None, retry) == "t1"


async def test_callers_are_served_in_turn_whatever_one_has_queued(store: TaskStore) -> None:
    for i in range(40):
        await store.create(record(f"a{i}", owner="tenant-a"), JOB)
    assert (await store.claim(1.0)) is not None  # a0 runs
    await store.create(record("b0", owner="tenant-b"), JOB)
    await store.create(record("c0", owner="tenant-c"), JOB)
    claimed = []
    for _ in range(4):
        claim = await store.claim(1.0)
        assert claim is not None
        claimed.append(claim.record.task.id)
    # B and C each wait for at most one of A's 39 before them, not for all of them.
    assert "b0" in claimed[:2]
    assert "c0" in claimed[:3]
    assert await store.queue_depth() == 40 - 1 - 2


async def test_a_caller_over_its_queue_caps_is_refused_and_others_are_not(
    store: TaskStore,
) -> None:
    for i in range(50):
        await store.create(record(f"a{i}", owner="tenant-a"), JOB)
    with pytest.raises(QueueFull):
        await store.create(record("a50", owner="tenant-a"), JOB)
    assert await store.get("a50") is None  # nothing of the refused task stays
    big = msgspec.structs.replace(JOB, body=b"x" * (2**20 + 1))
    with pytest.raises(QueueFull):
        await store.create(record("b-big", owner="tenant-b"), big)
    await store.create(record("b0", owner="tenant-b"), JOB)
    await store.cancel("a0")  # a cancelled task frees its place
    await store.create(record("a51", owner="tenant-a"), JOB)
    assert await store.queue_depth() == 51


async def test_callers_together_over_the_queues_total_are_refused(store: TaskStore) -> None:
    """In pass-through every bearer a caller makes up is a caller: only a total bounds them."""
    for i in range(80):
        await store.create(record(f"made-up-{i}", owner=f"made-up-key-{i}"), JOB)
    with pytest.raises(QueueFull) as refused:
        await store.create(record("one-more", owner="yet-another-key"), JOB)
    assert "in all" in refused.value.message
    assert await store.get("one-more") is None  # nothing of the refused task stays
    claim = await store.claim(1.0)  # a task leaving the queue makes room for one more
    assert claim is not None
    await store.create(record("one-more", owner="yet-another-key"), JOB)
    with pytest.raises(QueueFull):
        await store.create(record("and-another", owner="and-another-key"), JOB)
    assert await store.queue_depth() == 80


async def test_tasks_with_empty_bodies_are_taken_like_any_other(store: TaskStore) -> None:
    empty = msgspec.structs.replace(JOB, body=b"")
    for i in range(3):
        await store.create(record(f"e{i}", owner="tenant-e"), empty)
    for i in range(3):
        claim = await store.claim(1.0)
        assert claim is not None
        assert claim.record.task.id == f"e{i}"
    assert await store.queue_depth() == 0


async def test_event_readers_resume_and_wake_at_once(store: TaskStore) -> None:
    await store.create(record(), JOB)
    first = await store.events("t1", None, 0)
    waiting = asyncio.ensure_future(store.events("t1", first[-1].id, 5.0))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    started = time.monotonic()
    await store.claim(1.0)
    later = await waiting
    assert time.monotonic() - started < 0.05
    assert [e.task.status for e in later] == ["in_progress"]
    assert later[0].id != first[0].id


async def test_unknown_task(store: TaskStore) -> None:
    assert await store.get("nope") is None
    assert await store.cancel("nope") is None
    assert await store.events("nope", None, 0) == []


async def test_tasks_expire_after_the_retention_window() -> None:
    store = MemoryStore(retention_s=0.1)
    await store.create(record(), JOB)
    await asyncio.sleep(0.15)
    assert await store.get("t1") is None


async def _redis_store(server: RedisServer, consumer: str, max_deliveries: int = 3) -> RedisStore:
    return RedisStore(
        Redis.from_url(server.url),
        consumer=consumer,
        retention_s=60.0,
        lease_s=0.3,
        max_deliveries=max_deliveries,
    )


async def test_a_dead_workers_task_is_run_again_and_its_late_answer_refused(
    redis_server: RedisServer,
) -> None:
    first = await _redis_store(redis_server, "worker-a")
    second = await _redis_store(redis_server, "worker-b")
    try:
        await first._redis.flushall()
        await first.create(record(), JOB)
        lost = await first.claim(1.0)
        assert lost is not None
        assert lost.record.attempt == 1
        # worker-a stops renewing (it died); once its lease lapses worker-b takes the task.
        await asyncio.sleep(0.4)
        again = await second.claim(1.0)
        assert again is not None
        assert again.record.attempt == 2
        assert again.job == JOB
        assert await first.finish("t1", 1, ANSWER) is None
        done = await second.finish("t1", 2, ANSWER)
        assert done is not None
        assert await statuses(second, "t1") == ["queued", "in_progress", "in_progress", "completed"]
        await asyncio.sleep(0.4)
        assert await first.claim(0.2) is None  # finished and acknowledged: never run a third time
    finally:
        await first.close()
        await second.close()


async def test_a_cancelled_running_task_leaves_no_queue_entry_behind(
    redis_server: RedisServer,
) -> None:
    # The entry of a cancelled run is done at once, not found again by a reclaim a lease later.
    canceller = await _redis_store(redis_server, "replica-a")
    worker = await _redis_store(redis_server, "replica-b")
    try:
        await worker._redis.flushall()
        await canceller.create(record(), JOB)
        assert await worker.claim(1.0) is not None
        await canceller.cancel("t1")
        queue = "gw:{queue}"
        assert await worker._redis.xlen(queue) == 0
        assert (await worker._redis.xpending(queue, "workers"))["pending"] == 0
        assert await worker.finish("t1", 1, ANSWER) is None
    finally:
        await canceller.close()
        await worker.close()


async def test_a_task_that_keeps_losing_workers_fails_clearly(redis_server: RedisServer) -> None:
    store = await _redis_store(redis_server, "worker-a", max_deliveries=2)
    try:
        await store._redis.flushall()
        await store.create(record(), JOB)
        for _ in range(2):
            assert await store.claim(1.0) is not None
            await asyncio.sleep(0.4)
        assert await store.claim(0.5) is None
        current = await store.get("t1")
        assert current is not None
        assert current.task.status == "failed"
        assert current.task.error is not None
        assert current.task.error.code == "worker_lost"
    finally:
        await store.close()


async def test_a_dead_workers_task_behind_many_healthy_ones_is_still_found(
    redis_server: RedisServer,
) -> None:
    """XAUTOCLAIM examines ten pending entries per call: the scan must go on past them."""
    healthy = await _redis_store(redis_server, "worker-healthy")
    dead = await _redis_store(redis_server, "worker-dead")
    rescuer = await _redis_store(redis_server, "worker-rescuer")
    try:
        await healthy._redis.flushall()
        for n in range(25):
            await healthy.create(record(f"t{n:02}"), JOB)
        running = [await healthy.claim(1.0) for _ in range(20)]  # the first 20 in the queue
        lost = [await dead.claim(1.0) for _ in range(5)]  # the last 5, behind them
        assert all(running)
        assert all(lost)
        found: set[str] = set()
        deadline = asyncio.get_running_loop().time() + 5
        while len(found) < 5 and asyncio.get_running_loop().time() < deadline:
            for claim in running:
                assert claim is not None
                await healthy.renew(claim.record.task.id)  # alive: never taken
            again = await rescuer.claim(0.1)
            if again is not None:
                found.add(again.record.task.id)
        assert found == {c.record.task.id for c in lost if c is not None}
    finally:
        for store in (healthy, dead, rescuer):
            await store.close()


async def test_a_redis_that_forgot_its_scripts_still_creates_and_finds_in_order(
    redis_server: RedisServer,
) -> None:
    store = await _redis_store(redis_server, "worker-a")
    try:
        await store._redis.flushall()
        await store.create(record("t0"), JOB)  # every script loaded once
        await store._redis.script_flush()  # as after a restart or a failover
        once = OnceName("order-9", "print t1", 60.0)
        assert await store.find_or_create(record("t1"), JOB, None, once) is None
        assert await store.find_or_create(record("t2"), JOB, None, once) == "print t1"
        assert await store.get("t1") is not None
        await store._redis.script_flush()
        claimed = [(await store.claim(1.0)), (await store.claim(1.0))]
        assert sorted(c.record.task.id for c in claimed if c) == ["t0", "t1"]
    finally:
        await store.close()


async def test_a_fresh_cluster_store_serves_many_first_calls_at_once(redis_cluster: Any) -> None:
    """A replica's workers and callers all start at once: none of them may fail for it."""
    store = RedisStore(
        AsyncRedisCluster.from_url(redis_cluster.url),
        consumer="first-calls",
        retention_s=60.0,
        cluster=True,
    )
    try:
        ids = [f"first-{i}" for i in range(32)]
        creates = [store.create(record(task_id), JOB) for task_id in ids]
        claims = await asyncio.gather(*(store.claim(1.0) for _ in ids), *creates)
        assert all([await store.get(task_id) for task_id in ids])
        assert any(claims)
    finally:
        await store.close()


async def test_callers_past_the_connection_cap_wait_for_a_free_connection(
    redis_server: RedisServer,
) -> None:
    """A burst of calls larger than the store's connection pool neither fails (503) nor opens
    more connections to Redis than the pool's cap: the calls past it wait their turn."""
    tasks = TasksConfig(redis_url=redis_server.url, workers=0, key_prefix="cap")
    store = connect(tasks, unobserved)
    admin = Redis.from_url(redis_server.url)
    try:
        before = len(await admin.client_list())
        await store.create(record("t1"), JOB)
        got = await asyncio.gather(*(store.get("t1") for _ in range(500)))
        assert all(r is not None and r.task.id == "t1" for r in got)
        opened = len(await admin.client_list()) - before
        assert 0 < opened <= _SPARE_CONNECTIONS
    finally:
        await store.close()
        await admin.aclose()


async def test_a_task_submitted_while_a_worker_idles_starts_at_once_without_the_queue(
    redis_server: RedisServer,
) -> None:
    """On a standalone Redis, a task created while a worker of its replica waits and nothing
    waits ahead of it goes to that worker in the creating round trip: in progress, attempt 1,
    holding its slot, never in the queue; its followers see it queued, then in progress."""
    client = Redis.from_url(redis_server.url)
    await client.flushall()
    store = RedisStore(client, consumer="at-once", retention_s=60.0, lease_s=5.0)
    limited = msgspec.structs.replace(JOB, limits=[("model:gpt-image-1", 1)])
    try:
        await store.create(record("t0"), JOB)  # the worker has started and found the queue empty
        assert (await store.claim(1.0)) is not None
        waiting = asyncio.ensure_future(store.claim(5.0))
        await asyncio.sleep(0.2)  # it waits for work
        await store.create(record("t1"), limited)
        claim = await asyncio.wait_for(waiting, 1.0)
        assert claim is not None
        assert (claim.record.task.id, claim.record.task.status) == ("t1", "in_progress")
        assert (claim.record.attempt, claim.job) == (1, limited)
        # Never queued: no stream entry names it; a here-lease is how a lost run is found.
        entries: Any = await client.xrange("gw:{queue}")
        assert [fields[b"task"] for _, fields in entries] == [b"t0"]
        assert await client.zscore("gw:{queue}:here", "t1") is not None
        assert await store.queue_depth() == 0
        assert await client.zcard("gw:{slots}:model:gpt-image-1") == 1
        assert await statuses(store, "t1") == ["queued", "in_progress"]
        await store.finish("t1", 1, ANSWER)
        await store.release("t1", handover=False)
        assert await client.zcard("gw:{slots}:model:gpt-image-1") == 0
        assert await client.zcard("gw:{queue}:here") == 0  # its lease went with its end
        assert await answer(store, "t1") == ANSWER
    finally:
        await store.close()


async def test_tasks_an_older_gateway_made_still_start_and_its_bare_wake_ups_are_read(
    redis_server: RedisServer,
) -> None:
    """A rolling upgrade: a task created by a gateway that kept no start event in it still
    starts here, and a change announced by an older gateway (a wake-up naming only the task)
    makes a waiter read the task at once instead of trusting what it last wrote."""
    client = Redis.from_url(redis_server.url)
    await client.flushall()
    store = RedisStore(client, consumer="upgrade", retention_s=60.0, lease_s=5.0)
    limited = msgspec.structs.replace(JOB, limits=[("model:gpt-image-1", 1)])
    try:
        await store.create(record("t1"), limited)
        await client.hdel("gw:{t1}:task", "started")  # as an older gateway made it
        claim = await store.claim(1.0)
        assert claim is not None
        assert (claim.record.task.id, claim.record.attempt) == ("t1", 1)
        assert await statuses(store, "t1") == ["queued", "in_progress"]
        watching = asyncio.ensure_future(store.ended("t1", 10.0))
        await asyncio.sleep(0.2)
        await client.hset("gw:{t1}:task", "status", "cancelled")  # an older gateway's cancel
        await client.publish("gw:wake", "t1")
        assert await asyncio.wait_for(watching, 2.0) == "cancelled"
    finally:
        await store.close()


async def test_a_task_that_announces_its_end_is_in_the_outbox_from_before_it_ends(
    store: TaskStore,
) -> None:
    """Its entry is there from its creation (not yet due), due once it ends however it ends
    (a cancel here), and leased to one taker at a time; a stale lease settles nothing."""
    announcing = msgspec.structs.replace(record("t-hook"), announce=True)
    await store.create(announcing, JOB)
    await store.create(record("t-quiet"), JOB)  # a task that does not announce: no entry
    assert await store.outbox.take(10, 30.0) == ([], 1)
    await store.cancel("t-quiet")
    await store.cancel("t-hook")
    (taken,), held = await store.outbox.take(10, 30.0)
    assert (taken.task_id, taken.attempts, taken.body, held) == ("t-hook", 0, b"", 1)
    assert await store.outbox.take(10, 30.0) == ([], 1)  # leased: no second taker
    assert await store.outbox.keep(taken, "alpha", b'{"id":"evt_1"}')
    assert await store.outbox.later(taken, 0.0, failed=True)
    (again,), _ = await store.outbox.take(10, 0.05)
    assert (again.attempts, again.client, again.body) == (1, "alpha", b'{"id":"evt_1"}')
    assert not await store.outbox.drop(taken)  # its lease is over: it settles nothing
    await asyncio.sleep(0.1)  # the short lease ends: due again
    (last,), _ = await store.outbox.take(10, 30.0)
    assert not await store.outbox.drop(again)
    assert await store.outbox.drop(last)
    assert await store.outbox.take(10, 30.0) == ([], 0)
