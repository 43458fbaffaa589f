"""Task results outside the task store (`GATEWAY_RESULTS_URL`): an image is megabytes of base64,
which a Redis should not hold for a day. A result above `tasks.result_inline_bytes` is written
here and the task keeps a pointer; `/result` streams it back byte for byte.

`file:///dir`: one file per result in a directory (a volume shared by the replicas), written to
a temporary name and renamed, so a reader never sees half a result. `s3://` is not built yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

from yarl import URL

from gateway.errors import GatewayError

_CHUNK = 256 * 1024


class ResultStoreUnavailable(GatewayError):
    """The upstream answered (and was paid), but its answer could not be kept: said loudly."""

    status = 502
    type = "server_error"
    code = "result_store_unavailable"
    should_retry = False
    default_message = (
        "The upstream answered, but the gateway could not keep the answer; it was billed."
    )


class FileResults:
    def __init__(self, directory: Path) -> None:
        self._directory = directory

    @classmethod
    def from_url(cls, url: str) -> FileResults:
        parsed = URL(url)
        if parsed.scheme != "file" or not parsed.path.startswith("/"):
            raise ValueError(f"results URL must be file:///absolute/dir, not {url!r}")
        return cls(Path(parsed.path))

    def _path(self, ref: str) -> Path:
        if not ref.replace("_", "").replace("-", "").isalnum():  # a task id, nothing else
            raise ValueError(f"not a result reference: {ref!r}")
        return self._directory / ref

    async def put(self, task_id: str, body: bytes) -> str:
        """Keep `body`; its reference. Raises `ResultStoreUnavailable` if it cannot."""
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

    def size(self, ref: str) -> int | None:
        try:
            return self._path(ref).stat().st_size
        except OSError:
            return None

    async def chunks(self, ref: str) -> AsyncIterator[bytes]:
        """The result as it was kept, a chunk at a time (never whole in memory)."""
        stored = await asyncio.to_thread(self._path(ref).open, "rb")
        try:
            while chunk := await asyncio.to_thread(stored.read, _CHUNK):
                yield chunk
        finally:
            stored.close()

    def sweep(self, older_than_s: float) -> int:
        """Remove results older than the tasks they belong to (retention); how many."""
        cutoff = time.time() - older_than_s
        removed = 0
        for path in self._directory.glob("*"):
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
        return removed
