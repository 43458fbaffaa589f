"""The event a task's end makes, shaped as OpenAI's webhook events are: `{"id": "evt_...",
"object": "event", "type": "task.completed", "created_at", "data": <the task object>}`.

`data` is the task object as `GET /v1/tasks/{id}` answers it (its `result_url` included),
without the signed links, which would expire long before a late retry: a task object never holds
the prompt, an image or a key.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Literal

import msgspec

from gateway.tasks.models import Task
from gateway.tasks.public import PublicTask, public


class TaskEndEvent(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    object: Literal["event"] = "event"
    type: str
    created_at: int
    data: PublicTask


_encode = msgspec.json.Encoder().encode


def event_id(task_id: str) -> str:
    """The id of the one event a task's end makes: the same on every replica and every try,
    without being stored, and not the task id itself."""
    digest = hashlib.sha256(f"task-end:{task_id}".encode()).digest()
    return "evt_" + base64.urlsafe_b64encode(digest[:18]).decode()


def event_body(task: Task, created_at: int) -> bytes:
    """The event of `task`'s end (a terminal task), as sent."""
    return _encode(
        TaskEndEvent(
            id=event_id(task.id),
            type=f"task.{task.status}",
            created_at=created_at,
            data=public(task),
        )
    )
