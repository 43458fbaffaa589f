"""A caller's body, received whole before any upstream connection is taken.

A caller that trickles its body holds only its own socket and a little memory here, never one
of the pooled upstream connections every other caller needs (nginx's request buffering does
the same). Bodies past `server.body_memory_bytes` wait in an unlinked temporary file, so a
100 MB upload costs little RAM; a body that stalls for `server.body_read_timeout_s` is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from typing import IO

from aiohttp import StreamReader, web

from gateway.config import ServerConfig
from gateway.errors import BodyTooLarge, RequestTimeout

_READ_CHUNK = 256 * 1024


class SpooledBody:
    """A body too large to keep in memory, in a temporary file that disappears with it."""

    def __init__(self, file: IO[bytes], size: int) -> None:
        self._file = file
        self.size = size

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body from its start; called again for each connect attempt."""
        self._file.seek(0)
        while chunk := self._file.read(_READ_CHUNK):
            yield chunk

    def read(self) -> bytes:
        self._file.seek(0)
        return self._file.read()

    def rewound(self) -> IO[bytes]:
        """The file from its start, to copy elsewhere."""
        self._file.seek(0)
        return self._file

    @contextlib.contextmanager
    def view(self) -> Iterator[mmap.mmap]:
        """The body's bytes without reading them into the heap: what a check or a hash reads
        comes from the page cache."""
        with mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            yield mapped

    def close(self) -> None:
        self._file.close()


Body = bytes | SpooledBody


async def receive(
    request: web.Request, server: ServerConfig, seen: Callable[[bytes], None] | None = None
) -> Body:
    """The whole body, waiting for it, once `arrived` said it is not all here yet (that check
    also refused a declared length over the limit); `seen` is shown each chunk as it arrives."""
    try:
        held, spool, size = await _arrive(request.content, server, seen)
    except TimeoutError:
        raise RequestTimeout(
            f"No part of the request body arrived for {server.body_read_timeout_s:g} s; "
            "nothing was sent upstream."
        ) from None
    if spool is None:
        return bytes(held)
    spool.flush()
    return SpooledBody(spool, size)


def arrived(request: web.Request, server: ServerConfig) -> bytes | None:
    """The whole body if it came with the headers (most calls do): taking it then waits for
    nothing, so it needs no timer. None while there is more to wait for."""
    length = request.content_length
    if length is None:
        return None if request.body_exists else b""
    if length > server.max_body_bytes:
        raise BodyTooLarge()
    if request.content.total_bytes < length:
        return None
    return request.content.read_nowait()


async def _arrive(
    content: StreamReader, server: ServerConfig, seen: Callable[[bytes], None] | None
) -> tuple[bytearray, IO[bytes] | None, int]:
    """Read until the body ends, each chunk within the idle limit; past the memory limit the
    body goes on in a temporary file."""
    loop = asyncio.get_running_loop()
    held = bytearray()
    spool: IO[bytes] | None = None
    size = 0
    try:
        async with asyncio.timeout(None) as idle:
            while True:
                idle.reschedule(loop.time() + server.body_read_timeout_s)
                chunk = await content.readany()
                if not chunk:
                    return held, spool, size
                size += len(chunk)
                if size > server.max_body_bytes:
                    raise BodyTooLarge()
                if seen is not None:
                    seen(chunk)
                if spool is None and size > server.body_memory_bytes:
                    spool = tempfile.TemporaryFile()  # noqa: SIM115 (owned by the SpooledBody)
                    spool.write(held)
                    held.clear()
                if spool is not None:
                    spool.write(chunk)
                else:
                    held += chunk
    except BaseException:
        if spool is not None:
            spool.close()
        raise
