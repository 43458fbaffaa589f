"""The one upstream client session and the one way to call it.

A kept-alive pool, keep-alive sockets, bytes untouched. `Upstream.call` is used by the sync
pass-through and the task workers alike, so a deadline, a broken connection or an unreachable
upstream means the same error and the same metric label whoever made the call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from gateway.config import Config, TcpKeepaliveConfig, UpstreamConfig
from gateway.errors import (
    GatewayError,
    RequestTimeout,
    UpstreamBroken,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from gateway.metrics import METRICS, Metrics
from gateway.netopts import set_keepalive
from gateway.target import check_target

logger = logging.getLogger(__name__)

# A body as it is sent: whole, or made anew for each connect attempt (a spooled upload).
Payload = bytes | Callable[[], AsyncIterator[bytes]] | None
# Headers aiohttp would add on its own; the upstream must see exactly what the caller sent.
_NO_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


class Exchange:
    """One upstream call: its answer once the headers are in, and, once it is over, how long it
    took from sending to the last byte read."""

    __slots__ = ("response", "seconds")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.seconds = 0.0


class Origin:
    """The one place the upstream origin is fixed: from configuration, whatever a target holds."""

    def __init__(self, base_url: str) -> None:
        # Callers' paths start with /v1 or /v1beta, so a base ending in /v1 is cut back to the
        # root both hang off: https://api.apiyi.com/v1 -> https://api.apiyi.com
        base = URL(base_url.rstrip("/"))
        prefix = base.raw_path[: -len("/v1")] if base.raw_path.endswith("/v1") else base.raw_path
        self._origin = str(base.origin())
        self._where = (base.scheme, base.host, base.port)
        self._prefix = prefix.rstrip("/")

    def url(self, target: str) -> URL:
        """The upstream URL for a caller's path and query: the configured origin, always."""
        url = URL(f"{self._origin}{self._prefix}{check_target(target)}", encoded=True)
        if (url.scheme, url.host, url.port) != self._where or not url.raw_path.startswith(
            self._prefix + "/v1"
        ):
            # Only a bug could get here (the target is checked before); never send it.
            raise OriginMoved()
        return url


class Upstream:
    """Where calls go, the session that carries them, and what they are measured by."""

    def __init__(
        self, session: aiohttp.ClientSession, config: UpstreamConfig, metrics: Metrics
    ) -> None:
        self.session = session
        self.origin = Origin(config.url)
        self._retries = config.connect_retries
        self._metrics = metrics
        if isinstance(session.connector, aiohttp.TCPConnector):
            metrics.watch_pool(session.connector, config.pool_size)

    @contextlib.asynccontextmanager
    async def call(
        self,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: Payload,
        *,
        deadline: float,
        model: str | None,
        log_id: str,
    ) -> AsyncIterator[Exchange]:
        """The call, within `deadline` (event-loop time), its answer yielded once the headers
        are in; reading it inside the `async with` is within the deadline too. Whatever goes
        wrong leaves as one of: `RequestTimeout` (the deadline had passed before sending),
        `UpstreamUnreachable` (nothing sent), `UpstreamTimeout` (timeout phase `total` before
        the answer's headers, `read` after), `UpstreamBroken`."""
        label = self._metrics.model_label(model)
        loop = asyncio.get_running_loop()
        exchange: Exchange | None = None
        try:
            async with asyncio.timeout_at(deadline):
                if loop.time() >= deadline:
                    raise RequestTimeout("The deadline passed before the call was sent upstream.")
                sent_at = loop.time()
                exchange = Exchange(await self._send(method, target, headers, body, log_id))
                async with exchange.response:
                    yield exchange
                exchange.seconds = loop.time() - sent_at
        except TimeoutError:
            phase = "total" if exchange is None else "read"
            self._metrics.upstream_timeouts(label, phase).inc()
            raise UpstreamTimeout() from None
        except UpstreamUnreachable as exc:
            if exc.timed_out:
                self._metrics.upstream_timeouts(label, "connect").inc()
            raise
        except aiohttp.ClientError as exc:
            logger.warning("%s upstream connection broken: %s", log_id, type(exc).__name__)
            raise UpstreamBroken() from None
        status = str(exchange.response.status)
        self._metrics.upstream_duration(label, status).observe(exchange.seconds)

    async def _send(
        self,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: Payload,
        log_id: str,
    ) -> aiohttp.ClientResponse:
        """Send a request and return once the answer's headers are in. A connect that fails sent
        nothing (nothing billed), so it is tried again; a streamed body is made anew each try."""
        url = self.origin.url(target)
        timed_out = False
        for attempt in range(self._retries + 1):
            try:
                return await self.session.request(
                    method,
                    url,
                    headers=headers,
                    data=body() if callable(body) else body,
                    allow_redirects=False,
                )
            except aiohttp.ConnectionTimeoutError:
                timed_out = True
                failure = "connect timed out"
            except aiohttp.ClientConnectorError as exc:
                failure = f"connect failed ({_reason(exc.os_error)})"
            logger.warning("%s upstream %s (attempt %d)", log_id, failure, attempt + 1)
        raise UpstreamUnreachable(
            f"The upstream could not be reached: {failure}. Nothing was sent.", timed_out=timed_out
        )


def _reason(error: OSError) -> str:
    """Why a connect failed, in words that name neither the upstream's host nor its port (the
    OS's own message does: "Connect call failed ('10.0.0.7', 443)")."""
    if error.errno is not None and error.errno > 0:
        return os.strerror(error.errno)
    if isinstance(error, socket.gaierror):
        return "name resolution failed"
    return type(error).__name__


class OriginMoved(GatewayError):
    default_message = "The gateway refused to send this request."


UPSTREAM = web.AppKey("upstream", Upstream)


def _socket_factory(cfg: TcpKeepaliveConfig) -> Callable[[Any], socket.socket]:
    def make(addr_info: Any) -> socket.socket:
        family, type_, proto, _, _ = addr_info
        sock = socket.socket(family=family, type=type_, proto=proto)
        set_keepalive(sock, cfg)
        return sock

    return make


def open_session(config: Config) -> aiohttp.ClientSession:
    up = config.upstream
    connector = aiohttp.TCPConnector(
        limit=up.pool_size,
        limit_per_host=0,
        keepalive_timeout=up.idle_timeout_s,
        socket_factory=_socket_factory(config.tcp_keepalive),
    )
    return aiohttp.ClientSession(
        connector=connector,
        # Only connecting has its own limit; the per-model deadline bounds everything else.
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=up.connect_timeout_s),
        auto_decompress=False,
        skip_auto_headers=_NO_AUTO_HEADERS,
        # A shared jar would hand one caller's upstream cookies to every other caller.
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
    )


def upstream_ctx(config: Config) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        session = open_session(config)
        app[UPSTREAM] = Upstream(session, config.upstream, app[METRICS])
        yield
        await session.close()

    return ctx
