"""An upstream that records every request exactly as it arrived on the wire, and a raw client.

The stand-in (gateway.fake) is an aiohttp app, which would normalise what it was sent; the
security tests need the request line and headers as bytes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re


@dataclasses.dataclass
class Captured:
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


@dataclasses.dataclass
class CaptureServer:
    requests: list[Captured] = dataclasses.field(default_factory=list)
    server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                _, target, _ = lines[0].split(" ", 2)
                headers = [
                    (k.strip(), v.strip())
                    for k, _, v in (line.partition(":") for line in lines[1:])
                ]
                captured = Captured(target, [h for h in headers if h[0]], b"")
                length = captured.header("Content-Length")
                if length:
                    captured.body = await reader.readexactly(int(length[0]))
                self.requests.append(captured)
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 2\r\n\r\n{}"
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def raw_request(url: str, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """Send `head` (request line and headers, without the blank line) and `body` as bytes; the
    status and the answer (head and a Content-Length body; 0 and what came if it is not HTTP)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head + b"\r\nConnection: close\r\n\r\n" + body)
        await writer.drain()
        try:
            answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        except asyncio.IncompleteReadError as exc:
            return 0, exc.partial
        length = re.search(rb"\r\ncontent-length: *(\d+)", answer, re.IGNORECASE)
        if length:
            answer += await asyncio.wait_for(reader.readexactly(int(length.group(1))), 10)
    finally:
        writer.close()
    status = int(answer.split(b" ", 2)[1]) if answer.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")) else 0
    return status, answer
