"""What many tests do the same way: a caller's key, an async submit, waiting for a task's end."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import aiohttp

KEY = {"Authorization": "Bearer sk-tenant-a"}
OTHER = {"Authorization": "Bearer sk-tenant-b"}
GENERATE = {"model": "gpt-image-1", "prompt": "a lighthouse"}
ENDED = frozenset(("completed", "failed", "cancelled"))


async def post_task(
    http: aiohttp.ClientSession,
    base_url: str,
    *,
    body: Any = GENERATE,
    key: Mapping[str, str] = KEY,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    """An async generation call (`Prefer: respond-async` unless `headers` say otherwise): its
    status, headers and JSON body."""
    sent = {**key, "Prefer": "respond-async", **(headers or {})}
    async with http.post(f"{base_url}/v1/images/generations", json=body, headers=sent) as resp:
        return resp.status, dict(resp.headers), await resp.json()


async def submit(
    http: aiohttp.ClientSession,
    base_url: str,
    *,
    body: Any = GENERATE,
    key: Mapping[str, str] = KEY,
    headers: Mapping[str, str] | None = None,
) -> Any:
    """`post_task`, answered 202: the task object."""
    status, _, task = await post_task(http, base_url, body=body, key=key, headers=headers)
    assert status == 202, task
    return task


async def task_at(http: aiohttp.ClientSession, url: str, key: Mapping[str, str] = KEY) -> Any:
    """The task object at `url`; a 503 (the store is restarting, say) is a task of status
    "unknown"."""
    async with http.get(url, headers=key) as resp:
        if resp.status == 503:  # a clear, retryable answer
            assert resp.headers["x-should-retry"] == "true"
            return {"status": "unknown"}
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def until_ended(
    http: aiohttp.ClientSession,
    *urls: str,
    key: Mapping[str, str] = KEY,
    within_s: float = 10.0,
) -> list[Any]:
    """The tasks at `urls` once every one has ended, polled; an AssertionError naming their
    statuses if they have not within `within_s`."""
    deadline = time.monotonic() + within_s
    while True:
        tasks = [await task_at(http, url, key) for url in urls]
        if all(task["status"] in ENDED for task in tasks):
            return tasks
        if time.monotonic() > deadline:
            raise AssertionError(f"not all ended: {[task['status'] for task in tasks]}")
        await asyncio.sleep(0.05)
