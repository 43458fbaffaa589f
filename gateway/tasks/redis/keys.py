"""Every Redis key the task store uses, in one table.

A task's keys share its hash tag `{task id}`, so each of its transitions is one Lua script on
one Redis Cluster slot; the concurrency slots share `{slots}`, so taking several is one atomic
step, and the outbox's keys `{outbox}`. Everything else is a key of its own.
"""

from __future__ import annotations


class Keys:
    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        # A stream with a consumer group: the work waiting for a worker or running.
        self.queue = f"{prefix}:{{queue}}"
        # A sorted set: leases of the tasks run by the replica holding their caller (no entry in
        # the queue while they run), so a dead replica's are found; the queue's slot.
        self.here = f"{prefix}:{{queue}}:here"
        # The fair queue (`lua/fair.lua`): a sorted set of waiting tasks by start tag, and a
        # hash of the tag last served, each caller's last tag and what each has waiting.
        self.order = f"{prefix}:{{queue}}:order"
        self.fair = f"{prefix}:{{queue}}:fair"
        # Pub/sub: a task's id, published when it changes (a wake-up; its events are the record).
        self.wake = f"{prefix}:wake"
        # The key that owner hashes are made with, shared by every replica.
        self.owner_key = f"{prefix}:owner-key"
        # Task ends to announce (webhooks): a sorted set of task ids by when due (a lease's end
        # while one is delivered), and a hash of each one's failed deliveries, client and event.
        self.outbox = f"{prefix}:{{outbox}}"
        self.outbox_state = f"{prefix}:{{outbox}}:state"

    def task(self, task_id: str) -> str:
        """A hash: `status`, `attempt`, `entry` (its queue entry while it runs), `error`, and
        `record` (the task as created: what never changes)."""
        return f"{self._prefix}:{{{task_id}}}:task"

    def job(self, task_id: str) -> str:
        """The upstream request to make, credential included; deleted when the task ends."""
        return f"{self._prefix}:{{{task_id}}}:job"

    def result(self, task_id: str) -> str:
        return f"{self._prefix}:{{{task_id}}}:result"

    def events(self, task_id: str) -> str:
        """A list: one entry per status change; an event's SSE id is its place in it (1, 2, 3)."""
        return f"{self._prefix}:{{{task_id}}}:events"

    def slot(self, name: str) -> str:
        """A sorted set of the tasks holding a concurrency slot, scored by lease expiry."""
        return f"{self._prefix}:{{slots}}:{name}"

    def once(self, name: str) -> str:
        """A run-once call's name: the task it made (and the request's fingerprint)."""
        return f"{self._prefix}:{{once:{name}}}"
