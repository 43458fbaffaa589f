"""Task results outside the task store (`GATEWAY_RESULTS_URL`): an image is megabytes of base64,
which a Redis should not hold for a day. A result above `tasks.result_inline_bytes` is written
here and the task keeps a pointer; `/result` streams it back byte for byte.

`file:///dir`: one file per result in a directory (a volume shared by the replicas), written to
a temporary name and renamed, so a reader never sees half a result. `s3://bucket/prefix`: one
object per result in S3-compatible storage (`results_s3.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import BinaryIO, Protocol

from yarl import URL

from gateway.errors import GatewayError

CHUNK_BYTES = 256 * 1024


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


class Results(Protocol):
    """Where results too large for the task store live. A storage failure of any kind raises
    `ResultStoreUnavailable` (`ResultUnreadable` when reading), never anything else."""

    async def start(self) -> None:
        """Before first use, when the app starts."""

    async def close(self) -> None:
        """When the app stops."""

    async def put(self, task_id: str, body: bytes) -> str:
        """Keep `body`; its reference, which the task keeps."""
        ...

    def open(self, ref: str) -> AbstractAsyncContextManager[Opened | None]:
        """The result kept under `ref` (None once it is gone), closed on leaving."""
        ...

    async def sweep(self, older_than_s: float) -> int:
        """Remove results older than the tasks they belong to (retention); how many."""
        ...


def is_ref(name: str) -> bool:
    """A reference is a task id: nothing that could reach out of a directory or a prefix."""
    return name.replace("_", "").replace("-", "").isalnum()


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

    async def put(self, task_id: str, body: bytes) -> str:
        try:
            await asyncio.to_thread(self._write, self._path(task_id), body)
        except OSError as exc:
            raise ResultStoreUnavailable() from exc
        return task_id

    @staticmethod
    def _write(path: Path, body: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        with open(partial, "wb") as out:
            out.write(body)
            out.flush()
            os.fsync(out.fileno())
        partial.replace(path)

    @contextlib.asynccontextmanager
    async def open(self, ref: str) -> AsyncIterator[Opened | None]:
        try:
            stored: BinaryIO | None = await asyncio.to_thread(self._path(ref).open, "rb")
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
        cutoff = time.time() - older_than_s
        removed = 0
        for path in self._directory.glob("*"):
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
        return removed


async def _file_chunks(stored: BinaryIO) -> AsyncIterator[bytes]:
    try:
        while chunk := await asyncio.to_thread(stored.read, CHUNK_BYTES):
            yield chunk
    except OSError as exc:
        raise ResultUnreadable() from exc
