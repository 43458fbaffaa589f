"""A task as callers see it: in answers, event streams and webhooks alike."""

from __future__ import annotations

import msgspec

from gateway.tasks.links import Signer
from gateway.tasks.models import Task


class PublicTask(Task, frozen=True, kw_only=True):
    """A task as callers see it: with the paths of what they do next, so a client that got it
    (from a 202, say) needs no URL scheme of its own. Absolute paths: a base URL ending in /v1
    would double its /v1 with a relative one."""

    url: str
    events_url: str
    result_url: str
    # The same, working without any header until their `exp` (for a browser's EventSource).
    signed_events_url: str | None = None
    signed_result_url: str | None = None


def public(task: Task, sign: Signer | None = None) -> PublicTask:
    path = f"/v1/tasks/{task.id}"
    events, result = f"{path}/events", f"{path}/result"
    return PublicTask(
        **msgspec.structs.asdict(task),
        url=path,
        events_url=events,
        result_url=result,
        signed_events_url=sign(events) if sign else None,
        signed_result_url=sign(result) if sign else None,
    )
