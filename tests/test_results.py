"""Results outside the task store (`GATEWAY_RESULTS_URL=file:///dir`), on every task store: a large
answer lives in a file the task points to, streams back byte for byte, goes with its retention,
and a results store that fails says so on the task instead of losing it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.config import ConfigError, load_config
from gateway.tasks.results import FileResults, Opened, ResultStoreUnavailable, ResultUnreadable
from gateway.tasks.service import TASKS, new_task_id
from tests.conftest import Fake, GatewayFactory

KEY = {"Authorization": "Bearer sk-caller"}
BODY = {"model": "gpt-image-1", "prompt": "a lighthouse"}


def same_answer(answer: bytes, sync_answer: bytes) -> bool:
    """The same answer, but for the stand-in's `created` second (two calls may straddle one)."""
    ours, theirs = json.loads(answer), json.loads(sync_answer)
    return len(answer) == len(sync_answer) and ours | {"created": 0} == theirs | {"created": 0}


async def async_answer(
    http: aiohttp.ClientSession, url: str, image_bytes: int
) -> tuple[str, int, bytes]:
    headers = {**KEY, "Prefer": "respond-async", "X-Fake-Image-Bytes": str(image_bytes)}
    async with http.post(f"{url}/v1/images/generations", json=BODY, headers=headers) as resp:
        task = await resp.json()
    waiting = {**KEY, "Prefer": "wait=10"}
    async with http.get(f"{url}{task['result_url']}", headers=waiting) as resp:
        return task["id"], resp.status, await resp.read()


async def answered_as_the_sync_call(
    http: aiohttp.ClientSession, url: str, image_bytes: int
) -> tuple[str, bytes]:
    """An async task's id and answer, checked against what the plain call returns."""
    headers = {**KEY, "X-Fake-Image-Bytes": str(image_bytes)}
    async with http.post(f"{url}/v1/images/generations", json=BODY, headers=headers) as resp:
        sync_answer = await resp.read()
    task_id, status, answer = await async_answer(http, url, image_bytes)
    assert status == 200
    assert same_answer(answer, sync_answer)
    return task_id, answer


async def test_a_large_result_lives_in_a_file_and_streams_back_byte_for_byte(
    gateway_factory: GatewayFactory,
    fake: Fake,
    store: dict[str, Any],
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    results = tmp_path / "results"
    gateway = await gateway_factory(tasks={**store, "results_url": f"file://{results}"})
    task_id, answer = await answered_as_the_sync_call(http, gateway.url, 1_000_000)
    assert (results / task_id).stat().st_size == len(answer)  # the file, not the store, holds it
    # A small result stays in the task store: no file for it.
    small_id, status, _ = await async_answer(http, gateway.url, 2_000)
    assert status == 200
    assert not (results / small_id).exists()


async def test_a_results_store_that_fails_fails_its_task_loudly(
    gateway_factory: GatewayFactory,
    store: dict[str, Any],
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    blocked = tmp_path / "results"
    blocked.write_text("a file where the directory should be")  # every write fails
    gateway = await gateway_factory(tasks={**store, "results_url": f"file://{blocked}"})
    task_id, status, answer = await async_answer(http, gateway.url, 1_000_000)
    assert status == 502
    assert b"result_store_unavailable" in answer
    async with http.get(f"{gateway.url}/v1/tasks/{task_id}", headers=KEY) as resp:
        task = await resp.json()
    assert task["status"] == "failed"
    assert task["error"]["code"] == "result_store_unavailable"
    assert gateway.sample("gateway_result_store_errors_total") == 1


async def test_results_go_with_their_retention_and_say_so_after(
    gateway_factory: GatewayFactory,
    store: dict[str, Any],
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    results = tmp_path / "results"
    gateway = await gateway_factory(tasks={**store, "results_url": f"file://{results}"})
    task_id, status, _ = await async_answer(http, gateway.url, 500_000)
    assert status == 200
    day_ago = time.time() - 86_400
    os.utime(results / task_id, (day_ago, day_ago))
    assert await FileResults(results).sweep(older_than_s=3600) == 1
    async with http.get(f"{gateway.url}/v1/tasks/{task_id}/result", headers=KEY) as resp:
        assert resp.status == 404
        assert "no longer kept" in (await resp.json())["error"]["message"]


def _aged(path: Path, seconds: float = 86_400) -> None:
    old = time.time() - seconds
    os.utime(path, (old, old), follow_symlinks=False)


async def test_the_sweep_removes_old_results_and_nothing_else_in_the_directory(
    tmp_path: Path,
) -> None:
    results = tmp_path / "results"
    kept = FileResults(results)
    expired, fresh = new_task_id(), new_task_id()
    taken_over = f"{new_task_id()}.2"  # the answer of a run that took another over
    await kept.put(taken_over, b"an old answer too")
    await kept.put(expired, b"an old answer")
    await kept.put(fresh, b"a new answer")
    leftover = results / f".{new_task_id()}.0123456789abcdef.partial"  # its writer was killed
    leftover.write_bytes(b"half an ans")
    outside = tmp_path / "elsewhere"
    outside.write_bytes(b"not the gateway's")
    operators = {
        ".keep": b"",
        "results-backup.tar": b"an operator's backup",
        "README": b"what this volume is for",
    }
    for name, content in operators.items():
        (results / name).write_bytes(content)
    (results / "latest").symlink_to(outside)
    (results / new_task_id()).symlink_to(outside)  # a result's name, but the gateway's never
    (results / new_task_id()).mkdir()
    for path in [*results.iterdir(), outside]:
        if path.name != fresh:
            _aged(path)

    assert await kept.sweep(older_than_s=3600) == 3
    assert not (results / expired).exists()
    assert not (results / taken_over).exists()
    assert not leftover.exists()
    assert (results / fresh).read_bytes() == b"a new answer"
    for name, content in operators.items():
        assert (results / name).read_bytes() == content
    assert (results / "latest").is_symlink()
    assert outside.read_bytes() == b"not the gateway's"
    assert len(list(results.iterdir())) == 2 + len(operators) + 2  # fresh, operator's, links, dir


async def test_a_failed_write_leaves_no_partial_file(tmp_path: Path) -> None:
    results = tmp_path / "results"
    kept = FileResults(results)
    await kept.put(new_task_id(), b"a first answer")  # the directory exists
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    # Files over 64 KiB cannot grow (EFBIG: a full disk, as far as the writer can tell).
    resource.setrlimit(resource.RLIMIT_FSIZE, (65_536, limit[1]))
    try:
        with pytest.raises(ResultStoreUnavailable):
            await kept.put(new_task_id(), b"x" * 1_000_000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
    assert [path.name.startswith(".") for path in results.iterdir()] == [False]


async def test_writers_of_one_result_name_never_mix_their_bytes(tmp_path: Path) -> None:
    """Writers in one process share a pid, as two containers both running as PID 1 on one
    volume do: each one's file is its own, and the result is one writer's answer, whole."""
    kept = FileResults(tmp_path / "results")
    task_id = new_task_id()
    bodies = [bytes([ord("a") + n]) * 4_000_000 for n in range(4)]
    for _ in range(3):
        refs = await asyncio.gather(*(kept.put(task_id, body) for body in bodies))
        assert refs == [task_id] * len(bodies)
        assert (tmp_path / "results" / task_id).read_bytes() in bodies
    assert os.listdir(tmp_path / "results") == [task_id]


class ResultsLostMidAnswer(FileResults):
    """Kept results whose storage goes after the first chunk of an answer."""

    @contextlib.asynccontextmanager
    async def open(self, ref: str) -> AsyncIterator[Opened | None]:
        async with super().open(ref) as opened:
            assert opened is not None
            yield Opened(opened.size, self._first_chunk(opened.chunks))

    @staticmethod
    async def _first_chunk(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        yield await anext(chunks)
        raise ResultUnreadable()


async def test_a_results_store_lost_mid_answer_cuts_the_answer_short(
    gateway_factory: GatewayFactory, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    results = tmp_path / "results"
    gateway = await gateway_factory(tasks={"results_url": f"file://{results}"})
    task_id, status, _ = await async_answer(http, gateway.url, 1_000_000)
    assert status == 200
    gateway.app[TASKS].results = ResultsLostMidAnswer(results)
    async with http.get(f"{gateway.url}/v1/tasks/{task_id}/result", headers=KEY) as resp:
        assert resp.status == 200  # sent before the loss
        # Cut short of its Content-Length: never taken for a whole answer, nor an error
        # answer written inside it.
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


@pytest.mark.parametrize(
    "url", ["file:///var/lib/gateway/results", "s3://gw-results", "s3://gw-results/prod/tasks/"]
)
def test_the_results_url_comes_from_the_environment(tmp_path: Path, url: str) -> None:
    file = tmp_path / "gw.toml"
    file.write_text("")
    assert load_config(file, env={"GATEWAY_RESULTS_URL": url}).tasks.results_url == url


@pytest.mark.parametrize(
    "url",
    [
        "file://relative/dir",
        "/var/lib/gateway/results",
        "s3://",
        "s3:///prefix",
        "s3://key:secret@bucket/prefix",
        "gs://bucket/prefix",
        "https://bucket.s3.amazonaws.com/prefix",
    ],
)
def test_a_results_url_of_another_kind_is_refused_naming_where_it_came_from(
    tmp_path: Path, url: str
) -> None:
    file = tmp_path / "gw.toml"
    file.write_text("")
    with pytest.raises(ConfigError, match=r"^GATEWAY_RESULTS_URL must be file:///") as refused:
        load_config(file, env={"GATEWAY_RESULTS_URL": url})
    assert "secret" not in str(refused.value)
    file.write_text(f"[tasks]\nresults_url = '{url}'\n")
    with pytest.raises(ConfigError, match=r"gw.toml: tasks.results_url must be"):
        load_config(file, env={})
