"""The one upstream client session: a kept-alive pool, keep-alive sockets, bytes untouched."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from gateway.config import Config, TcpKeepaliveConfig
from gateway.errors import GatewayError, UpstreamUnreachable
from gateway.metrics import METRICS
from gateway.netopts import set_keepalive
from gateway.target import check_target

logger = logging.getLogger(__name__)

# Headers aiohttp would add on its own; the upstream must see exactly what the caller sent.
_NO_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


class Upstream:
    """Where calls go and the session that carries them."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str) -> None:
        self.session = session
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

    async def send(
        self,
        method: str,
        raw_path: str,
        headers: CIMultiDict[str],
        body: bytes | Callable[[], AsyncIterator[bytes]] | None,
        *,
        retries: int,
        log_id: str,
    ) -> aiohttp.ClientResponse:
        """Send a request and return once the answer's headers are in. A connect that fails sent
        nothing (nothing billed), so it is tried again; a streamed body is made anew each try."""
        url = self.url(raw_path)
        timed_out = False
        for attempt in range(retries + 1):
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
        app[UPSTREAM] = Upstream(session, config.upstream.url)
        connector = session.connector
        if isinstance(connector, aiohttp.TCPConnector):
            app[METRICS].watch_pool(connector, config.upstream.pool_size)
        yield
        await session.close()

    return ctx
