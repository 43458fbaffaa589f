"""Async tasks over HTTP: submit (202 Accepted), the task, its result, its events (SSE), cancel."""

from __future__ import annotations

import asyncio
import hmac
import time
from contextlib import aclosing

import msgspec
from aiohttp import web
from aiohttp_sse import EventSourceResponse, sse_response
from multidict import CIMultiDict

from gateway.accesslog import RequestContext
from gateway.aio import until_set
from gateway.auth import AUTH
from gateway.config import CONFIG, Config
from gateway.errors import (
    BadRequest,
    IdempotencyMismatch,
    NotFound,
    TaskCancelled,
    UpstreamTimeout,
)
from gateway.headers import header_pairs, strip_hop_by_hop
from gateway.metrics import METRICS
from gateway.tasks.follow import follow
from gateway.tasks.idempotency import RunOnce, fingerprint
from gateway.tasks.models import (
    TERMINAL,
    Job,
    OnceName,
    StoredResponse,
    Task,
    TaskEvent,
    TaskRecord,
    TaskStore,
    is_event_id,
)
from gateway.tasks.prefer import Preferences
from gateway.tasks.service import TASKS, new_task_id

# The generation endpoints a caller may run as a task (contract: "Async tasks").
ASYNC_ROUTES = frozenset(
    (
        "/v1/images/generations",
        "/v1/images/edits",
        "/v1/images/variations",
        "/v1/chat/completions",
        "/v1beta/models/{model}:generateContent",
    )
)
_HEARTBEAT_S = 15.0
# A client that stops reading its event stream is dropped after this, not buffered for.
_SEND_TIMEOUT_S = 30.0
# A sync task call waits as long as its caller does: the caller's own timeout decides.
_SYNC_WAIT_S = 24 * 3600.0
# A caller deadline shorter than this cannot run a generation; refused at submit.
_MIN_TASK_DEADLINE_S = 1.0
_encode = msgspec.json.Encoder().encode


def _task_response(task: Task, status: int = 200) -> web.Response:
    headers = {} if task.status in TERMINAL else {"Retry-After": "1"}
    return web.Response(
        status=status, body=_encode(task), content_type="application/json", headers=headers
    )


def replay(answer: StoredResponse) -> web.Response:
    """The stored answer exactly as the sync call would have returned it."""
    headers = CIMultiDict(answer.headers)
    headers.popall("Content-Length", None)
    return web.Response(status=answer.status, headers=headers, body=answer.body)


def _check_body(content_type: str, body: bytes) -> None:
    """Refuse a body the task must keep but that cannot work: truncated JSON or multipart."""
    mime, _, params = content_type.partition(";")
    mime = mime.strip().lower()
    if mime == "application/json":
        try:
            valid = isinstance(msgspec.json.decode(body), dict)
        except msgspec.DecodeError:
            valid = False
        if not valid:
            raise BadRequest("The request body is not a JSON object.")
    elif mime == "multipart/form-data":
        boundary = next(
            (
                v.strip().strip('"')
                for k, _, v in (p.partition("=") for p in params.split(";"))
                if k.strip().lower() == "boundary"
            ),
            "",
        )
        if not boundary or not body.rstrip().endswith(b"--" + boundary.encode() + b"--"):
            raise BadRequest("The multipart body is malformed or truncated.")


async def wait_terminal(store: TaskStore, task_id: str, within_s: float) -> Task | None:
    """The task once it has ended, or None if it is still running after `within_s`."""
    try:
        async with asyncio.timeout(within_s), aclosing(follow(store, task_id)) as events:
            async for event in events:
                if event.task.status in TERMINAL:
                    return event.task
    except TimeoutError:
        pass
    return None


async def submit(
    request: web.Request,
    ctx: RequestContext,
    target: str,
    body: bytes,
    prefs: Preferences | None,
    once: RunOnce | None,
) -> web.StreamResponse:
    """Run the call as a task: answer 202 at once (`Prefer: respond-async`), or wait for its end
    and answer as the sync call would have (a keyed or SDK call, which must run only once)."""
    config: Config = request.app[CONFIG]
    tasks = request.app[TASKS]
    if ctx.caller_limit_s < _MIN_TASK_DEADLINE_S:
        raise BadRequest(
            f"X-Request-Timeout under {_MIN_TASK_DEADLINE_S:g} s leaves a task no time to run."
        )
    owner = tasks.owner(request)
    _check_body(request.headers.get("Content-Type", ""), body)
    job = _job(request, ctx, target, body, owner)
    task = Task(id=new_task_id(), status="queued", model=ctx.model, created_at=int(time.time()))
    # A sync SDK call's answer is kept only as long as its retries can come for it.
    kept_s = config.idempotency.sdk_window_s if once and once.key is None else None
    record = TaskRecord(task=task, owner=owner, submitted_at=time.time())
    found = None
    if once is None:
        await tasks.store.create(record, job, kept_s)
    else:
        found = await _find_or_create(tasks.store, config, once, record, job, kept_s)
    task = found or task
    if prefs is not None and prefs.respond_async:
        response = await _accepted(tasks.store, task, prefs.wait_s)
    else:
        response = await _answer(tasks.store, task.id, _SYNC_WAIT_S)
    if found is not None:
        response.headers["Idempotent-Replayed"] = "true"
    return response


def _job(request: web.Request, ctx: RequestContext, target: str, body: bytes, owner: str) -> Job:
    """The upstream call to make, as the caller asked for it. With key injection it holds no
    credential (the worker adds the gateway's key when it sends); in passthrough the caller's
    key is the call's own and goes when the task ends."""
    config: Config = request.app[CONFIG]
    auth = request.app[AUTH]
    headers = strip_hop_by_hop(request.headers)
    auth.strip_credentials(headers)
    headers.popall("Prefer", None)  # addressed to the gateway, not the upstream
    headers["X-Request-ID"] = ctx.request_id
    return Job(
        method=request.method,
        path_qs=auth.upstream_target(target),
        headers=header_pairs(headers),
        body=body,
        deadline_s=min(config.timeouts.for_model(ctx.model), ctx.caller_limit_s),
        limits=config.tasks.limits(
            ctx.model,
            request.app[TASKS].upstream_credential(request),
            owner,
            config.upstream.per_credential,
        ),
    )


async def _find_or_create(
    store: TaskStore,
    config: Config,
    once: RunOnce,
    record: TaskRecord,
    job: Job,
    kept_s: float | None,
) -> Task | None:
    """The task an earlier request of this call made, if any; else this one, created."""
    request_print = fingerprint(job.method, job.path_qs, record.owner, job.body)
    name = once.name(record.owner, request_print)
    if once.key is not None:
        value = f"{request_print} {record.task.id}"
        held = OnceName(name, value, config.idempotency.retention_s)
    else:
        # The SDK's first attempt is a new generation (a user may re-roll a prompt on purpose);
        # only its retries attach.
        held = OnceName(
            name, record.task.id, config.idempotency.sdk_window_s, replace=once.sdk_retry == 0
        )
    found = await store.find_or_create(record, job, kept_s, held)
    if found is None:
        return None
    found_print, _, found_id = found.rpartition(" ")
    if once.key is not None and not hmac.compare_digest(found_print, request_print):
        raise IdempotencyMismatch()
    earlier = await store.get(found_id)
    if earlier is None:
        raise NotFound("The call's answer is no longer kept.")
    return earlier.task


async def _accepted(store: TaskStore, task: Task, wait_s: float | None) -> web.Response:
    """202 with the task, or the ordinary answer if it ends within `wait_s`."""
    if wait_s:
        ended = await wait_terminal(store, task.id, wait_s)
        if ended is not None and (answer := await store.result(task.id)) is not None:
            return replay(answer)
    response = _task_response(task, status=202)
    response.headers.update(
        {
            "Location": f"/v1/tasks/{task.id}",
            "Preference-Applied": "respond-async",
            "Vary": "Prefer",
        }
    )
    return response


async def _answer(store: TaskStore, task_id: str, within_s: float) -> web.Response:
    """The task's answer as the sync call would have returned it, once it has one. A caller
    that leaves meanwhile leaves the task running: its retry comes for the answer."""
    ended = await wait_terminal(store, task_id, within_s)
    if ended is None:
        raise UpstreamTimeout()
    if ended.status == "cancelled":
        raise TaskCancelled()
    answer = await store.result(task_id)
    if answer is None:
        raise NotFound("The call's answer is no longer kept.")
    return replay(answer)


async def task_view(request: web.Request) -> web.StreamResponse:
    return _task_response((await request.app[TASKS].visible(request)).task)


async def cancel_view(request: web.Request) -> web.StreamResponse:
    tasks = request.app[TASKS]
    record = await tasks.visible(request)
    task = await tasks.store.cancel(record.task.id)
    if task is not None and task.status == "cancelled" and record.task.status not in TERMINAL:
        metrics = request.app[METRICS]
        metrics.tasks(metrics.model_label(task.model), "cancelled").inc()
    return _task_response(task or record.task)


async def result_view(request: web.Request) -> web.StreamResponse:
    tasks = request.app[TASKS]
    task = (await tasks.visible(request)).task
    if task.status == "cancelled":
        raise TaskCancelled()
    answer = await tasks.store.result(task.id) if task.status in TERMINAL else None
    return replay(answer) if answer is not None else _task_response(task, status=202)


async def events_view(request: web.Request) -> web.StreamResponse:
    """One event per status change; `Last-Event-ID` resumes; the stream ends after the last,
    or when this replica shuts down (the client resumes elsewhere with its Last-Event-ID)."""
    tasks = request.app[TASKS]
    task_id = (await tasks.visible(request)).task.id
    after = request.headers.get("Last-Event-ID") or None
    if after is not None and not is_event_id(after):
        raise BadRequest("Last-Event-ID is not an event id.")
    try:
        first = await tasks.store.events(task_id, after, 0)
    except ValueError:
        raise BadRequest("Last-Event-ID is not an event of this task.") from None
    clients = request.app[METRICS].sse_clients
    async with sse_response(
        request, ping_interval=_HEARTBEAT_S, send_timeout=_SEND_TIMEOUT_S
    ) as sse:
        clients.inc()
        try:
            # This replica shutting down ends the stream; the client resumes elsewhere.
            await until_set(tasks.closing, _stream(tasks.store, task_id, after, first, sse))
        finally:
            clients.dec()
    return sse


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
            await sse.send(_encode(event.task).decode(), id=event.id, event=event.task.status)
