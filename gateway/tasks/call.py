"""A task's upstream call: made and measured as the pass-through makes its own, its answer
read whole (up to `tasks.result_max_bytes`) and kept as the sync call would have returned it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from gateway.admission import Admission
from gateway.auth import Auth
from gateway.errors import GatewayError, ResultTooLarge
from gateway.headers import answer_headers, header_pairs
from gateway.tasks.models import Job, StoredResponse, Task, TaskError
from gateway.upstream import Upstream

logger = logging.getLogger(__name__)

# An upstream answer, and the task's error when the call failed or the upstream refused it.
Outcome = tuple[StoredResponse, TaskError | None]


def stored(response: web.Response) -> StoredResponse:
    """A response the gateway made, kept so that a task replays it as the sync call would."""
    body = response.body
    assert isinstance(body, bytes)
    return StoredResponse(status=response.status, headers=header_pairs(response.headers), body=body)


def failed(failure: GatewayError) -> Outcome:
    """A task's outcome when the gateway itself failed its call: its error response, kept."""
    return stored(failure.response()), TaskError(failure.message, failure.type, failure.code)


class TaskCall:
    def __init__(
        self, upstream: Upstream, auth: Auth, admission: Admission | None, result_max_bytes: int
    ) -> None:
        self._upstream = upstream
        self._auth = auth
        self._admission = admission
        self._result_max_bytes = result_max_bytes

    async def __call__(self, job: Job, task: Task, credential: str | None) -> Outcome:
        """The upstream call. `credential`: a sync call run here, under its caller's limits."""
        headers = CIMultiDict(job.headers)
        self._auth.upstream_headers(headers)
        deadline = asyncio.get_running_loop().time() + job.deadline_s
        try:
            async with (
                self._admitted(task.model, credential, deadline),
                self._upstream.call(
                    job.method,
                    job.path_qs,
                    headers,
                    job.body,
                    deadline=deadline,
                    model=task.model,
                    log_id=task.id,
                ) as exchange,
            ):
                up = exchange.response
                body = await _read(up, self._result_max_bytes)
        except GatewayError as failure:
            logger.warning("%s failed: %s", task.id, failure.code)
            return failed(failure)
        answer = StoredResponse(
            status=up.status,
            headers=header_pairs(answer_headers(up.headers, self._auth.injects)),
            body=body,
        )
        if up.status < 400:
            return answer, None
        return answer, TaskError(
            f"The upstream answered {up.status}.", "upstream_error", str(up.status)
        )

    @contextlib.asynccontextmanager
    async def _admitted(
        self, model: str | None, credential: str | None, deadline: float
    ) -> AsyncIterator[None]:
        """A call run here meets the limits a plain call of its caller meets, and only those;
        a queued task's limits are its store slots, taken when it was claimed."""
        if credential is None or self._admission is None:
            yield
            return
        with self._admission.credential_slot(credential):
            async with self._admission.slot(model, credential, deadline):
                yield


async def _read(up: aiohttp.ClientResponse, limit: int) -> bytes:
    if up.content_length is not None and up.content_length > limit:
        raise ResultTooLarge(f"The upstream's answer is larger than {limit} bytes.")
    body = bytearray()
    async for chunk in up.content.iter_any():
        body += chunk
        if len(body) > limit:
            raise ResultTooLarge(f"The upstream's answer is larger than {limit} bytes.")
    return bytes(body)
