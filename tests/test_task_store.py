"""The task-store contract: every store keeps it (the Redis store joins the parametrization)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest

from gateway.tasks.memory import MemoryStore
from gateway.tasks.models import Job, StoredResponse, Task, TaskError, TaskRecord, TaskStore

JOB = Job(
    method="POST",
    path_qs="/v1/images/generations",
    headers=[("Authorization", "Bearer sk-caller")],
    body=b'{"model":"gpt-image-1","prompt":"x"}',
    deadline_s=300.0,
)
ANSWER = StoredResponse(status=200, headers=[("Content-Type", "application/json")], body=b"{}")


STORES: dict[str, Callable[[], TaskStore]] = {"memory": lambda: MemoryStore(retention_s=60.0)}


@pytest.fixture(params=sorted(STORES))
async def store(request: pytest.FixtureRequest) -> AsyncIterator[TaskStore]:
    made = STORES[request.param]()
    yield made
    await made.close()


def record(task_id: str = "t1") -> TaskRecord:
    task = Task(id=task_id, status="queued", model="gpt-image-1", created_at=int(time.time()))
    return TaskRecord(task=task, owner="owner-hash")


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
    done = await store.finish("t1", 1, "completed", response=ANSWER)
    assert done is not None
    assert done.status == "completed"
    assert await store.result("t1") == ANSWER
    assert await statuses(store, "t1") == ["queued", "in_progress", "completed"]


async def test_terminal_states_never_change(store: TaskStore) -> None:
    await store.create(record(), JOB)
    await store.claim(1.0)
    await store.finish("t1", 1, "failed", error=TaskError("boom", "upstream_error", "503"))
    assert await store.finish("t1", 1, "completed", response=ANSWER) is None
    cancelled = await store.cancel("t1")
    assert cancelled is not None
    assert cancelled.status == "failed"
    assert await store.result("t1") is None
    assert await statuses(store, "t1") == ["queued", "in_progress", "failed"]


async def test_a_stale_attempt_cannot_write(store: TaskStore) -> None:
    await store.create(record(), JOB)
    await store.claim(1.0)
    assert await store.finish("t1", 7, "completed", response=ANSWER) is None
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
    assert await store.finish("t1", 1, "completed", response=ANSWER) is None
    assert await store.result("t1") is None
    assert await statuses(store, "t1") == ["queued", "in_progress", "cancelled"]


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
