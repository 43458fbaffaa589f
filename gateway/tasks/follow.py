"""Following a task's events until it ends, for an SSE stream. Waiters that need only the end
(a `wait=N` submit, a sync call run as a task, a worker watching for a cancel) use the stores'
`outcome` and `ended`, which read no events."""

from __future__ import annotations

from collections.abc import AsyncGenerator

from gateway.tasks.models import TERMINAL, TaskEvent, TaskStore

# Between two looks at whether a quiet task still exists; events themselves come at once, on
# the store's wake-ups.
IDLE_S = 15.0


async def follow(
    store: TaskStore,
    task_id: str,
    after: str | None = None,
    *,
    first: list[TaskEvent] | None = None,
    idle_s: float = IDLE_S,
) -> AsyncGenerator[TaskEvent, None]:
    """The task's events after `after` as they happen, ending after the terminal one, or when
    the task is gone (expired) or was resumed after its last event. `first`: events already
    read after `after` (a caller that read them to validate `after`)."""
    events = first if first is not None else await store.events(task_id, after, idle_s)
    while True:
        for event in events:
            yield event
            after = event.id
            if event.task.status in TERMINAL:
                return
        if events:
            events = await store.events(task_id, after, idle_s)
            continue
        record = await store.get(task_id)
        if record is None:
            return  # expired
        # A task that ended between the read above and this look has its last event still
        # unread: read on without waiting, and end where there is none (resumed after it).
        ended = record.task.status in TERMINAL
        events = await store.events(task_id, after, 0 if ended else idle_s)
        if ended and not events:
            return
