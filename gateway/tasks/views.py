"""The task API: the task, its result, its events (SSE), cancel; and what submitting shares."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing

import msgspec
from aiohttp import web
from aiohttp_sse import EventSourceResponse, sse_response
from multidict import CIMultiDict

from gateway.admission import HELD, TooManyConnections
from gateway.aio import until_set
from gateway.auth import AUTH
from gateway.errors import BadRequest, NotFound, StoreUnavailable, TaskCancelled
from gateway.headers import answer_headers
from gateway.metrics import METRICS
from gateway.tasks.follow import follow
from gateway.tasks.links import Signer
from gateway.tasks.models import (
    TERMINAL,
    RangedResponse,
    StoredResponse,
    Task,
    TaskEvent,
    TaskStore,
    is_event_id,
)
from gateway.tasks.prefer import parse_prefer
from gateway.tasks.results import CHUNK_BYTES, Opened, ResultStoreUnavailable
from gateway.tasks.service import TASKS

logger = logging.getLogger(__name__)

_HEARTBEAT_S = 15.0
# A client that stops reading its event stream is dropped after this, not buffered for.
_SEND_TIMEOUT_S = 30.0
_encode = msgspec.json.Encoder().encode
_GONE = "The call's answer is no longer kept."
_READERS = (
    "This API key is reading as many large task results at once as the gateway allows one "
    "key; retry shortly."
)


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


def task_response(task: Task, status: int = 200, sign: Signer | None = None) -> web.Response:
    headers = {} if task.status in TERMINAL else {"Retry-After": "1"}
    body = _encode(public(task, sign))
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


async def replay(
    request: web.Request, answer: StoredResponse, replayed: bool = False, *, kept: bool = False
) -> web.StreamResponse:
    """The stored answer exactly as the sync call would have returned it; a body kept in the
    results store is streamed from there, never whole in memory. Headers are final once it
    streams: say `replayed` here, not after. `kept`: read back from where it stays (`/result`):
    an error there is final, and asking again gets it again."""
    # Kept by an older gateway, or before key injection was turned on: checked again here.
    headers = answer_headers(CIMultiDict(answer.headers), request.app[AUTH].injects)
    headers.popall("Content-Length", None)
    if replayed:  # another request's answer (a run-once call found again)
        headers["Idempotent-Replayed"] = "true"
    if kept and answer.status >= 400:
        # The SDK would retry a kept 429 or 5xx for seconds, reading the same answer each time.
        headers["x-should-retry"] = "false"
    if not streamed(answer):
        return web.Response(status=answer.status, headers=headers, body=answer.body)
    async with _opened(request, answer) as opened:
        if opened is None:
            raise NotFound(_GONE)
        response = web.StreamResponse(status=answer.status, headers=headers)
        response.content_length = opened.size
        await response.prepare(request)
        await _send_kept(response, opened)
    return response


def streamed(answer: StoredResponse) -> bool:
    """Whether the answer is too large to hand to the socket whole: sent a chunk at a time,
    as the caller takes it."""
    return (
        isinstance(answer, RangedResponse)
        or answer.body_ref is not None
        or len(answer.body) > CHUNK_BYTES
    )


@contextlib.asynccontextmanager
async def _opened(request: web.Request, answer: StoredResponse) -> AsyncIterator[Opened | None]:
    """A large body from where it is: the task store's ranges, memory (the embedded store; a
    body written whole would be copied into the socket's buffer for each slow reader), or the
    results store."""
    if isinstance(answer, RangedResponse):
        async with aclosing(answer.chunks()) as chunks:
            yield Opened(answer.size, chunks)
    elif answer.body_ref is None:
        yield Opened(len(answer.body), _slices(answer.body))
    elif (results := request.app[TASKS].results) is None:
        yield None
    else:
        async with results.open(answer.body_ref) as opened:
            yield opened


async def _slices(body: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(body), CHUNK_BYTES):
        yield body[start : start + CHUNK_BYTES]


async def _send_kept(response: web.StreamResponse, opened: Opened) -> None:
    """A kept body, after its headers. Once it has started, an error answer would land inside
    it: a failure closes the connection short of the Content-Length instead, so the caller
    sees the answer cut, never completed."""
    try:
        async for chunk in opened.chunks:
            await response.write(chunk)
    except ConnectionError:
        raise  # the caller left: nothing to tell it
    except ResultStoreUnavailable as failure:
        logger.warning("kept answer failed mid-answer: %s", failure.__cause__ or failure)
        response.force_close()
    except Exception:
        logger.exception("kept answer failed mid-answer")
        response.force_close()
    else:
        await response.write_eof()


async def task_view(request: web.Request) -> web.StreamResponse:
    tasks = request.app[TASKS]
    return task_response((await tasks.visible(request)).task, sign=tasks.signer(request))


async def cancel_view(request: web.Request) -> web.StreamResponse:
    tasks = request.app[TASKS]
    record = await tasks.visible(request)
    task = await tasks.store.cancel(record.task.id)
    if task is not None and task.status == "cancelled" and record.task.status not in TERMINAL:
        metrics = request.app[METRICS]
        metrics.tasks(metrics.model_label(task.model), "cancelled").inc()
    return task_response(task or record.task, sign=tasks.signer(request))


# The longest a `Prefer: wait=N` on a result holds its caller: shorter than the idle cut of
# most load balancers in between (60 s on AWS ALB), so the caller sees an answer, not a drop.
_MAX_RESULT_WAIT_S = 50.0


async def result_view(request: web.Request) -> web.StreamResponse:
    """The task's answer; `202` and the task while it runs, or, with `Prefer: wait=N`, once
    it ends if that is within N seconds (at most 50)."""
    tasks = request.app[TASKS]
    record, answer = await tasks.visible_answer(request, by_link=True)
    task = record.task
    prefs = parse_prefer(request.headers.getall("Prefer", ()))
    if task.status not in TERMINAL and prefs.wait_s:  # else its answer came with it
        wait_s = min(prefs.wait_s, _MAX_RESULT_WAIT_S)
        if (ended := await held_outcome(request, task.id, wait_s)) is not None:
            task, answer = ended
    if task.status == "cancelled":
        raise TaskCancelled()
    if answer is None:
        return task_response(task, status=202, sign=tasks.signer(request))
    if not streamed(answer):
        return await replay(request, answer, kept=True)
    # A large answer read slowly holds its connection and a chunk of memory meanwhile.
    with request.app[HELD].reading.hold(record.owner, _READERS):
        return await replay(request, answer, kept=True)


async def held_outcome(
    request: web.Request, task_id: str, wait_s: float, *, submitted: bool = False
) -> tuple[Task, StoredResponse | None] | None:
    """The task's end within `wait_s` (`TaskStore.outcome`), the caller's connection counted
    among those it holds open meanwhile: past its cap, 429 at once. A task just `submitted`
    is not waited for instead (its 202 at once): a 429 would have its caller submit, and pay,
    again."""
    tasks = request.app[TASKS]
    try:
        with request.app[HELD].waiting.hold(await tasks.owner(request)):
            return await tasks.store.outcome(task_id, wait_s)
    except TooManyConnections:
        if submitted:
            return None
        raise


async def events_view(request: web.Request) -> web.StreamResponse:
    """One event per status change; `Last-Event-ID` resumes; the stream ends after the last,
    or when this replica shuts down (the client resumes elsewhere with its Last-Event-ID)."""
    tasks = request.app[TASKS]
    record = await tasks.visible(request, by_link=True)
    task_id = record.task.id
    after = request.headers.get("Last-Event-ID") or None
    if after is not None and not is_event_id(after):
        raise BadRequest("Last-Event-ID is not an event id.")
    try:
        first = await tasks.store.events(task_id, after, 0)
    except ValueError:
        raise BadRequest("Last-Event-ID is not an event of this task.") from None
    with request.app[HELD].waiting.hold(record.owner):
        return await _send_events(request, task_id, after, first)


async def _send_events(
    request: web.Request, task_id: str, after: str | None, first: list[TaskEvent]
) -> web.StreamResponse:
    tasks = request.app[TASKS]
    clients = request.app[METRICS].sse_clients
    async with sse_response(
        request, ping_interval=_HEARTBEAT_S, send_timeout=_SEND_TIMEOUT_S
    ) as sse:
        clients.inc()
        try:
            # This replica shutting down ends the stream; the client resumes elsewhere.
            await until_set(tasks.closing, _stream(tasks.store, task_id, after, first, sse))
        except (StoreUnavailable, ConnectionError):
            await _end_early(sse, "the task store is unreachable")
        except Exception:
            # The response has started: an error answer would be a second response inside
            # this one. End the stream instead, so the client resumes with Last-Event-ID.
            logger.exception("%s event stream failed", task_id)
            await _end_early(sse, "the gateway failed")
        finally:
            clients.dec()
    return sse


async def _end_early(sse: EventSourceResponse, why: str) -> None:
    """A last comment saying why, then the end of the stream (EventSource reconnects)."""
    with contextlib.suppress(ConnectionError):
        await sse.write(f": {why}; resume with Last-Event-ID\r\n\r\n".encode())


async def _stream(
    store: TaskStore,
    task_id: str,
    after: str | None,
    first: list[TaskEvent],
    sse: EventSourceResponse,
) -> None:
    """Events until the terminal one or the task's expiry."""
    async with aclosing(follow(store, task_id, after, first=first)) as events:
        async for event in events:
            data = _encode(public(event.task)).decode()
            await sse.send(data, id=event.id, event=event.task.status)
