"""The task API: the task, its result, its events (SSE), cancel."""

from __future__ import annotations

import contextlib
import logging
from contextlib import aclosing

import msgspec
from aiohttp import web
from aiohttp_sse import EventSourceResponse, sse_response

from gateway.admission import HELD, TooManyConnections
from gateway.aio import until_set
from gateway.auth import AUTH
from gateway.config import CONFIG
from gateway.edge.replay import replay, streamed
from gateway.errors import BadRequest, StoreUnavailable, TaskCancelled
from gateway.metrics import METRICS
from gateway.tasks import links
from gateway.tasks.follow import follow
from gateway.tasks.links import Signer
from gateway.tasks.models import (
    TERMINAL,
    StoredResponse,
    Task,
    TaskEvent,
    TaskRecord,
    TaskStore,
    is_event_id,
)
from gateway.tasks.prefer import parse_prefer
from gateway.tasks.public import public
from gateway.tasks.service import TASKS
from gateway.usage.meter import USAGE

logger = logging.getLogger(__name__)

# The owner of the task a signed link opened: whose caps its connections count against.
_LINK_OWNER = web.RequestKey("link_owner", str)

_HEARTBEAT_S = 15.0
# A client that stops reading its event stream is dropped after this, not buffered for.
_SEND_TIMEOUT_S = 30.0
_encode = msgspec.json.Encoder().encode
_READERS = (
    "This API key is reading as many large task results at once as the gateway allows one "
    "key; retry shortly."
)


def task_response(task: Task, status: int = 200, sign: Signer | None = None) -> web.Response:
    headers = {} if task.status in TERMINAL else {"Retry-After": "1"}
    body = _encode(public(task, sign))
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


async def _visible(
    request: web.Request, *, with_answer: bool = False, by_link: bool = False
) -> tuple[TaskRecord, StoredResponse | None]:
    """The task named in the path, if the caller's credential made it or (`by_link`) the
    request carries a signed link of this path; 404 otherwise."""
    tasks, task_id = request.app[TASKS], request.match_info["task_id"]
    if by_link and links.is_signed(request.query):
        got = await tasks.linked(request.path, request.query, task_id, with_answer=with_answer)
        request[_LINK_OWNER] = got[0].owner
        return got
    caller = request.app[AUTH].caller_key(request)
    return await tasks.visible(caller, task_id, with_answer=with_answer)


def signer(request: web.Request) -> Signer | None:
    """What signs the links of a task object answered to `request`: none to a request that
    came by a signed link, whose links would otherwise outlive it."""
    return None if _LINK_OWNER in request else request.app[TASKS].signer()


async def task_view(request: web.Request) -> web.StreamResponse:
    return task_response((await _visible(request))[0].task, sign=signer(request))


async def cancel_view(request: web.Request) -> web.StreamResponse:
    tasks = request.app[TASKS]
    record, _ = await _visible(request)
    task = await tasks.store.cancel(record.task.id)
    if task is not None and task.status == "cancelled" and record.task.status not in TERMINAL:
        metrics = request.app[METRICS]
        metrics.tasks(metrics.model_label(task.model), "cancelled").inc()
        if record.task.status == "queued" and record.ask is not None:
            # No worker will end it: its budget hold goes now (settled once, as a worker's
            # end would be, should one have claimed it meanwhile).
            retention_s = request.app[CONFIG].tasks.retention_s
            request.app[USAGE].settle_soon(
                record.client, record.ask, record.task.id, None, retention_s
            )
    return task_response(task or record.task, sign=signer(request))


# The longest a `Prefer: wait=N` on a result holds its caller: shorter than the idle cut of
# most load balancers in between (60 s on AWS ALB), so the caller sees an answer, not a drop.
_MAX_RESULT_WAIT_S = 50.0


async def result_view(request: web.Request) -> web.StreamResponse:
    """The task's answer; `202` and the task while it runs, or, with `Prefer: wait=N`, once
    it ends if that is within N seconds (at most 50)."""
    record, answer = await _visible(request, with_answer=True, by_link=True)
    task = record.task
    prefs = parse_prefer(request.headers.getall("Prefer", ()))
    if task.status not in TERMINAL and prefs.wait_s:  # else its answer came with it
        wait_s = min(prefs.wait_s, _MAX_RESULT_WAIT_S)
        if (ended := await held_outcome(request, task.id, wait_s)) is not None:
            task, answer = ended
    if task.status == "cancelled":
        raise TaskCancelled()
    if answer is None:
        return task_response(task, status=202, sign=signer(request))
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
    owner = request.get(_LINK_OWNER) or await tasks.owner(request.app[AUTH].caller_key(request))
    try:
        with request.app[HELD].waiting.hold(owner):
            return await tasks.store.outcome(task_id, wait_s)
    except TooManyConnections:
        if submitted:
            return None
        raise


async def events_view(request: web.Request) -> web.StreamResponse:
    """One event per status change; `Last-Event-ID` resumes; the stream ends after the last,
    or when this replica shuts down (the client resumes elsewhere with its Last-Event-ID)."""
    tasks = request.app[TASKS]
    record, _ = await _visible(request, by_link=True)
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
