"""`s3://bucket/prefix`: results as objects in S3-compatible storage (AWS S3, GCS's XML API,
MinIO, R2, Ceph), one object per result, named `prefix/<task id>`.

Endpoint, region and credentials come from the standard AWS environment (`AWS_ENDPOINT_URL`,
`AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, or whatever else botocore finds: a
profile, an instance role), read when the app starts. One client per process, from `start()`
to `close()`: its connection pool is shared by every put, read and sweep.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from gateway.tasks.results import (
    CHUNK_BYTES,
    Content,
    Opened,
    ResultStoreUnavailable,
    ResultUnreadable,
    is_ref,
)

if TYPE_CHECKING:
    from aiobotocore.response import StreamingBody
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import GetObjectOutputTypeDef

logger = logging.getLogger(__name__)

_CLIENT_CONFIG = AioConfig(
    # botocore's defaults (60 s to connect, 60 s per read, 5 tries) would hold a worker for
    # minutes on a dead endpoint, and a reader of /result for as long on a hung one. The
    # standard mode tries three times (AWS_MAX_ATTEMPTS), for the throttling and 5xx blips S3
    # asks clients to retry; a put, retries and all, is bounded by tasks.result_store_timeout_s.
    connect_timeout=3.0,
    read_timeout=10.0,
    retries={"mode": "standard"},
    # Each /result being streamed holds a connection for as long as its caller reads.
    max_pool_connections=100,
    # botocore >= 1.36 adds CRC checksum headers to every request, which some S3-compatible
    # stores refuse; TLS already guards the bytes in transit.
    request_checksum_calculation="when_required",
    response_checksum_validation="when_required",
)

# Every way storage fails: unreachable, timed out, refused (denied, no such bucket), or cut
# off mid-body.
_STORAGE_ERRORS = (BotoCoreError, ClientError, aiohttp.ClientError)


@contextlib.contextmanager
def _failures(error: type[ResultStoreUnavailable]) -> Iterator[None]:
    """Any storage failure inside, raised as `error` (the original as its cause, for the log)."""
    try:
        yield
    except _STORAGE_ERRORS as exc:
        raise error() from exc


class S3Results:
    def __init__(self, bucket: str, prefix: str) -> None:
        self._bucket = bucket
        self._prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        self._exits = contextlib.AsyncExitStack()
        self._client: S3Client | None = None

    @classmethod
    def from_url(cls, url: str) -> S3Results:
        """`s3://bucket` or `s3://bucket/prefix`. The prefix should be the gateway's alone: the
        sweep deletes old results there (only names that are task ids, nothing else)."""
        if not url.startswith("s3://"):
            raise ValueError(f"results URL must be s3://bucket/prefix, not {url!r}")
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        return cls(bucket, prefix)

    async def start(self) -> None:
        # AWS_REGION is what the AWS SDKs and the docs name; botocore reads only
        # AWS_DEFAULT_REGION (and the profile) itself.
        client = get_session().create_client(
            "s3", region_name=os.environ.get("AWS_REGION") or None, config=_CLIENT_CONFIG
        )
        self._client = await self._exits.enter_async_context(client)
        logger.info(
            "results over the inline size kept in s3://%s/%s at %s",
            self._bucket,
            self._prefix,
            self._s3.meta.endpoint_url,
        )

    async def close(self) -> None:
        self._client = None
        await self._exits.aclose()

    @property
    def _s3(self) -> S3Client:
        if self._client is None:
            raise RuntimeError("S3Results used outside start() and close()")
        return self._client

    def _key(self, ref: str) -> str:
        if not is_ref(ref):
            raise ValueError(f"not a result reference: {ref!r}")
        return self._prefix + ref

    async def put(self, name: str, body: Content) -> str:
        with _failures(ResultStoreUnavailable):
            await self._s3.put_object(Bucket=self._bucket, Key=self._key(name), Body=body)
        return name

    async def delete(self, ref: str) -> None:
        with _failures(ResultStoreUnavailable):
            await self._s3.delete_object(Bucket=self._bucket, Key=self._key(ref))

    @contextlib.asynccontextmanager
    async def open(self, ref: str) -> AsyncIterator[Opened | None]:
        """One GET: its length and its body, streamed as the caller reads, closed on leaving."""
        answer = await self._get(ref)
        if answer is None:
            yield None
            return
        body = answer["Body"]
        async with body:  # not `as`: before aiobotocore 3, that is the aiohttp response
            yield Opened(answer["ContentLength"], _chunks(body))

    async def _get(self, ref: str) -> GetObjectOutputTypeDef | None:
        with _failures(ResultUnreadable):
            try:
                return await self._s3.get_object(Bucket=self._bucket, Key=self._key(ref))
            except ClientError as exc:
                # Only S3's own word for it: a bare 404 (a wrong endpoint, a proxy) is no proof
                # that a kept answer is gone.
                if exc.response.get("Error", {}).get("Code") == "NoSuchKey":
                    return None  # swept
                raise

    async def sweep(self, older_than_s: float) -> int:
        """A listing of the prefix, a page (up to 1000 objects) at a time; each page's results
        last modified before the cutoff go in one batch delete."""
        cutoff = datetime.now(UTC) - timedelta(seconds=older_than_s)
        removed = 0
        with _failures(ResultStoreUnavailable):
            pages = self._s3.get_paginator("list_objects_v2").paginate(
                Bucket=self._bucket, Prefix=self._prefix
            )
            async for page in pages:
                old = [
                    item["Key"]
                    for item in page.get("Contents", [])
                    if item["LastModified"] < cutoff
                    and is_ref(item["Key"].removeprefix(self._prefix))
                ]
                if old:
                    removed += await self._delete(old)
        return removed

    async def _delete(self, keys: list[str]) -> int:
        try:
            answer = await self._s3.delete_objects(
                Bucket=self._bucket,
                Delete={"Objects": [{"Key": key} for key in keys], "Quiet": True},
            )
        except ClientError:
            # Some S3-compatible stores refuse a batch delete (without the Content-MD5 that
            # botocore >= 1.36 no longer sends, or at all): one at a time there.
            for key in keys:
                await self._s3.delete_object(Bucket=self._bucket, Key=key)
            return len(keys)
        return len(keys) - len(answer.get("Errors", []))


async def _chunks(body: StreamingBody) -> AsyncIterator[bytes]:
    with _failures(ResultUnreadable):
        while chunk := await body.read(CHUNK_BYTES):
            yield chunk
