"""The Redis task store: the `TaskStore` contract over the creation, the queue, the transitions,
the slots and the wake-ups. Any replica sharing the Redis can serve any task."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable
from typing import Any

import msgspec
from redis.exceptions import RedisError

from gateway.errors import StoreUnavailable
from gateway.tasks.models import (
    TERMINAL,
    Claim,
    Job,
    OnceName,
    QueueCaps,
    Status,
    StoredResponse,
    Task,
    TaskError,
    TaskEvent,
    TaskRecord,
)
from gateway.tasks.redis.claiming import Claiming, Held
from gateway.tasks.redis.clock import RedisClock
from gateway.tasks.redis.creation import Creation
from gateway.tasks.redis.keys import Keys
from gateway.tasks.redis.observed import (
    Observer,
    giving_up_at,
    store_call,
    store_wait,
    store_write,
    unobserved,
)
from gateway.tasks.redis.outbox import RedisOutbox
from gateway.tasks.redis.queue import Queue
from gateway.tasks.redis.replicas import ReplicaAcks
from gateway.tasks.redis.slots import Slots
from gateway.tasks.redis.transitions import Transitions, with_status
from gateway.tasks.redis.waiting import Outcome, Waiting
from gateway.tasks.redis.wakeups import Wakeups

logger = logging.getLogger(__name__)


class RedisStore:
    def __init__(
        self,
        redis: Any,
        *,
        consumer: str,
        retention_s: float,
        prefix: str = "gw",
        lease_s: float = 30.0,
        max_deliveries: int = 3,
        observe: Observer = unobserved,
        caps: QueueCaps = QueueCaps(),  # noqa: B008 (frozen)
        cluster: bool = False,
        replicas: int = 0,
        replica_ack_timeout_ms: int = 100,
        deadline_s: float = 2.0,
        on_wait_skipped: Callable[[], object] = lambda: None,
    ) -> None:
        # redis-py types its replies as unions over decode_responses; this store always works
        # in bytes, so the client is used untyped rather than narrowed at every call.
        self._redis: Any = redis
        self.observe = observe
        # How long a caller waits for Redis (`observed.py`); a creation, also for a replica.
        self.deadline_s = deadline_s
        self._ack_s = replica_ack_timeout_ms / 1000 if replicas else 0.0
        self.write_deadline_s = deadline_s + self._ack_s
        self._clock = RedisClock(redis)
        keys = self._keys = Keys(prefix)
        lease_ms = int(lease_s * 1000)
        self._queue = Queue(redis, keys, consumer.encode(), lease_ms, max_deliveries, caps)
        acks = ReplicaAcks(
            redis,
            replicas=replicas,
            timeout_ms=replica_ack_timeout_ms,
            cluster=cluster,
            on_skip=on_wait_skipped,
        )
        self.outbox = RedisOutbox(redis, keys, self, self._clock)
        self._transitions = Transitions(redis, keys, int(retention_s * 1000), acks, self.outbox)
        self._creation = Creation(
            redis, keys, self._queue, self._transitions, acks, ordered=not cluster
        )
        self._slots = Slots(redis, keys, lease_ms)
        self._ordered = not cluster  # one node: a pipeline runs in order, keys in any slot
        self._wakeups = Wakeups(redis, keys.wake)
        self._held: dict[str, Held] = {}  # the tasks this worker runs
        self._waiting = Waiting(redis, keys, self._transitions, self._wakeups)
        self._claiming = Claiming(
            redis,
            keys,
            self._queue,
            self._slots,
            self._transitions,
            self._wakeups,
            self._waiting,
            self._held,
            self._hand_over,
            ordered=not cluster,
        )
        # redis-py's cluster client, first used by many calls at once, can fail them with
        # connection errors: it learns the cluster once, before any call (`store_call`).
        self.ready = not cluster
        self._getting_ready = asyncio.Lock()

    @property
    def redis(self) -> Any:
        """The client, for the usage ledger (`gateway/usage/redis_ledger.py`), whose keys and
        scripts are its own but whose Redis is this one."""
        return self._redis

    @property
    def clock(self) -> RedisClock:
        """Redis's clock as read here, for the usage ledger's fenced holds."""
        return self._clock

    async def get_ready(self) -> None:
        async with self._getting_ready:
            if not self.ready:
                await self._redis.initialize()
                self.ready = True

    @store_write
    async def create(
        self, record: TaskRecord, job: Job, retention_s: float | None = None, *, here: bool = False
    ) -> None:
        await self._create(record, job, retention_s, None, here)

    @store_write
    async def find_or_create(
        self,
        record: TaskRecord,
        job: Job,
        retention_s: float | None,
        once: OnceName,
        *,
        here: bool = False,
    ) -> str | None:
        return await self._create(record, job, retention_s, once, here)

    async def _create(
        self,
        record: TaskRecord,
        job: Job,
        retention_s: float | None,
        once: OnceName | None,
        here: bool,
    ) -> str | None:
        retention_ms = None if retention_s is None else int(retention_s * 1000)
        if record.announce:  # first: no task that announces its end exists without its entry
            await self.outbox.expect(record.task.id)
        # Before its caller stops waiting, by the time a replica may take and a quarter of the
        # deadline for the error of reading Redis's clock: a write later than that does nothing.
        fence_ms = await self._clock.fence_ms(
            giving_up_at.get() - self._ack_s - self.deadline_s / 4
        )
        mark = self._wakeups.mark()
        if self._ordered and once is None and not here:
            await self._open(record, job, retention_ms, mark, fence_ms)
            return None
        # A worker of this replica idle: it takes the task, and no other replica is woken.
        announce = not (here or self._wakeups.idle_here())
        found = await self._creation.create(
            record, job, retention_ms, once, here, announce, fence_ms
        )
        if found is None and not (here or announce or self._wakeups.wake_here()):
            await self._queue.announce()  # it found work meanwhile
        if found is None:
            self._waiting.expect(record.task.id, record.task.status, mark)
            if here:
                self._held[record.task.id] = Held(b"", [], record, [])
        return found

    async def _open(
        self,
        record: TaskRecord,
        job: Job,
        retention_ms: int | None,
        mark: int | None,
        fence_ms: int,
    ) -> None:
        """A new task on a standalone Redis, in one round trip (`open.lua`): given at once to
        an idle worker of this replica, set aside for it, when nothing waits ahead of it and
        its slots are free (no take, no start); else queued."""
        task_id, limits = record.task.id, job.limits
        aside = self._wakeups.set_aside()
        slots = self._slots.keys(limits)
        try:
            started = await self._creation.open(
                record,
                job,
                retention_ms,
                aside is not None,
                (slots, self._slots.take_args(limits)),
                fence_ms,
            )
        except BaseException:
            if aside is not None:
                self._wakeups.give(aside, None)
            raise
        if not started:
            self._waiting.expect(task_id, "queued", mark)
            if aside is not None and not self._wakeups.give(aside, None):  # else it looks
                await self._queue.announce()  # it stopped waiting: wake one anywhere
            return
        running = msgspec.structs.replace(with_status(record, "in_progress"), attempt=1)
        self._held[task_id] = Held(b"", slots, running, limits)
        self._waiting.expect(task_id, "in_progress", mark)
        assert aside is not None
        if not self._wakeups.give(aside, Claim(running, job)):
            await self._hand_over(task_id)  # its worker went: another takes it over

    async def _hand_over(self, task_id: str) -> None:
        with contextlib.suppress(StoreUnavailable):  # else its lease lapses, and it is found
            await self.release(task_id, handover=True)

    @store_call
    async def get(self, task_id: str) -> TaskRecord | None:
        return await self._transitions.read(task_id)

    @store_wait
    async def claim(self, timeout_s: float) -> Claim | None:
        return await self._claiming.claim(timeout_s)

    @store_wait
    async def renew(self, task_id: str) -> None:
        held = self._held.get(task_id)
        if held is None:
            return
        if held.entry_id:
            await self._queue.keep(held.entry_id)
        else:
            await self._queue.keep_here(task_id)
        await self._slots.renew(task_id, held.slots)

    @store_wait
    async def release(self, task_id: str, *, handover: bool) -> None:
        held = self._held.pop(task_id, None)
        self._waiting.hand(task_id, None)
        if held is None or held.ended:
            return
        await self._slots.release(task_id, held.slots)
        if not held.entry_id:
            await self._queue.let_go_here(task_id, handover)
        elif handover:  # the task is in progress: its fresh entry says it may be taken over
            await self._queue.hand_over(held.entry_id, task_id, held.limits)

    @store_wait
    async def finish(
        self,
        task_id: str,
        attempt: int,
        response: StoredResponse,
        error: TaskError | None = None,
        *,
        keep_name: bool = True,
    ) -> Task | None:
        held = self._held.get(task_id)
        record = held.record if held is not None else await self._transitions.read(task_id)
        if record is None:
            return None
        status: Status = "completed" if error is None else "failed"
        # On a standalone Redis what the run holds goes with its end, in `end.lua`.
        together = held is not None and self._ordered
        let_go = self._queue.let_go(held.entry_id, held.slots) if together and held else ([], [])
        ended = await self._transitions.end(record, attempt, status, response, error, let_go)
        if ended is None:
            return None  # fenced out or cancelled: the name still finds the run that counts
        if not keep_name and record.once is not None:
            await self._creation.forget_name(record.once)
        task, entry_id = ended
        if held is not None and together:
            held.ended = True  # release has nothing left to send
        else:
            await self._let_go_after(task_id, entry_id, held)
        self._waiting.hand(task_id, (task, response))
        return task

    async def _let_go_after(self, task_id: str, entry_id: bytes, held: Held | None) -> None:
        """What the run that ended the task held, after its end (a Redis Cluster). Only that
        run acknowledges an entry, its own: a worker fenced out by a takeover must not touch
        the entry the new run holds."""
        slots = held.slots if held is not None and held.entry_id == entry_id else []
        if entry_id or slots:
            async with self._redis.pipeline(transaction=False) as pipe:
                if entry_id:
                    self._queue.done_call(pipe, entry_id)
                self._slots.release_call(pipe, task_id, slots)
                await pipe.execute()
            if held is not None and slots:
                held.slots = []

    @store_call
    async def cancel(self, task_id: str) -> Task | None:
        record = await self._transitions.read(task_id)
        if record is None or record.task.status in TERMINAL:
            return None if record is None else record.task
        ended = await self._transitions.end(record, None, "cancelled")
        if ended is None:  # it ended meanwhile
            record = await self._transitions.read(task_id)
            return None if record is None else record.task
        task, entry_id = ended
        if entry_id:  # its worker is told by the event; its queue entry is done now
            await self._queue.done(entry_id)
        elif record.task.status == "queued":
            await self._queue.unqueue(task_id)  # no longer counts against its caller's caps
        return task

    @store_call
    async def answered(self, task_id: str) -> tuple[TaskRecord, StoredResponse | None] | None:
        return await self._waiting.answered(task_id)

    @store_wait
    async def events(self, task_id: str, after: str | None, timeout_s: float) -> list[TaskEvent]:
        return await self._waiting.events(task_id, after, timeout_s)

    @store_wait
    async def outcome(self, task_id: str, timeout_s: float) -> Outcome | None:
        return await self._waiting.outcome(task_id, timeout_s, running_here=self._held)

    @store_wait
    async def ended(self, task_id: str, timeout_s: float) -> Status | None:
        return await self._waiting.ended(task_id, timeout_s)

    @store_call
    async def queue_depth(self) -> int:
        return await self._queue.depth()

    @store_call
    async def owner_key(self) -> bytes:
        # Made once by whichever replica starts first; every replica then hashes alike.
        await self._redis.set(self._keys.owner_key, secrets.token_bytes(32), nx=True)
        value: bytes = await self._redis.get(self._keys.owner_key)
        return value

    async def ping(self) -> bool:
        """Whether Redis answers within the deadline; its clock is read as it does."""
        try:
            async with asyncio.timeout(self.deadline_s):
                await self.get_ready()
                await self._clock.read()
        except (RedisError, OSError):  # OSError: a timeout, too
            return False
        return True

    async def close(self) -> None:
        await self._wakeups.close()
        await self._redis.aclose()
