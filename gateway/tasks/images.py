"""Images that outlive their addresses: an answer kept for retries and `/result` (24 h) that
names its images by URL (OpenAI's `data[].url`: Flux's live 10 minutes, Seedream's are temporary
links) gets each image copied into the results store as the task ends, and the URLs in the kept
answer point at the gateway's copy (`/v1/files/img_<128 random bits>.<kind>`), served to anyone
holding the URL until retention, without a credential, like the upstream's own links.

The addresses come from the upstream's answer, yet are fetched as if hostile: only from the
hosts `tasks.image_fetch_hosts` names, never a private or loopback address unless
`tasks.image_fetch_private`, redirects checked the same way at every hop, within
`image_fetch_timeout_s` and `image_fetch_max_bytes`, with no credential of any kind. A copy
that fails keeps the original answer whole, marked `x-gateway-image-copy: failed`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import socket
import tempfile
from typing import IO, Any

import aiohttp
import msgspec
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from gateway.config import TasksConfig
from gateway.metrics import Metrics
from gateway.tasks.models import StoredResponse
from gateway.tasks.results import (
    CHUNK_BYTES,
    IMAGE_REF,
    Results,
    ResultStoreUnavailable,
    discard,
    put_within,
)

logger = logging.getLogger(__name__)

# What the kept answer says about its images' URLs: the gateway's copies, or the upstream's own.
COPY_HEADER = "x-gateway-image-copy"
IMAGE_ROUTE = f"/v1/files/{{name:{IMAGE_REF.pattern}}}"
_MAX_REDIRECTS = 3
_REDIRECTS = frozenset((301, 302, 303, 307, 308))
# The kinds served, by their first bytes: nothing else is kept, so the gateway's origin never
# serves a page (HTML, SVG) an upstream could have put behind an image URL.
IMAGE_KINDS = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


class CopyFailed(Exception):
    """One image could not be copied; `outcome` is the metric's label."""

    def __init__(self, outcome: str, reason: str) -> None:
        super().__init__(reason)
        self.outcome = outcome


class _PrivateAddress(OSError):
    """A host name that resolves to an address the gateway does not fetch from."""


class _PublicResolver(AbstractResolver):
    """The system resolver, refusing a name with any non-public address: checked where the
    connection is made, so a name re-pointed after a check (DNS rebinding) gains nothing."""

    def __init__(self) -> None:
        self._system = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._system.resolve(host, port, family)
        if not all(_public(entry["host"]) for entry in found):
            raise _PrivateAddress(f"{host} resolves to a non-public address")
        return found

    async def close(self) -> None:
        await self._system.close()


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone id is not the address
    return ip.is_global and not ip.is_multicast


def _parsed(url: str) -> URL:
    try:
        return URL(url)
    except ValueError as exc:
        raise CopyFailed("refused", "an image URL that does not parse") from exc


def _host_allowed(host: str, hosts: frozenset[str]) -> bool:
    host = _host_name(host)
    return host in hosts or any(
        entry.startswith("*.") and host.endswith(entry[1:]) for entry in hosts
    )


def _host_name(host: str) -> str:
    """A host as compared: DNS names are case-blind, and a trailing dot names the same host."""
    return host.lower().rstrip(".")


def image_kind(head: bytes) -> str | None:
    """The kind (file extension) of an image by its first bytes; None for anything else."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def _image_urls(body: bytes) -> tuple[dict[str, Any], list[str]] | None:
    """The answer and its `data[].url`s, if it is an OpenAI images answer naming any."""
    if b'"url"' not in body:  # base64 has no quotes: a b64_json answer is never decoded here
        return None
    try:
        answer = msgspec.json.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return None
    data = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(data, list):
        return None
    urls = [item["url"] for item in data if _names_url(item)]
    return (answer, urls) if urls else None


def _names_url(item: Any) -> bool:
    return isinstance(item, dict) and isinstance(item.get("url"), str)


def _loggable(url: URL) -> str:
    """An address for the log: no query string (signed links carry their tokens there)."""
    return str(url.with_query(None).with_fragment(None).with_user(None))


class ImageCopies:
    def __init__(self, tasks: TasksConfig, results: Results | None, metrics: Metrics) -> None:
        self._tasks = tasks
        self._hosts = frozenset(map(_host_name, tasks.image_fetch_hosts))
        self._results = results if tasks.image_fetch_hosts else None
        self._metrics = metrics
        self._base_url = tasks.image_base_url.rstrip("/")
        if tasks.image_fetch_hosts and results is None:
            logger.warning(
                "tasks.image_fetch_hosts is set but no results store (GATEWAY_RESULTS_URL): "
                "image URLs in kept answers stay the upstream's, and may expire before retention"
            )

    async def kept(self, task_id: str, response: StoredResponse) -> StoredResponse:
        """The answer to keep: with its image URLs pointing at the gateway's copies, or as it
        came, marked failed, when any copy fails. Answers without URLs are not touched."""
        results = self._results
        if results is None or response.status != 200:
            return response
        if (found := _image_urls(response.body)) is None:
            return response
        answer, urls = found
        names: list[str] = []
        try:
            async with asyncio.timeout(self._tasks.image_fetch_timeout_s):
                await self._copy_all(results, urls, names)
        except (CopyFailed, TimeoutError) as failure:
            outcome = failure.outcome if isinstance(failure, CopyFailed) else "timeout"
            self._metrics.image_copies(outcome).inc()
            logger.warning(
                "%s image copy failed (%s): %s; the answer keeps the upstream's URLs",
                task_id,
                outcome,
                failure if isinstance(failure, CopyFailed) else "timed out",
            )
            for name in names:
                await discard(results, name)
            return _marked(response, response.body, "failed")
        copies = iter(f"{self._base_url}/v1/files/{name}" for name in names)
        answer["data"] = [
            {**item, "url": next(copies)} if _names_url(item) else item for item in answer["data"]
        ]
        return _marked(response, msgspec.json.encode(answer), "copied")

    async def _copy_all(self, results: Results, urls: list[str], names: list[str]) -> None:
        """Each image into the results store, its name appended to `names` as it is kept."""
        connector = aiohttp.TCPConnector(
            resolver=None if self._tasks.image_fetch_private else _PublicResolver(), limit=4
        )
        # A session of its own: no credential, cookie or proxy of anyone's goes to image hosts.
        session = aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())
        async with session:
            for url in map(_parsed, urls):
                with await self._fetch(session, url) as image:
                    if (kind := image_kind(image.read(16))) is None:
                        raise CopyFailed("failed", f"{_loggable(url)} is no PNG, JPEG or WebP")
                    image.seek(0)
                    name = f"img_{secrets.token_hex(16)}.{kind}"
                    try:
                        timeout_s = self._tasks.result_store_timeout_s
                        names.append(await put_within(results, name, image, timeout_s))
                    except ResultStoreUnavailable as exc:
                        raise CopyFailed("failed", f"results store: {exc.__cause__}") from exc
                self._metrics.image_copies("copied").inc()

    async def _fetch(self, session: aiohttp.ClientSession, url: URL) -> IO[bytes]:
        """The image at `url`, following redirects only to addresses it may fetch."""
        for _ in range(_MAX_REDIRECTS + 1):
            self._check(url)
            try:
                async with session.get(url, allow_redirects=False) as resp:
                    if resp.status in _REDIRECTS and "Location" in resp.headers:
                        url = url.join(URL(resp.headers["Location"]))
                        continue
                    if resp.status != 200:
                        raise CopyFailed("failed", f"{_loggable(url)} answered {resp.status}")
                    return await self._read(resp, url)
            except aiohttp.ClientConnectorError as exc:
                if isinstance(exc.os_error, _PrivateAddress):
                    raise CopyFailed("refused", str(exc.os_error)) from exc
                raise CopyFailed("failed", f"{_loggable(url)}: {exc.os_error}") from exc
            except (aiohttp.ClientError, ValueError) as exc:
                raise CopyFailed("failed", f"{_loggable(url)}: {type(exc).__name__}") from exc
        raise CopyFailed("failed", f"more than {_MAX_REDIRECTS} redirects")

    def _check(self, url: URL) -> None:
        """Refuse an address before connecting: its scheme, its host, and a literal address
        (a host name's addresses are checked as it resolves)."""
        host = url.host or ""
        if url.scheme not in ("http", "https") or not _host_allowed(host, self._hosts):
            raise CopyFailed("refused", f"{_loggable(url)} is not on tasks.image_fetch_hosts")
        if self._tasks.image_fetch_private:
            return
        try:
            literal = _public(host)
        except ValueError:
            return  # a name: the resolver checks it
        if not literal:
            raise CopyFailed("refused", f"{_loggable(url)} is not a public address")

    async def _read(self, resp: aiohttp.ClientResponse, url: URL) -> IO[bytes]:
        """The body, rewound: in memory up to a chunk, then in a temporary file, so workers
        copying large images at once do not hold them all in the heap."""
        cap = self._tasks.image_fetch_max_bytes
        too_large = CopyFailed("too_large", f"{_loggable(url)} is over {cap} bytes")
        if (resp.content_length or 0) > cap:
            raise too_large
        image = tempfile.SpooledTemporaryFile(max_size=CHUNK_BYTES)  # noqa: SIM115 (returned)
        try:
            size = 0
            async for chunk in resp.content.iter_chunked(CHUNK_BYTES):
                size += len(chunk)
                if size > cap:
                    raise too_large
                image.write(chunk)
            image.seek(0)
        except BaseException:
            image.close()
            raise
        return image


def _marked(response: StoredResponse, body: bytes, outcome: str) -> StoredResponse:
    headers = [(k, v) for k, v in response.headers if k.lower() != COPY_HEADER]
    return msgspec.structs.replace(response, headers=[*headers, (COPY_HEADER, outcome)], body=body)
