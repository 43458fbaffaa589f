"""The task subsystem's state for one app: its store, and whose tasks are whose."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from aiohttp import web
from multidict import MultiMapping

from gateway.auth import presented_key
from gateway.errors import NotFound, Unauthorized
from gateway.tasks.models import TaskRecord, TaskStore


class TaskService:
    def __init__(self, store: TaskStore) -> None:
        self.store = store
        # Owners are keyed hashes, so a store dump reveals no credential. The embedded store's
        # tasks die with the process, so a per-process key is enough there.
        self._owner_key = secrets.token_bytes(32)

    def owner(self, headers: MultiMapping[str]) -> str:
        key = presented_key(headers)
        if key is None:
            raise Unauthorized("Async tasks belong to a credential: send an API key.")
        return hmac.new(self._owner_key, key.encode(), hashlib.sha256).hexdigest()

    async def visible(self, request: web.Request) -> TaskRecord:
        """The task named in the path, if the caller's credential made it; 404 otherwise, so
        another tenant cannot even learn that it exists."""
        record = await self.store.get(request.match_info["task_id"])
        if record is None or not hmac.compare_digest(record.owner, self.owner(request.headers)):
            raise NotFound("No such task.")
        return record


TASKS = web.AppKey("tasks", TaskService)


def new_task_id() -> str:
    return "task_" + secrets.token_urlsafe(16)  # 128 random bits
