"""Creating a task in Redis: its keys, then its run-once name, then its place in the queue (or,
for a task run here, its lease first), in that order. A name always finds a task that exists,
and a task created for a call found again, or over its caller's caps, leaves nothing behind.
Every step is fenced (`lua/fence.lua`): one that reaches a hung Redis after the gateway stopped
waiting for it does nothing."""

from __future__ import annotations

from typing import Any, NamedTuple

from gateway.errors import QUEUE_FULL_FOR_ALL, QueueFull
from gateway.tasks.models import Job, OnceName, TaskRecord
from gateway.tasks.redis.keys import Keys
from gateway.tasks.redis.queue import ENQUEUE, HOLD_HERE, OPEN, Queue
from gateway.tasks.redis.replicas import ReplicaAcks
from gateway.tasks.redis.scripts import script
from gateway.tasks.redis.transitions import CREATE, Transitions

_FENCE = script("fence")


class _Step(NamedTuple):
    """One script of a pipelined round trip, with its keys and arguments."""

    script: Any
    keys: list[str]
    args: list[Any]


class Creation:
    def __init__(
        self,
        redis: Any,
        keys: Keys,
        queue: Queue,
        transitions: Transitions,
        acks: ReplicaAcks,
        *,
        ordered: bool,
    ) -> None:
        self._redis = redis
        self._acks = acks
        self._keys = keys
        self._queue = queue
        self._transitions = transitions
        # In a Redis Cluster a pipeline's commands for different slots go to different nodes,
        # in no order: steps whose order matters are sent one after the other there.
        self._ordered = ordered
        self._forget_name = redis.register_script(script("forget_name"))
        fenced = (HOLD_HERE, CREATE, script("take_name"), ENQUEUE, OPEN)
        self._hold, self._create, self._take_name, self._enqueue, self._open = (
            redis.register_script(_FENCE + unfenced) for unfenced in fenced
        )

    async def create(
        self,
        record: TaskRecord,
        job: Job,
        retention_ms: int | None,
        once: OnceName | None,
        here: bool,
        announce: bool,
        fence_ms: int,
    ) -> str | None:
        """Create the task (see `TaskStore.find_or_create`): None, or what its name already
        held (and nothing was created). `QueueFull` over the caller's caps. `announce`: wake a
        worker of every replica when it is queued (else the caller wakes one of its own).
        `fence_ms`: Redis's time after which no step does anything."""
        task_id, caller, size, limits = record.task.id, record.owner, len(job.body), job.limits
        keys, args = self._transitions.create_call(record, job, retention_ms)
        # A task run here holds its lease before it exists, so a replica dying in between
        # leaves nothing stuck. The task exists before its name does, so whoever finds the name
        # finds the task. The queue is another Redis Cluster slot, so it is not in the script.
        steps = [_Step(self._create, keys, args)]
        if here:
            steps.insert(0, _Step(self._hold, *self._queue.hold_call(task_id)))
        if once is not None:
            steps.append(self._name_step(once))
        elif not here:
            enqueue = self._queue.enqueue_call(task_id, caller, size, limits, announce=announce)
            steps.append(_Step(self._enqueue, *enqueue))
        last = (await self._pipelined(steps, fence_ms))[-1]
        if once is not None and last is not None and not once.replace:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.delete(*keys)  # never queued: no worker saw it
                if here:
                    pipe.zrem(self._keys.here, task_id)
                await pipe.execute()
            return bytes(last).decode()
        if not here and once is not None:  # queued only now that its name is its own
            enqueue = self._queue.enqueue_call(task_id, caller, size, limits, announce=announce)
            last = await self._enqueue(keys=enqueue[0], args=[*enqueue[1], fence_ms])
        if not here and last != 1:
            await self._redis.delete(*keys)  # over the queue's caps: nothing stays
            if once is not None:
                await self.forget_name(once)
            raise _over_caps(last)
        return None

    async def open(
        self,
        record: TaskRecord,
        job: Job,
        retention_ms: int | None,
        set_aside: bool,
        slots: tuple[list[str], list[int]],
        fence_ms: int,
    ) -> bool:
        """Create and queue the task in one step (a standalone Redis: `open.lua`); with
        `set_aside` (an idle worker of this replica kept for it), started at once instead if
        nothing waits ahead of it and its `slots` (keys, `take_args`) are free. True if it
        started (attempt 1, a here-lease, no queue entry). `QueueFull` over the caller's caps."""
        keys, args = self._transitions.create_call(record, job, retention_ms)
        task_id, caller, size = record.task.id, record.owner, len(job.body)
        more_keys, more_args = self._queue.open_call(task_id, caller, size, job.limits, set_aside)
        keys, args = [*keys, *more_keys, *slots[0]], [*args, *more_args, *slots[1], fence_ms]
        opened = await self._acks.run(self._open, keys, args)
        if opened not in (1, 2):
            raise _over_caps(opened)
        return bool(opened == 2)

    async def forget_name(self, once: OnceName) -> None:
        """Let a run-once name go, if it still names this call's task."""
        await self._forget_name(keys=[self._keys.once(once.name)], args=[once.value])

    def _name_step(self, once: OnceName) -> _Step:
        """Set the name (unless held, or `replace`), answering what it held."""
        px = max(int(once.ttl_s * 1000), 1)
        args = [once.value, px, "1" if once.replace else "0"]
        return _Step(self._take_name, [self._keys.once(once.name)], args)

    async def _pipelined(self, steps: list[_Step], fence_ms: int) -> list[Any]:
        """Scripts and commands in one round trip, in order. Scripts go as EVAL, not EVALSHA:
        a Redis that restarted or failed over has forgotten its scripts, and a step re-run
        after the others would break the order that makes a name find its task. Each round trip
        ends waiting for a replica (`replicas.py`): a created task survives a failover."""
        replies: list[Any] = []
        batches = [steps] if self._ordered else [[step] for step in steps]
        for batch in batches:
            async with self._redis.pipeline(transaction=False) as pipe:
                for step in batch:
                    keys, args = step.keys, [*step.args, fence_ms]
                    pipe.eval(step.script.script, len(keys), *keys, *args)
                waited = self._acks.queue_wait(pipe, batch[-1].keys[0])
                answers = await pipe.execute()
            if waited:
                await self._acks.check(batch[-1].keys[0], answers.pop())
            replies += answers
        return replies


def _over_caps(queued: int) -> QueueFull:
    """The queue scripts' refusal: 0 over the caller's caps, -1 over all callers'."""
    return QueueFull(QUEUE_FULL_FOR_ALL if queued == -1 else None)
