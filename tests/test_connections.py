"""Connections: kept alive, reused, protected by TCP keep-alive, and dropped with the caller."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable, Iterator

import aiohttp
import openai

from tests.conftest import Fake, Gateway, GatewayFactory

_TCP = (socket.AF_INET, socket.AF_INET6)


def _port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


@contextlib.contextmanager
def own_sockets(
    match: Callable[[tuple[str, int], tuple[str, int]], bool],
) -> Iterator[list[socket.socket]]:
    """This process's real TCP sockets whose (local, peer) addresses match, read via /proc."""
    found: list[socket.socket] = []
    seen: set[tuple[object, object]] = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            sock = socket.socket(fileno=os.dup(int(fd)))
            try:
                ends = (sock.getsockname(), sock.getpeername())
                if sock.family in _TCP and ends not in seen and match(*ends):
                    seen.add(ends)
                    found.append(sock)
                    continue
            except OSError:
                pass
            sock.close()
    try:
        yield found
    finally:
        for sock in found:
            sock.close()


def keepalive_options(sock: socket.socket) -> tuple[int, int, int, int]:
    return (
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
    )


async def test_keepalive_is_set_on_caller_and_upstream_sockets(
    gateway_factory: GatewayFactory, fake: Fake, http: aiohttp.ClientSession
) -> None:
    gateway = await gateway_factory(tcp_keepalive={"idle_s": 17, "interval_s": 4, "count": 3})
    gw_port, up_port = _port_of(gateway.url), _port_of(fake.url)
    call = asyncio.ensure_future(
        http.post(
            f"{gateway.url}/v1/images/generations",
            json={"model": "gpt-image-1", "prompt": "slow"},
            headers={"X-Fake-Latency": "1"},
        )
    )
    await asyncio.sleep(0.5)  # the call is now held open on both legs
    with (
        own_sockets(lambda local, peer: local[1] == gw_port) as accepted,
        own_sockets(lambda local, peer: peer[1] == up_port) as upstream,
    ):
        assert len(accepted) == 1
        assert len(upstream) == 1
        assert keepalive_options(accepted[0]) == (1, 17, 4, 3)
        assert keepalive_options(upstream[0]) == (1, 17, 4, 3)
    async with await call as resp:
        assert resp.status == 200


async def test_calls_reuse_one_upstream_connection(sdk: openai.AsyncOpenAI, fake: Fake) -> None:
    for _ in range(20):
        await sdk.images.generate(model="gpt-image-1", prompt="x")
    assert fake.stats.requests == 20
    assert len(fake.stats.peers) == 1


async def test_caller_disconnect_cancels_the_upstream_call_at_once(
    gateway: Gateway, fake: Fake
) -> None:
    body = b'{"model":"gpt-image-1","prompt":"slow"}'
    _reader, writer = await asyncio.open_connection("127.0.0.1", _port_of(gateway.url))
    writer.write(
        b"POST /v1/images/generations HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        b"X-Fake-Latency: 60\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    await writer.drain()
    await asyncio.sleep(0.3)
    assert fake.stats.requests == 1
    writer.close()
    await writer.wait_closed()
    gone = time.monotonic()
    while fake.stats.cancelled == 0 and time.monotonic() - gone < 1.0:
        await asyncio.sleep(0.02)
    assert fake.stats.cancelled == 1, "the upstream call outlived its caller"
    assert gateway.sample("gateway_client_disconnects_total", route="/v1/images/generations") == 1
    assert gateway.sample("gateway_inflight_requests", route="/v1/images/generations") == 0
