"""The task subsystem's state for one app: its store, and whose tasks are whose."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import secrets
import socket
from collections.abc import AsyncIterator

from aiohttp import web
from multidict import MultiMapping
from redis.asyncio import BlockingConnectionPool, Redis
from yarl import URL

from gateway.auth import presented_key
from gateway.config import Config
from gateway.errors import NotFound, Unauthorized
from gateway.metrics import METRICS
from gateway.tasks.memory import MemoryStore
from gateway.tasks.models import TaskRecord, TaskStore
from gateway.tasks.store import RedisStore

_SPARE_CONNECTIONS = 64


class TaskService:
    def __init__(self, store: TaskStore) -> None:
        self.store = store
        # Owners are keyed hashes, so the store never holds a credential; the key comes from
        # the store (shared by every replica) when the app starts.
        self._owner_key = b""
        self.closing = asyncio.Event()  # set on shutdown: open event streams end

    async def start(self) -> None:
        self._owner_key = await self.store.owner_key()

    def owner(self, headers: MultiMapping[str]) -> str:
        """The caller's credential as a keyed hash: who may see a task."""
        key = presented_key(headers)
        if key is None:
            raise Unauthorized("Async tasks belong to a credential: send an API key.")
        return self._digest(key)

    def upstream_credential(self, headers: MultiMapping[str]) -> str:
        """The key a job sends upstream (the caller's, or the gateway's own when it injects
        one), as a keyed hash: the unit APIYI's concurrency limits count in."""
        return self._digest(presented_key(headers) or "")

    def _digest(self, key: str) -> str:
        return hmac.new(self._owner_key, key.encode(), hashlib.sha256).hexdigest()

    async def visible(self, request: web.Request) -> TaskRecord:
        """The task named in the path, if the caller's credential made it; 404 otherwise, so
        another tenant cannot even learn that it exists."""
        record = await self.store.get(request.match_info["task_id"])
        if record is None or not hmac.compare_digest(record.owner, self.owner(request.headers)):
            raise NotFound("No such task.")
        return record


TASKS = web.AppKey("tasks", TaskService)


async def tasks_ctx(app: web.Application) -> AsyncIterator[None]:
    service, metrics = app[TASKS], app[METRICS]
    if isinstance(service.store, RedisStore):
        service.store.observe = metrics.store_call

    async def queue_depth() -> None:
        metrics.task_queue_depth.set(await service.store.queue_depth())

    metrics.before_scrape.append(queue_depth)
    await service.start()
    yield
    await service.store.close()


def open_store(config: Config) -> TaskStore:
    tasks = config.tasks
    if tasks.redis_url is None:
        return MemoryStore(retention_s=tasks.retention_s)
    # Each worker blocks on the queue with a connection of its own; requests share the rest.
    # Past that, a command waits briefly for a free connection rather than failing.
    pool = BlockingConnectionPool.from_url(
        tasks.redis_url,
        max_connections=tasks.workers + _SPARE_CONNECTIONS,
        timeout=5.0,
        socket_connect_timeout=2.0,
        # A hung Redis must not hang callers; longer than a claim's blocking read (5 s).
        socket_timeout=15.0,
    )
    client = Redis.from_pool(pool)  # owns the pool: closing the client closes it
    return RedisStore(
        client,
        # Unique per process: a restarted worker must not inherit its predecessor's claims.
        consumer=f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}",
        retention_s=tasks.retention_s,
        prefix=tasks.key_prefix,
        lease_s=tasks.lease_s,
        max_deliveries=tasks.max_deliveries,
    )


def describe_store(config: Config) -> str:
    """For the start-up log: where tasks live, without credentials."""
    if config.tasks.redis_url is None:
        return "embedded store (one replica only; tasks do not survive a restart)"
    url = URL(config.tasks.redis_url)
    return f"Redis at {url.host}:{url.port}{url.path}"


def new_task_id() -> str:
    return "task_" + secrets.token_urlsafe(16)  # 128 random bits
