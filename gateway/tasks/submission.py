"""A call on its way to being a task, and its body: read where it lies (a large one from its
spool file's pages, never copied whole into the heap), and kept in the results store, when
there is one, rather than in the task store, which then holds only a pointer to it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import mmap
from collections.abc import Awaitable, Callable, Iterator

import msgspec

from gateway.errors import GatewayError, StoreUnavailable
from gateway.tasks.models import Job
from gateway.tasks.results import (
    Results,
    ResultStoreUnavailable,
    discard,
    put_within,
    request_ref,
)
from gateway.uploads import Body, SpooledBody


@dataclasses.dataclass(frozen=True)
class Submission:
    """A call on its way to being a task: its caller's owner hash, the job, its body's spool
    file when the body goes to the results store, and its fingerprint when it must run once."""

    owner: str
    job: Job
    spool: SpooledBody | None
    request_print: str | None


@contextlib.contextmanager
def readable(body: Body) -> Iterator[bytes | mmap.mmap]:
    """The body's bytes: in hand, or mapped from its spool file for the `with`."""
    if isinstance(body, bytes):
        yield body
    else:
        with body.view() as mapped:
            yield mapped


async def create_task(
    results: Results | None,
    timeout_s: float,
    call: Submission,
    task_id: str,
    create: Callable[[Job], Awaitable[str | None]],
) -> tuple[Job, str | None]:
    """`create(job)`, with the request body put in the results store first when it waits in a
    spool file: the task store keeps a reference, never a large body. The body goes again
    unless the task now holds it (or may: a creation the store may have done keeps it for the
    sweep), its put bounded by `timeout_s`. The job as created, and what `create` returned."""
    if call.spool is None:
        return call.job, await create(call.job)
    assert results is not None  # a spool is kept only where there is a results store
    # Run to its end even if the caller leaves: a body put and then abandoned half-way (the
    # caller's disconnect cancels its handler) was left to the sweep, a day, and a caller
    # dropping large keyed calls filled the volume every large answer is kept on.
    keeping = asyncio.ensure_future(_keep(results, call, task_id, create, timeout_s))
    _keeping.add(keeping)
    keeping.add_done_callback(_kept)
    return await asyncio.shield(keeping)


# Keepings under way, held until they end (the loop keeps only weak references to tasks).
_keeping: set[asyncio.Future[tuple[Job, str | None]]] = set()


def _kept(keeping: asyncio.Future[tuple[Job, str | None]]) -> None:
    _keeping.discard(keeping)
    if not keeping.cancelled():
        keeping.exception()  # its caller may be gone: retrieved here, so never logged as lost


async def _keep(
    results: Results,
    call: Submission,
    task_id: str,
    create: Callable[[Job], Awaitable[str | None]],
    timeout_s: float,
) -> tuple[Job, str | None]:
    assert call.spool is not None
    try:
        ref = await put_within(results, request_ref(task_id), call.spool.rewound(), timeout_s)
    except ResultStoreUnavailable as exc:
        raise StoreUnavailable(
            "The results store is unreachable: the request could not be kept, and nothing was "
            "sent upstream.",
            unsent=True,
        ) from exc
    job = msgspec.structs.replace(call.job, body_ref=ref)
    try:
        held = await create(job)
    except GatewayError as exc:
        if not isinstance(exc, StoreUnavailable) or exc.unsent:
            await discard(results, ref)
        raise
    if held is not None:  # an earlier request's task holds the call
        await discard(results, ref)
    return job, held
