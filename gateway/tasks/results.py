"""Task results outside the task store (`GATEWAY_RESULTS_URL`): an image is megabytes of base64,
which a Redis should not hold for a day. A result above `tasks.result_inline_bytes` is written
here and the task keeps a pointer; `/result` streams it back byte for byte. So is a task's
request body that arrived too large to keep in memory, until the task ends: the task store
keeps a pointer to it, not the body.

`file:///dir`: one file per result in a directory (a volume shared by the replicas), written to
a temporary name of its own and renamed, so a reader never sees half a result; the directory may
hold other things (an operator's `.keep`, a backup), which are never touched.
`s3://bucket/prefix`: one object per result in S3-compatible storage (`results_s3.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import IO, Any, BinaryIO, Protocol, TypeVar

from yarl import URL

from gateway.errors import GatewayError
from gateway.tasks.models import TASK_ID

CHUNK_BYTES = 256 * 1024
# The most one open or read of a file result may take (as an S3 read's timeout).
_READ_TIMEOUT_S = 10.0
_T = TypeVar("_T")


class ResultStoreUnavailable(GatewayError):
    """The upstream answered (and was paid), but its answer could not be kept: said loudly."""

    status = 502
    type = "server_error"
    code = "result_store_unavailable"
    should_retry = False
    default_message = (
        "The upstream answered, but the gateway could not keep the answer; it was billed."
    )


class ResultUnreadable(ResultStoreUnavailable):
    """A kept answer cannot be read while its store is down: nothing is lost, so a retry may
    well get it."""

    should_retry = True
    retry_after_s = 5
    default_message = (
        "The results store is unreachable: the task's answer is kept there, but cannot be "
        "read right now."
    )


@dataclasses.dataclass(frozen=True)
class Opened:
    """A kept result, opened once: its size, then its bytes a chunk at a time."""

    size: int
    chunks: AsyncIterator[bytes]


# What is kept: an answer in hand, or a request body waiting in its spool file (from its start).
Content = bytes | IO[bytes]


class Results(Protocol):
    """Where results too large for the task store live, and the large request bodies of the
    tasks that will make them. A storage failure of any kind raises `ResultStoreUnavailable`
    (`ResultUnreadable` when reading), never anything else."""

    async def start(self) -> None:
        """Before first use, when the app starts."""

    async def close(self) -> None:
        """When the app stops."""

    async def put(self, name: str, body: Content) -> str:
        """Keep `body` under `name` (`is_ref`); its reference, which the task keeps."""
        ...

    async def delete(self, ref: str) -> None:
        """Remove what `ref` names, if it is still there."""

    def open(self, ref: str) -> AbstractAsyncContextManager[Opened | None]:
        """The result kept under `ref` (None once it is gone), closed on leaving."""
        ...

    async def sweep(self, older_than_s: float) -> int:
        """Remove results older than the tasks they belong to (retention); how many."""
        ...


# An image copied from an address in a kept answer (`images.py`): 128 random bits, and its kind.
IMAGE_REF = re.compile(r"img_[0-9a-f]{32}\.(?:png|jpeg|webp)")
# A result's name: its task's id, and for a run that took another over, its attempt; a task's
# request body: its id and `.request`; or an image copy's.
_REF = re.compile(rf"(?:{TASK_ID.pattern}(?:\.[0-9]{{1,20}}|\.request)?|{IMAGE_REF.pattern})")
# A result being written: `.<ref>.<random>.partial`, unique to its writer (two containers both
# running as PID 1 on one volume would share a pid-named one, and mix their bytes).
_PARTIAL = re.compile(rf"\.{_REF.pattern}\.[0-9a-f]{{16}}\.partial")


async def put_within(results: Results, name: str, body: Content, timeout_s: float) -> str:
    """`results.put`, in `timeout_s` at most: a store that hangs (stopped, a dead NFS server)
    fails its task in seconds instead of holding it."""
    try:
        async with asyncio.timeout(timeout_s):
            return await results.put(name, body)
    except TimeoutError:
        raise ResultStoreUnavailable() from TimeoutError(f"no answer in {timeout_s:g} s")


async def discard(results: Results | None, ref: str) -> None:
    """Remove what `ref` names if the store answers; else the sweep removes it in time."""
    if results is not None:
        with contextlib.suppress(ResultStoreUnavailable):
            await results.delete(ref)


def request_ref(task_id: str) -> str:
    """The name a task's request body is kept under until the task ends."""
    return f"{task_id}.request"


def is_ref(name: str) -> bool:
    """A name the gateway gives results, and only that: nothing that could reach out of a
    directory or a prefix, nor anything an operator put beside them."""
    return _REF.fullmatch(name) is not None


class FileResults:
    def __init__(self, directory: Path) -> None:
        self._directory = directory

    @classmethod
    def from_url(cls, url: str) -> FileResults:
        parsed = URL(url)
        if parsed.scheme != "file" or not parsed.path.startswith("/"):
            raise ValueError(f"results URL must be file:///absolute/dir, not {url!r}")
        return cls(Path(parsed.path))

    async def start(self) -> None:
        """Nothing to open: the directory is made by the first write."""

    async def close(self) -> None:
        """Nothing held between calls."""

    def _path(self, ref: str) -> Path:
        if not is_ref(ref):
            raise ValueError(f"not a result reference: {ref!r}")
        return self._directory / ref

    async def put(self, name: str, body: Content) -> str:
        try:
            await asyncio.to_thread(self._write, self._path(name), body)
        except OSError as exc:
            raise ResultStoreUnavailable() from exc
        return name

    async def delete(self, ref: str) -> None:
        try:
            await asyncio.to_thread(self._path(ref).unlink, missing_ok=True)
        except OSError as exc:
            raise ResultStoreUnavailable() from exc

    @staticmethod
    def _write(path: Path, body: Content) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{secrets.token_hex(8)}.partial")
        # O_EXCL: a name some other writer holds is an error, never shared. 0o666 under the
        # umask, as open() gives: replicas running as other users of the group read it.
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with open(fd, "wb") as out:
                if isinstance(body, bytes):
                    out.write(body)
                else:
                    shutil.copyfileobj(body, out, CHUNK_BYTES)
                out.flush()
                os.fsync(out.fileno())
            partial.replace(path)
        except BaseException:
            with contextlib.suppress(OSError):  # a failed write leaves nothing behind
                partial.unlink()
            raise

    @contextlib.asynccontextmanager
    async def open(self, ref: str) -> AsyncIterator[Opened | None]:
        try:
            stored: BinaryIO | None = await _read_within(self._path(ref).open, "rb")
        except FileNotFoundError:
            stored = None  # swept
        except OSError as exc:
            raise ResultUnreadable() from exc
        if stored is None:
            yield None
            return
        with stored:
            yield Opened(os.fstat(stored.fileno()).st_size, _file_chunks(stored))

    async def sweep(self, older_than_s: float) -> int:
        return await asyncio.to_thread(self._sweep, older_than_s)

    def _sweep(self, older_than_s: float) -> int:
        """Old results, and old temporaries of writers that died mid-write; nothing else: not
        a symlink, not a directory, not a name the gateway does not give."""
        cutoff = time.time() - older_than_s
        removed = 0
        with contextlib.suppress(FileNotFoundError), os.scandir(self._directory) as entries:
            for entry in entries:
                if not (is_ref(entry.name) or _PARTIAL.fullmatch(entry.name)):
                    continue
                with contextlib.suppress(OSError):
                    found = entry.stat(follow_symlinks=False)
                    if stat.S_ISREG(found.st_mode) and found.st_mtime < cutoff:
                        os.unlink(entry.path)
                        removed += 1
        return removed


async def _file_chunks(stored: BinaryIO) -> AsyncIterator[bytes]:
    try:
        while chunk := await _read_within(stored.read, CHUNK_BYTES):
            yield chunk
    except OSError as exc:
        raise ResultUnreadable() from exc


async def _read_within(read: Callable[..., _T], *args: object) -> _T:
    """`read(*args)` in a thread, waited for `_READ_TIMEOUT_S` at most: a volume that hangs (a
    dead NFS server) is an unreadable result, not a reader, or a task's worker, held until it
    comes back. What a read given up on returns at last is closed then."""
    done = asyncio.get_running_loop().run_in_executor(None, read, *args)
    await asyncio.wait((done,), timeout=_READ_TIMEOUT_S)
    if not done.done():
        done.add_done_callback(_close_late)
        raise ResultUnreadable() from TimeoutError(f"no answer in {_READ_TIMEOUT_S:g} s")
    return done.result()


def _close_late(done: asyncio.Future[Any]) -> None:
    if not done.cancelled() and done.exception() is None and hasattr(done.result(), "close"):
        done.result().close()
