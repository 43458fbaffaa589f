"""Reading a task's answer from Redis. A small one comes whole with its task, in one round
trip; a large one's body is read a range at a time as its caller takes it (`RangedResponse`),
so twenty slow readers of a 30 MB answer hold twenty ranges, not twenty copies. An answer is
never written again once kept, so its ranges agree with each other."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncGenerator
from typing import Any

import msgspec

from gateway.tasks.models import RangedResponse, StoredResponse, TaskRecord
from gateway.tasks.redis.keys import Keys
from gateway.tasks.redis.transitions import Transitions, decode
from gateway.tasks.results import ResultUnreadable

# An answer up to this size is read whole with its task; a larger one's head (its status and
# headers) is read with the task, its body later in ranges of CHUNK_BYTES.
HEAD_BYTES = 64 * 1024
CHUNK_BYTES = 256 * 1024
# How msgspec writes a StoredResponse: a map of its fields in order (status, headers, body,
# body_ref); a body past HEAD_BYTES is a bin32 after its key.
_FIELDS = 0x84
_BODY = b"\xa4body\xc6"
_LENGTH_BYTES = 4


class _Head(msgspec.Struct, frozen=True):
    status: int
    headers: list[tuple[str, str]]


_decode = msgspec.msgpack.Decoder(StoredResponse).decode
_decode_head = msgspec.msgpack.Decoder(_Head).decode


class Answers:
    def __init__(self, redis: Any, keys: Keys, transitions: Transitions) -> None:
        self._redis = redis
        self._keys = keys
        self._transitions = transitions

    async def answered(self, task_id: str) -> tuple[TaskRecord | None, StoredResponse | None]:
        """The task and its answer, in one round trip when the answer is small."""
        key = self._keys.result(task_id)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hmget(*self._transitions.read_call(task_id))
            pipe.getrange(key, 0, HEAD_BYTES - 1)
            fields, head = await pipe.execute()
        record = decode(fields)
        if record is None or not head:
            return record, None
        if len(head) < HEAD_BYTES:
            return record, _decode(head)
        return record, await self._large(key, head)

    async def _large(self, key: str, head: bytes) -> StoredResponse | None:
        size = await self._redis.strlen(key)
        if size <= len(head):
            return _decode(head) if size == len(head) else None  # exactly HEAD_BYTES, or gone
        span = _body_span(head, size)
        if span is None:  # not the shape this gateway writes: read it whole, as before
            raw = await self._redis.get(key)
            return None if raw is None else _decode(raw)
        fields, start, length = span
        return RangedResponse(
            status=fields.status,
            headers=fields.headers,
            body=b"",
            size=length,
            chunks=functools.partial(self._chunks, key, start, length),
        )

    async def _chunks(self, key: str, start: int, length: int) -> AsyncGenerator[bytes, None]:
        """The body's bytes a range at a time. The answer expires with its task: one that
        expired mid-read is cut short, never padded or completed with something else."""
        end = start + length
        for offset in range(start, end, CHUNK_BYTES):
            want = min(CHUNK_BYTES, end - offset)
            chunk: bytes = await self._redis.getrange(key, offset, offset + want - 1)
            if len(chunk) != want:
                raise ResultUnreadable("The task's answer expired while it was being read.")
            yield chunk


def _body_span(head: bytes, size: int) -> tuple[_Head, int, int] | None:
    """The answer's status and headers, and where its body lies, from its first bytes. A
    header value may hold the body's marker too: only the real one ends a map of exactly the
    status and the headers (which decodes), so each candidate is tried in turn."""
    if not head or head[0] != _FIELDS:
        return None
    at = head.find(_BODY)
    while at != -1:
        start = at + len(_BODY) + _LENGTH_BYTES
        length = int.from_bytes(head[at + len(_BODY) : start], "big")
        with contextlib.suppress(msgspec.DecodeError):
            fields = _decode_head(b"\x82" + head[1:at])  # the map's first two fields alone
            if start <= len(head) and start + length <= size:
                return fields, start, length
        at = head.find(_BODY, at + 1)
    return None
