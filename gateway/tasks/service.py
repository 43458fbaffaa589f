"""The task subsystem's state for one app: its store, and whose tasks are whose."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
from collections.abc import AsyncIterator

from aiohttp import web
from multidict import MultiMapping
from yarl import URL

from gateway.auth import Auth
from gateway.config import CONFIG, Config
from gateway.errors import NotFound, StoreUnavailable, Unauthorized
from gateway.metrics import METRICS, Metrics
from gateway.tasks import links, redis
from gateway.tasks.memory import MemoryStore
from gateway.tasks.models import TASK_ID, StoredResponse, TaskRecord, TaskStore
from gateway.tasks.results import FileResults, Results, ResultStoreUnavailable
from gateway.tasks.results_s3 import S3Results

logger = logging.getLogger(__name__)


class TaskService:
    def __init__(
        self,
        store: TaskStore,
        auth: Auth,
        results: Results | None = None,
        link_ttl_s: float = 0.0,
    ) -> None:
        self.store = store
        self.results = results  # large results, when kept outside the store
        self._auth = auth
        # Owners are keyed hashes, so the store never holds a credential; the key comes from
        # the store (shared by every replica) when the app starts.
        self._owner_key = b""
        self.closing = asyncio.Event()  # set on shutdown: open event streams end
        # Whether the store answered its last check (`watch_store`): what /readyz says, so a
        # probe never waits on a hung Redis.
        self.reachable = False
        self._link_ttl_s = link_ttl_s  # 0: no signed links

    async def start(self) -> None:
        """Fetch the owner key now if the store answers; a replica that starts while Redis is
        down still serves plain calls, and fetches the key on first use."""
        try:
            self._owner_key = await self.store.owner_key()
        except StoreUnavailable:
            logger.warning("task store unreachable at start-up; plain calls are served")

    async def owner(self, caller_key: str | None) -> str:
        """The caller's credential as a keyed hash: who may see a task."""
        if caller_key is None:
            raise Unauthorized("Async tasks belong to a credential: send an API key.")
        if not self._owner_key:
            self._owner_key = await self.store.owner_key()
        return self._digest(caller_key)

    def upstream_credential(self, caller_key: str | None) -> str:
        """The key the caller's job sends upstream, as a keyed hash: the unit APIYI's
        concurrency limits count in."""
        return self._digest(self._auth.upstream_credential(caller_key))

    def signer(self) -> links.Signer | None:
        """What signs the links of a task object (None: links are off, or the owner key is
        not yet known)."""
        if not self._link_ttl_s or not self._owner_key:
            return None
        secret, ttl_s = links.link_secret(self._owner_key), self._link_ttl_s
        return lambda path: links.sign(secret, path, ttl_s)

    def _digest(self, key: str) -> str:
        return hmac.new(self._owner_key, key.encode(), hashlib.sha256).hexdigest()

    async def visible(
        self, caller_key: str | None, task_id: str, *, with_answer: bool = False
    ) -> tuple[TaskRecord, StoredResponse | None]:
        """The task, and its answer if asked for (None until it has one), if the caller's
        credential made it; 404 otherwise, so another tenant cannot even learn that it exists."""
        owner = await self.owner(caller_key)
        got = await self._read(task_id, with_answer)
        if got is None or not hmac.compare_digest(got[0].owner, owner):
            raise NotFound("No such task.")
        return got

    async def linked(
        self, path: str, query: MultiMapping[str], task_id: str, *, with_answer: bool = False
    ) -> tuple[TaskRecord, StoredResponse | None]:
        """`visible`'s answer for a signed link of `path` instead of a credential: 404 for a
        link that is expired, forged, or of another path, as for another's task."""
        if not await self._link_valid(path, query):
            raise NotFound("No such task.")
        got = await self._read(task_id, with_answer)
        if got is None:
            raise NotFound("No such task.")
        return got

    async def _read(
        self, task_id: str, with_answer: bool
    ) -> tuple[TaskRecord, StoredResponse | None] | None:
        if not TASK_ID.fullmatch(task_id):
            return None
        if with_answer:
            return await self.store.answered(task_id)
        record = await self.store.get(task_id)
        return None if record is None else (record, None)

    async def _link_valid(self, path: str, query: MultiMapping[str]) -> bool:
        if not self._link_ttl_s:
            return False  # links turned off: those handed out before stop working too
        if not self._owner_key:
            self._owner_key = await self.store.owner_key()
        return links.verify(links.link_secret(self._owner_key), path, query)


TASKS = web.AppKey("tasks", TaskService)


# Between two checks of the store: how stale /readyz and the queue depth may be.
_WATCH_INTERVAL_S = 1.0


async def tasks_ctx(app: web.Application) -> AsyncIterator[None]:
    service, metrics = app[TASKS], app[METRICS]
    await service.start()
    await check_store(service, metrics)  # ready once the store has answered, not before
    watcher = asyncio.create_task(watch_store(service, metrics))
    yield
    watcher.cancel()
    await asyncio.gather(watcher, return_exceptions=True)  # no check left on a closed client
    await service.store.close()


async def watch_store(service: TaskService, metrics: Metrics) -> None:
    """Check the store once a second, in the background. Probes and scrapes then never wait on
    a hung Redis: a scrape that did would outlast Prometheus's timeout, and the metrics vanish
    mid-incident."""
    while True:
        await asyncio.sleep(_WATCH_INTERVAL_S)
        await check_store(service, metrics)


async def check_store(service: TaskService, metrics: Metrics) -> None:
    """Whether the store answers (for /readyz), and its queue depth (for /metrics)."""
    service.reachable = await service.store.ping()
    if service.reachable:
        with contextlib.suppress(StoreUnavailable):
            metrics.task_queue_depth.set(await service.store.queue_depth())


async def results_ctx(app: web.Application) -> AsyncIterator[None]:
    """The results store's client and its sweeper, if results are kept outside the store."""
    results = app[TASKS].results
    if results is None:
        yield
        return
    await results.start()
    sweeper = asyncio.create_task(_sweep(results, app[CONFIG].tasks.retention_s))
    yield
    sweeper.cancel()
    await asyncio.gather(sweeper, return_exceptions=True)  # no sweep left on a closed client
    await results.close()


async def _sweep(results: Results, retention_s: float) -> None:
    """Results go when their tasks do: a look every tenth of the retention (an hour at most)."""
    while True:
        await asyncio.sleep(min(retention_s / 10, 3600.0))
        try:
            removed = await results.sweep(retention_s)
        except ResultStoreUnavailable as failure:
            logger.warning("results store unreachable, sweep put off: %s", failure.__cause__)
            continue
        if removed:
            logger.info("%d results past their retention removed", removed)


def open_results(config: Config) -> Results | None:
    url = config.tasks.results_url
    if url is None:
        return None
    return S3Results.from_url(url) if url.startswith("s3://") else FileResults.from_url(url)


def open_store(config: Config, metrics: Metrics) -> TaskStore:
    if config.tasks.redis_url is None:
        return MemoryStore(config.tasks.retention_s, config.tasks.queue_caps())
    return redis.connect(config.tasks, metrics.store_call, metrics.store_wait_skipped.inc)


def describe_store(config: Config) -> str:
    """For the start-up log: where tasks live, without credentials."""
    if config.tasks.redis_url is None:
        return "embedded store (one replica only; tasks do not survive a restart)"
    url = URL(config.tasks.redis_url)
    return f"Redis at {url.host}:{url.port}{url.path}"


def new_task_id() -> str:
    return "task_" + secrets.token_urlsafe(16)  # 128 random bits: its shape is `TASK_ID`
