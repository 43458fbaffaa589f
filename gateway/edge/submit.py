"""A call run as a task: async (`Prefer: respond-async`, answered 202 at once), or sync but run
once (an `Idempotency-Key`, or the OpenAI SDK's retries).

A sync call that runs once is run by this replica, the one holding its caller, under the limits
a plain call meets: the task is only what lets a retry attach to it. Its outcome is kept for
retries only where the upstream ran (`kept_for_retries`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import mmap
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec
from aiohttp import web

from gateway.auth import AUTH
from gateway.config import CONFIG, Config
from gateway.context import RequestContext
from gateway.edge.replay import GONE, replay
from gateway.edge.task_api import held_outcome, signer, task_response
from gateway.errors import (
    BadRequest,
    IdempotencyMismatch,
    NotFound,
    StoreUnavailable,
    TaskCancelled,
    UpstreamTimeout,
)
from gateway.headers import header_pairs, strip_hop_by_hop
from gateway.logsafe import OncePer
from gateway.metrics import METRICS
from gateway.tasks.idempotency import RunOnce, fingerprint, kept_for_retries
from gateway.tasks.models import Claim, Job, OnceName, Status, Task, TaskRecord, TaskStore
from gateway.tasks.prefer import Preferences
from gateway.tasks.results import Results
from gateway.tasks.service import TASKS, new_task_id
from gateway.tasks.submission import Submission, create_task, readable
from gateway.tasks.worker import WORKER_POOL
from gateway.uploads import Body, SpooledBody
from gateway.usage.ask import Ask
from gateway.usage.meter import USAGE

logger = logging.getLogger(__name__)

# The generation endpoints a caller may run as a task (contract: "Async tasks").
ASYNC_ROUTES = frozenset(
    (
        "/v1/images/generations",
        "/v1/images/edits",
        "/v1/images/variations",
        "/v1/chat/completions",
        "/v1beta/models/{model}:generateContent",
        "/v1/models/{model}:generateContent",
    )
)
# A sync task call waits as long as its caller does: the caller's own timeout decides.
_SYNC_WAIT_S = 24 * 3600.0
# A caller deadline shorter than this cannot run a generation; refused at submit.
_MIN_TASK_DEADLINE_S = 1.0
# Runs of one sync call at most: each after an outcome that was not kept (a 429, a 503) that a
# racing request of the same call ran.
_MAX_RUNS = 3
_store_down_said = OncePer(60.0)
# A multipart body must end with its close delimiter: whitespace after it is looked past this far.
_MULTIPART_TAIL = 64 * 1024


async def submit(
    request: web.Request,
    ctx: RequestContext,
    target: str,
    body: Body,
    prefs: Preferences | None,
    once: RunOnce | None,
) -> web.StreamResponse | None:
    """Run the call as a task: answer 202 at once (`Prefer: respond-async`), or answer as the
    sync call would have (a keyed or SDK call, which must run only once). None: send it as a
    plain call instead (an SDK call while the store is unreachable: running once is an extra,
    not a dependency)."""
    tasks = request.app[TASKS]
    if ctx.caller_limit_s < _MIN_TASK_DEADLINE_S:
        raise BadRequest(
            f"X-Request-Timeout under {_MIN_TASK_DEADLINE_S:g} s leaves a task no time to run."
        )
    try:
        owner = await tasks.owner(request.app[AUTH].caller_key(request))
    except StoreUnavailable:
        if (prefs is not None and prefs.respond_async) or once is None or once.key is not None:
            raise
        _say_store_down(request)
        return None
    # A body that waits on disk is read from there (the page cache), never copied whole into
    # the heap, and kept in the results store, if there is one, rather than the task store.
    spool = body if isinstance(body, SpooledBody) and tasks.results is not None else None
    content_type = request.headers.get("Content-Type", "")
    with readable(body) as data:
        _check_body(content_type, data)
        ask = request.app[USAGE].ask(ctx.route, ctx.model, content_type, data)
        job = _job(request, ctx, target, b"" if spool else bytes(data), owner)
        request_print = (
            None
            if once is None
            else fingerprint(job.method, job.path_qs, owner, data, _boundary(content_type))
        )
    call = Submission(owner, job, spool, request_print)
    ctx.call_goes_on = True
    if prefs is not None and prefs.respond_async:
        return await _submit_async(request, ctx, call, once, prefs, ask)
    assert once is not None  # a sync call runs as a task only to run once
    return await _run_once_here(request, ctx, call, once, ask)


def _check_body(content_type: str, body: bytes | mmap.mmap) -> None:
    """Refuse a body the task must keep but that cannot work: truncated JSON or multipart."""
    mime = content_type.partition(";")[0].strip().lower()
    if mime == "application/json":
        try:
            _check_json_object(body)
        except msgspec.DecodeError:  # ValidationError is one: not an object
            raise BadRequest("The request body is not a JSON object.") from None
        except RecursionError:
            raise BadRequest("The request body's JSON is nested too deeply.") from None
    elif mime == "multipart/form-data":
        boundary = _boundary(content_type)
        tail = bytes(body[-_MULTIPART_TAIL:]).rstrip()
        if not boundary or not tail.endswith(b"--" + boundary + b"--"):
            raise BadRequest("The multipart body is malformed or truncated.")


def _boundary(content_type: str) -> bytes:
    """A multipart body's boundary (b"" for any other body)."""
    mime, _, params = content_type.partition(";")
    if mime.strip().lower() != "multipart/form-data":
        return b""
    for key, _, value in (param.partition("=") for param in params.split(";")):
        if key.strip().lower() == "boundary":
            return value.strip().strip('"').encode()
    return b""


# Checks a JSON object whole without making its values: a 100 MB body of base64 images is not
# copied into Python strings.
_check_json_object = msgspec.json.Decoder(dict[str, msgspec.Raw]).decode


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
            request.app[TASKS].upstream_credential(auth.caller_key(request)),
            owner,
            config.upstream.per_credential,
        ),
    )


def _record(
    ctx: RequestContext,
    owner: str,
    status: Status,
    task_id: str,
    once: OnceName | None = None,
    *,
    announce: bool = False,
    ask: Ask | None = None,
) -> TaskRecord:
    task = Task(id=task_id, status=status, model=ctx.model, created_at=int(time.time()))
    attempt = 1 if status == "in_progress" else 0
    return TaskRecord(
        task=task,
        owner=owner,
        attempt=attempt,
        submitted_at=time.time(),
        once=once,
        ask=ask,
        client=ctx.client,
        announce=announce,
    )


def _announces(config: Config, client: str) -> bool:
    """Whether an async task of `client` announces its end (its webhook). Only async tasks: a
    sync call's caller (an SDK call, a keyed one) has the answer in its response, and never saw
    the id of the task it ran as."""
    named = config.clients.get(client)
    return named is not None and bool(named.webhook_url)


async def _submit_async(
    request: web.Request,
    ctx: RequestContext,
    call: Submission,
    once: RunOnce | None,
    prefs: Preferences,
    ask: Ask | None,
) -> web.StreamResponse:
    config: Config = request.app[CONFIG]
    store = request.app[TASKS].store
    task_id = new_task_id()
    announce = _announces(config, ctx.client)
    if once is None:
        record = _record(ctx, call.owner, "queued", task_id, announce=announce, ask=ask)
        async with _budget_held(request, ctx, ask, task_id):
            await create_task(
                *_keeping(request), call, task_id, lambda job: store.create(record, job)
            )
        return await _accepted(request, store, record.task, prefs.wait_s)
    request_print = call.request_print
    assert request_print is not None  # computed for every call that runs once
    name = _name(config, once, call.owner, request_print, task_id)
    record = _record(ctx, call.owner, "queued", task_id, name, announce=announce, ask=ask)
    async with _budget_held(request, ctx, ask, task_id) as found_earlier:
        _, held = await create_task(
            *_keeping(request),
            call,
            task_id,
            lambda job: store.find_or_create(record, job, None, name),
        )
        found_earlier(held is not None)
    if held is None:
        return await _accepted(request, store, record.task, prefs.wait_s)
    found = await _found(store, once, request_print, held)
    return await _accepted(request, store, found, prefs.wait_s, replayed=True)


async def _accepted(
    request: web.Request, store: TaskStore, task: Task, wait_s: float | None, replayed: bool = False
) -> web.StreamResponse:
    """202 with the task, or the ordinary answer if it ends within `wait_s`."""
    got = await held_outcome(request, task.id, wait_s, submitted=True) if wait_s else None
    if got is not None:
        ended, answer = got
        if ended.status != "cancelled" and answer is not None:
            return await replay(request, answer, replayed)
        task = ended
    response = task_response(task, status=202, sign=signer(request))
    response.headers.update(
        {
            "Location": f"/v1/tasks/{task.id}",
            "Preference-Applied": "respond-async",
            "Vary": "Prefer",
        }
    )
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


async def _run_once_here(
    request: web.Request, ctx: RequestContext, call: Submission, once: RunOnce, ask: Ask | None
) -> web.StreamResponse | None:
    """Run the call here, or attach to the run of an earlier request of it; the answer as the
    sync call would have given it. The run goes on if the caller leaves: its retry attaches."""
    config: Config = request.app[CONFIG]
    store = request.app[TASKS].store
    # A sync SDK call's answer is kept only as long as its retries can come for it.
    kept_s = config.idempotency.sdk_window_s if once.key is None else None
    request_print = call.request_print
    assert request_print is not None  # computed for every call that runs once
    for run in range(_MAX_RUNS):
        task_id = new_task_id()
        name = _name(config, once, call.owner, request_print, task_id)
        record = _record(ctx, call.owner, "in_progress", task_id, name, ask=ask)

        def here(
            job: Job, record: TaskRecord = record, name: OnceName = name
        ) -> Awaitable[str | None]:
            return store.find_or_create(record, job, kept_s, name, here=True)

        try:
            async with _budget_held(request, ctx, ask, task_id) as found_earlier:
                job, held = await create_task(*_keeping(request), call, task_id, here)
                found_earlier(held is not None)
        except StoreUnavailable as exc:
            # A key promises one run: without the store it cannot be kept. A store that may
            # have taken the task (the answer was lost) will run it: the retry attaches.
            if once.key is not None or run > 0 or not exc.unsent:
                raise
            _say_store_down(request)
            return None
        if held is None:
            credential = request.app[AUTH].caller_key(request) or ""
            ran = request.app[WORKER_POOL].run_here(
                Claim(record, job), credential, ctx.time_upstream
            )
            if (outcome := await asyncio.shield(ran)) is not None:
                return await replay(request, outcome[0])
            task = record.task  # cancelled, or (its lease lost) run by another worker
        else:
            task = await _found(store, once, request_print, held)
        got = await store.outcome(task.id, _SYNC_WAIT_S)
        if got is None:
            raise UpstreamTimeout()
        ended, answer = got
        if ended.status == "cancelled":
            raise TaskCancelled()
        if answer is None:
            raise NotFound(GONE)
        if kept_for_retries(ended.error) or run == _MAX_RUNS - 1:
            return await replay(request, answer, replayed=True)
        # The run this request attached to ended in what a retry runs again (a 429, a 503):
        # its own caller has that answer; this request runs the call anew.
    raise AssertionError("unreachable")


@contextlib.asynccontextmanager
async def _budget_held(
    request: web.Request, ctx: RequestContext, ask: Ask | None, task_id: str
) -> AsyncIterator[Callable[[bool], None]]:
    """The task's estimate held on its client's budget (the hold's id is the task's; the
    worker that ends it settles it) while it is created: 429 budget_exceeded, before anything
    is stored, when it would pass. The hold goes again if the creation fails, or if the call
    attached to an earlier task instead (told through the callable yielded)."""
    if ask is None:
        yield lambda attached: None
        return
    meter = request.app[USAGE]
    hold = await meter.hold(ctx.client, ask, task_id, request.app[CONFIG].tasks.retention_s)
    attached = False

    def found_earlier(found: bool) -> None:
        nonlocal attached
        attached = found

    try:
        yield found_earlier
    except BaseException:
        meter.release(ctx.client, hold.id)
        raise
    if attached:
        meter.release(ctx.client, hold.id)


def _keeping(request: web.Request) -> tuple[Results | None, float]:
    """Where a large request body is kept for its task, and how long its put may take."""
    return request.app[TASKS].results, request.app[CONFIG].tasks.result_store_timeout_s


def _say_store_down(request: web.Request) -> None:
    request.app[METRICS].run_once_bypassed.inc()
    if _store_down_said():
        logger.warning(
            "task store unreachable: SDK calls go upstream as plain calls (their retries "
            "cannot attach to a running generation until it is back)"
        )


def _name(config: Config, once: RunOnce, owner: str, request_print: str, task_id: str) -> OnceName:
    """The name a call's task is found again by."""
    name = once.name(owner, request_print)
    if once.key is not None:
        value = f"{request_print} {task_id}"
        return OnceName(name, value, config.idempotency.retention_s)
    # The SDK's first attempt is a new generation (a user may re-roll a prompt on purpose);
    # only its retries attach.
    window_s = config.idempotency.sdk_window_s
    return OnceName(name, task_id, window_s, replace=once.sdk_retry == 0)


async def _found(store: TaskStore, once: RunOnce, request_print: str, held: str) -> Task:
    """The task an earlier request of this call made, from what its name holds."""
    found_print, _, found_id = held.rpartition(" ")
    if once.key is not None and not hmac.compare_digest(found_print, request_print):
        raise IdempotencyMismatch()
    earlier = await store.get(found_id)
    if earlier is None:
        raise NotFound(GONE)
    return earlier.task
