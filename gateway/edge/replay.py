"""A kept answer sent back exactly as the sync call would have returned it: whole when small,
a chunk at a time from where it lies when large."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing

from aiohttp import web
from multidict import CIMultiDict

from gateway.auth import AUTH
from gateway.errors import NotFound
from gateway.headers import answer_headers
from gateway.tasks.images import IMAGE_KINDS
from gateway.tasks.models import RangedResponse, StoredResponse
from gateway.tasks.results import CHUNK_BYTES, Opened, ResultStoreUnavailable
from gateway.tasks.service import TASKS

logger = logging.getLogger(__name__)

GONE = "The call's answer is no longer kept."


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
            raise NotFound(GONE)
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


async def image_view(request: web.Request) -> web.StreamResponse:
    """An image copy, to anyone holding its URL (unguessable, like the upstream's own links)."""
    name = request.match_info["name"]
    headers = [
        ("Content-Type", IMAGE_KINDS[name.rsplit(".", 1)[1]]),
        ("Cache-Control", "private, max-age=3600, immutable"),
        ("X-Content-Type-Options", "nosniff"),
    ]
    return await replay(
        request, StoredResponse(status=200, headers=headers, body=b"", body_ref=name)
    )
