"""How the stand-in answers: generation time, faults, PNG payloads, and what it records."""

from __future__ import annotations

import asyncio
import base64
import collections
import email.parser
import email.policy
import functools
import hashlib
import random
import struct
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web

encode_json = msgspec.json.Encoder().encode


@dataclass(frozen=True)
class FakeSettings:
    latency_s: float = 0.0
    image_bytes: int = 256 * 1024


@dataclass
class FakeStats:
    requests: int = 0
    cancelled: int = 0
    running: int = 0
    peak_running: int = 0  # most requests held at once: what concurrency limits must bound
    by_path: collections.Counter[str] = field(default_factory=collections.Counter)
    # Calls per Idempotency-Key (the gateway forwards it): a key seen twice was paid twice.
    by_key: collections.Counter[str] = field(default_factory=collections.Counter)
    peers: set[str] = field(default_factory=set)
    last: dict[str, Any] = field(default_factory=dict)
    # Faults served per request (path, body, fault), for `X-Fake-Fault-Times`.
    faulted: collections.Counter[str] = field(default_factory=collections.Counter)

    def reset(self) -> None:
        self.requests = self.cancelled = self.running = self.peak_running = 0
        self.by_path.clear()
        self.by_key.clear()
        self.peers.clear()
        self.faulted.clear()
        self.last = {}


SETTINGS = web.AppKey("fake_settings", FakeSettings)
STATS = web.AppKey("fake_stats", FakeStats)
BODY = web.RequestKey("fake_body", bytes)
FAULT = web.RequestKey("fake_fault", str)


def _fault(request: web.Request, stats: FakeStats, body: bytes) -> str:
    """The fault this request gets: `X-Fake-Fault`, but with `X-Fake-Fault-Times: N` only for
    the first N requests of the same path and body (a retry then succeeds)."""
    fault = request.headers.get("X-Fake-Fault", "").lower()
    times = request.headers.get("X-Fake-Fault-Times")
    if not fault or times is None:
        return fault
    key = f"{request.path} {hashlib.sha256(body).hexdigest()} {fault}"
    if stats.faulted[key] >= int(times):
        return ""
    stats.faulted[key] += 1
    return fault


@functools.lru_cache(maxsize=8)
def png(size: int) -> bytes:
    """A valid PNG of about `size` bytes: noise pixels stored uncompressed, so size is honest."""
    width = 256
    row = width * 3
    height = max(1, size // (row + 1))
    noise = random.Random(size).randbytes(row * height)
    raw = b"".join(b"\x00" + noise[i * row : (i + 1) * row] for i in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 0))
        + chunk(b"IEND", b"")
    )


@functools.lru_cache(maxsize=8)
def png_b64(size: int) -> str:
    return base64.b64encode(png(size)).decode()


@dataclass(frozen=True)
class Control:
    latency_s: float
    image_bytes: int
    fault: str

    @classmethod
    def of(cls, request: web.Request) -> Control:
        s = request.app[SETTINGS]
        h = request.headers
        return cls(
            latency_s=float(h.get("X-Fake-Latency", s.latency_s)),
            image_bytes=int(h.get("X-Fake-Image-Bytes", s.image_bytes)),
            fault=request.get(FAULT, ""),
        )


def error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": "upstream_error", "code": status}}
    return web.Response(
        status=status, body=encode_json(body), content_type="application/json", headers=headers
    )


async def reply(request: web.Request, payload: Any) -> web.StreamResponse:
    """A JSON answer after the generation time, with the requested fault applied."""
    ctl = Control.of(request)
    if ctl.fault != "trickle":  # a trickle spends the generation time sending
        await asyncio.sleep(ctl.latency_s)
    if ctl.fault in ("500", "502", "503"):
        return error(int(ctl.fault), "The model is overloaded. Please try again later.")
    if ctl.fault == "drop":
        assert request.transport is not None
        request.transport.abort()
        return web.Response()
    body = encode_json(payload)
    if ctl.fault == "malformed":
        return web.Response(body=body[: len(body) // 2], content_type="application/json")
    if ctl.fault not in ("reset", "trickle"):
        # When the answer left, on this host's clock: benchmarks time what follows from it.
        sent = {"X-Fake-Sent-At": f"{time.time():.6f}"}
        return web.Response(body=body, content_type="application/json", headers=sent)
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.content_length = len(body)
    await response.prepare(request)
    if ctl.fault == "reset":
        await response.write(body[: len(body) // 2])
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return response
    pieces = [body[i : i + 1024] for i in range(0, len(body), 1024)]
    for piece in pieces:
        await response.write(piece)
        await asyncio.sleep(ctl.latency_s / len(pieces))
    await response.write_eof()
    return response


async def stream(request: web.Request, events: Sequence[bytes]) -> web.StreamResponse:
    """Server-sent events spread over the generation time (`reset` breaks after the first)."""
    ctl = Control.of(request)
    if ctl.fault in ("500", "502", "503"):
        await asyncio.sleep(ctl.latency_s)
        return error(int(ctl.fault), "The model is overloaded. Please try again later.")
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    for i, event in enumerate(events):
        await asyncio.sleep(ctl.latency_s / len(events))
        await response.write(event)
        if ctl.fault == "reset" and i == 0:
            assert request.transport is not None
            request.transport.abort()
            return response
    await response.write_eof()
    return response


def sse(event: str | None, data: Any) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    body = data if isinstance(data, bytes) else encode_json(data)
    return head + b"data: " + body + b"\n\n"


def form(request: web.Request) -> dict[str, list[bytes]]:
    """Multipart fields by name; stdlib parsing, since the raw body was already read."""
    head = f"Content-Type: {request.headers.get('Content-Type', '')}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + request[BODY])
    fields: dict[str, list[bytes]] = collections.defaultdict(list)
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if isinstance(name, str) and isinstance(payload, bytes):
            fields[name].append(payload)
    return fields


def json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = msgspec.json.decode(request[BODY])
    except msgspec.DecodeError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="expected a JSON object")
    return body


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
    stats = request.app[STATS]
    if request.path.startswith("/_fake/"):
        return await handler(request)
    body = await request.read()
    request[BODY] = body
    stats.requests += 1
    stats.by_path[request.path] += 1
    if key := request.headers.get("Idempotency-Key"):
        stats.by_key[key] += 1
    stats.peers.add(str(request.transport.get_extra_info("peername") if request.transport else ""))
    stats.last = {
        "method": request.method,
        "path_qs": request.raw_path,
        "headers": [[k, v] for k, v in request.headers.items()],
        "body_sha256": hashlib.sha256(body).hexdigest(),
        "body_bytes": len(body),
    }
    stats.running += 1
    stats.peak_running = max(stats.peak_running, stats.running)
    try:
        fault = request[FAULT] = _fault(request, stats, body)
        if fault == "429":
            retry_after = request.headers.get("X-Fake-Retry-After", "7")
            return error(429, "Too many requests for this model.", {"Retry-After": retry_after})
        if fault == "hang":
            await asyncio.Event().wait()
        return await handler(request)
    except asyncio.CancelledError:
        stats.cancelled += 1
        raise
    finally:
        stats.running -= 1
