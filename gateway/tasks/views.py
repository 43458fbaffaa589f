"""Async tasks over HTTP: submit (202 Accepted), the task, its result, its events (SSE), cancel."""

from __future__ import annotations

import asyncio
import time

import msgspec
from aiohttp import web
from aiohttp_sse import EventSourceResponse, sse_response
from multidict import CIMultiDict

from gateway.accesslog import Call
from gateway.aio import unless
from gateway.auth import AUTH
from gateway.config import CONFIG, Config
from gateway.errors import BadRequest, BodyTooLarge, TaskCancelled, renders_errors
from gateway.headers import caller_timeout_s, header_pairs, strip_hop_by_hop
from gateway.metrics import METRICS
from gateway.sniff import model_from_body, model_from_path
from gateway.tasks.models import TERMINAL, Job, StoredResponse, Task, TaskRecord, TaskStore
from gateway.tasks.prefer import Preferences
from gateway.tasks.service import TASKS, TaskService, new_task_id

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


async def _read_body(request: web.Request) -> bytes:
    """The whole body, which the task must keep: parsed enough to refuse what cannot work."""
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BodyTooLarge() from None
    mime, _, params = request.headers.get("Content-Type", "").partition(";")
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
    return body


async def wait_terminal(store: TaskStore, task_id: str, within_s: float) -> Task | None:
    """The task once it has ended, or None if it is still running after `within_s`."""
    loop = asyncio.get_running_loop()
    deadline, after = loop.time() + within_s, None
    while (left := deadline - loop.time()) > 0:
        events = await store.events(task_id, after, left)
        if events:
            after = events[-1].id
            if events[-1].task.status in TERMINAL:
                return events[-1].task
    return None


async def submit(request: web.Request, call: Call, prefs: Preferences) -> web.StreamResponse:
    config: Config = request.app[CONFIG]
    tasks = request.app[TASKS]
    headers = strip_hop_by_hop(request.headers)
    request.app[AUTH].apply(headers)
    headers.popall("Prefer", None)  # addressed to the gateway, not the upstream
    owner = tasks.owner(request.headers)
    limit_s = caller_timeout_s(request.headers)
    body = await _read_body(request)
    call.bytes_in = len(body)
    call.model = model_from_path(request.path) or model_from_body(
        request.headers.get("Content-Type", ""), body
    )
    task = Task(id=new_task_id(), status="queued", model=call.model, created_at=int(time.time()))
    job = Job(
        method=request.method,
        path_qs=request.raw_path,
        headers=header_pairs(headers),
        body=body,
        deadline_s=min(config.timeouts.for_model(call.model), limit_s),
        limits=config.tasks.limits(call.model, tasks.upstream_credential(headers)),
    )
    await tasks.store.create(TaskRecord(task=task, owner=owner, submitted_at=time.time()), job)
    if prefs.wait_s:
        ended = await wait_terminal(tasks.store, task.id, prefs.wait_s)
        if ended is not None and (answer := await tasks.store.result(task.id)) is not None:
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


@renders_errors
async def task_view(request: web.Request) -> web.StreamResponse:
    return _task_response((await request.app[TASKS].visible(request)).task)


@renders_errors
async def cancel_view(request: web.Request) -> web.StreamResponse:
    tasks = request.app[TASKS]
    record = await tasks.visible(request)
    task = await tasks.store.cancel(record.task.id)
    if task is not None and task.status == "cancelled" and record.task.status not in TERMINAL:
        metrics = request.app[METRICS]
        metrics.tasks(metrics.model_label(task.model), "cancelled").inc()
    return _task_response(task or record.task)


@renders_errors
async def result_view(request: web.Request) -> web.StreamResponse:
    tasks = request.app[TASKS]
    task = (await tasks.visible(request)).task
    if task.status == "cancelled":
        raise TaskCancelled()
    answer = await tasks.store.result(task.id) if task.status in TERMINAL else None
    return replay(answer) if answer is not None else _task_response(task, status=202)


@renders_errors
async def events_view(request: web.Request) -> web.StreamResponse:
    """One event per status change; `Last-Event-ID` resumes; the stream ends after the last,
    or when this replica shuts down (the client resumes elsewhere with its Last-Event-ID)."""
    tasks = request.app[TASKS]
    task_id = (await tasks.visible(request)).task.id
    after = request.headers.get("Last-Event-ID") or None
    try:
        await tasks.store.events(task_id, after, 0)
    except ValueError:
        raise BadRequest("Last-Event-ID is not an event of this task.") from None
    clients = request.app[METRICS].sse_clients
    async with sse_response(request, ping_interval=_HEARTBEAT_S) as sse:
        clients.inc()
        try:
            await _stream(tasks, task_id, after, sse)
        finally:
            clients.dec()
    return sse


async def _stream(
    tasks: TaskService, task_id: str, after: str | None, sse: EventSourceResponse
) -> None:
    """Events until the terminal one, the task's expiry, or this replica's shutdown."""
    while True:
        events = await unless(tasks.closing, tasks.store.events(task_id, after, _HEARTBEAT_S))
        if events is None:
            break
        for event in events:
            await sse.send(_encode(event.task).decode(), id=event.id, event=event.task.status)
            after = event.id
        if events and events[-1].task.status in TERMINAL:
            break
        if not events:
            record = await tasks.store.get(task_id)
            if record is None or record.task.status in TERMINAL:
                break  # resumed after the last event, or expired while watched
