"""A task's upstream call: made and measured as the pass-through makes its own, its answer
read whole (up to `tasks.result_max_bytes`) and kept as the sync call would have returned it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from gateway.admission import Admission
from gateway.auth import Auth
from gateway.errors import GatewayError, ResultTooLarge
from gateway.headers import answer_headers, header_pairs
from gateway.tasks.models import Job, StoredResponse, Task, TaskError
from gateway.tasks.results import Results, ResultUnreadable
from gateway.upstream import Payload, Upstream

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


class RequestBodyLost(GatewayError):
    """A task's request body, kept in the results store, could not be read: nothing reached
    the upstream whole, so nothing was generated."""

    status = 503
    code = "request_body_unavailable"
    should_retry = True
    retry_after_s = 5
    default_message = (
        "The task's request body could not be read from the results store; nothing was "
        "generated. Submit the call again."
    )


class TaskCall:
    def __init__(
        self,
        upstream: Upstream,
        auth: Auth,
        admission: Admission | None,
        result_max_bytes: int,
        results: Results | None,
    ) -> None:
        self._upstream = upstream
        self._auth = auth
        self._admission = admission
        self._result_max_bytes = result_max_bytes
        self._results = results

    async def __call__(
        self,
        job: Job,
        task: Task,
        credential: str | None,
        timed: Callable[[float], None] | None = None,
    ) -> Outcome:
        """The upstream call. `credential`: a sync call run here, under its caller's limits;
        `timed` is told the upstream's time (send to last byte) for that caller's access line."""
        headers = CIMultiDict(job.headers)
        self._auth.upstream_headers(headers)
        deadline = asyncio.get_running_loop().time() + job.deadline_s
        try:
            async with (
                self._admitted(task.model, credential, deadline),
                self._payload(job, headers) as payload,
                self._upstream.call(
                    job.method,
                    job.path_qs,
                    headers,
                    payload,
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
        if timed is not None:
            timed(exchange.seconds)
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
    async def _payload(self, job: Job, headers: CIMultiDict[str]) -> AsyncIterator[Payload]:
        """The body as sent: in hand, or read from the results store a chunk at a time. It is
        opened before the call, so a body that is gone fails the task with nothing sent (a
        body failing inside the send would look like a broken, billed call)."""
        if job.body_ref is None:
            yield job.body
            return
        async with contextlib.AsyncExitStack() as stack:
            try:
                if self._results is None:  # a replica without the results store took it
                    raise ResultUnreadable()
                opened = await stack.enter_async_context(self._results.open(job.body_ref))
            except ResultUnreadable as exc:
                raise RequestBodyLost() from exc
            if opened is None:
                raise RequestBodyLost()
            headers["Content-Length"] = str(opened.size)
            # A connect that fails reads none of it, so a retry sends it from its start.
            yield lambda: opened.chunks

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
