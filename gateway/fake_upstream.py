"""An APIYI stand-in for development, tests and benchmarks (`gateway fake-upstream`).

It answers the endpoints the gateway fronts in APIYI's shapes, with real PNG bytes. Every request
may steer it with headers (the gateway forwards them like any other):
  X-Fake-Latency: seconds        generation time (streams spread their events over it)
  X-Fake-Image-Bytes: n          size of the image returned
  X-Fake-Fault: one of           500|502|503 (error after the latency), 429 (at once, with
                                 Retry-After), hang (never answers), drop (closes the connection
                                 without answering), reset (half the body, then a TCP reset),
                                 malformed (200 with a truncated JSON body), trickle (the body in
                                 1 KiB pieces spread over the latency)
`GET /_fake/stats` counts requests, distinct connections, cancellations; `GET /_fake/last`
describes the last request (headers, body digest); `POST /_fake/reset` zeroes both.
"""

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

_json = msgspec.json.Encoder()
MODELS = (
    "gpt-image-1",
    "gpt-image-2",
    "gemini-2.5-flash-image",
    "gemini-3-pro-image-preview",
    "seedream-4-0-250828",
    "flux-kontext-pro",
    "gpt-4o-mini",
)


@dataclass(frozen=True)
class FakeSettings:
    latency_s: float = 0.0
    image_bytes: int = 256 * 1024


@dataclass
class FakeStats:
    requests: int = 0
    cancelled: int = 0
    by_path: collections.Counter[str] = field(default_factory=collections.Counter)
    peers: set[str] = field(default_factory=set)
    last: dict[str, Any] = field(default_factory=dict)

    def reset(self) -> None:
        self.requests = self.cancelled = 0
        self.by_path.clear()
        self.peers.clear()
        self.last = {}


SETTINGS = web.AppKey("fake_settings", FakeSettings)
STATS = web.AppKey("fake_stats", FakeStats)
BODY = web.RequestKey("fake_body", bytes)


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
            fault=h.get("X-Fake-Fault", "").lower(),
        )


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": "upstream_error", "code": status}}
    return web.Response(
        status=status, body=_json.encode(body), content_type="application/json", headers=headers
    )


async def _reply(request: web.Request, payload: Any) -> web.StreamResponse:
    """A JSON answer after the generation time, with the requested fault applied."""
    ctl = Control.of(request)
    if ctl.fault != "trickle":  # a trickle spends the generation time sending
        await asyncio.sleep(ctl.latency_s)
    if ctl.fault in ("500", "502", "503"):
        return _error(int(ctl.fault), "The model is overloaded. Please try again later.")
    if ctl.fault == "drop":
        assert request.transport is not None
        request.transport.abort()
        return web.Response()
    body = _json.encode(payload)
    if ctl.fault == "malformed":
        return web.Response(body=body[: len(body) // 2], content_type="application/json")
    if ctl.fault not in ("reset", "trickle"):
        return web.Response(body=body, content_type="application/json")
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


async def _stream(request: web.Request, events: Sequence[bytes]) -> web.StreamResponse:
    """Server-sent events spread over the generation time (`reset` breaks after the first)."""
    ctl = Control.of(request)
    if ctl.fault in ("500", "502", "503"):
        await asyncio.sleep(ctl.latency_s)
        return _error(int(ctl.fault), "The model is overloaded. Please try again later.")
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


def _sse(event: str | None, data: Any) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    body = data if isinstance(data, bytes) else _json.encode(data)
    return head + b"data: " + body + b"\n\n"


def _usage() -> dict[str, Any]:
    return {"input_tokens": 12, "output_tokens": 4160, "total_tokens": 4172}


def _image_events(prefix: str, image_b64: str, partials: int) -> list[bytes]:
    events = [
        _sse(
            f"{prefix}.partial_image",
            {
                "type": f"{prefix}.partial_image",
                "b64_json": image_b64,
                "partial_image_index": i,
                "created_at": int(time.time()),
            },
        )
        for i in range(partials)
    ]
    events.append(
        _sse(
            f"{prefix}.completed",
            {
                "type": f"{prefix}.completed",
                "b64_json": image_b64,
                "usage": _usage(),
                "created_at": int(time.time()),
            },
        )
    )
    return events


def _form(request: web.Request) -> dict[str, list[bytes]]:
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


def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = msgspec.json.decode(request[BODY])
    except msgspec.DecodeError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="expected a JSON object")
    return body


async def images_generations(request: web.Request) -> web.StreamResponse:
    body = _json_body(request)
    image = png_b64(Control.of(request).image_bytes)
    if body.get("stream"):
        return await _stream(
            request, _image_events("image_generation", image, int(body.get("partial_images") or 0))
        )
    data = [{"b64_json": image}] * int(body.get("n") or 1)
    return await _reply(request, {"created": int(time.time()), "data": data, "usage": _usage()})


async def images_edits(request: web.Request) -> web.StreamResponse:
    """An identity edit: the first uploaded image comes back, so callers can compare bytes."""
    form = _form(request)
    images = form.get("image[]") or form.get("image") or []
    if not images:
        return _error(400, "image is required")
    image = base64.b64encode(images[0]).decode()
    stream = form.get("stream", [b""])[0] == b"true"
    if stream:
        partials = int(form.get("partial_images", [b"0"])[0])
        return await _stream(request, _image_events("image_edit", image, partials))
    return await _reply(
        request, {"created": int(time.time()), "data": [{"b64_json": image}], "usage": _usage()}
    )


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = _json_body(request)
    model = str(body.get("model", ""))
    content = f"![image](data:image/png;base64,{png_b64(Control.of(request).image_bytes)})"
    if body.get("stream"):
        pieces = [
            content[i : i + len(content) // 4 + 1]
            for i in range(0, len(content), len(content) // 4 + 1)
        ]
        events = [
            _sse(
                None,
                {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}],
                },
            )
            for piece in pieces
        ]
        events.append(_sse(None, b"[DONE]"))
        return await _stream(request, events)
    return await _reply(
        request,
        {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": 1290, "total_tokens": 1300},
        },
    )


async def generate_content(request: web.Request) -> web.StreamResponse:
    _json_body(request)
    image = png_b64(Control.of(request).image_bytes)
    answer = {
        "candidates": [
            {
                "content": {
                    "role": "model",
                    "parts": [{"inlineData": {"mimeType": "image/png", "data": image}}],
                },
                "finishReason": "STOP",
            }
        ],
        "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 1290},
        "modelVersion": request.match_info["model"],
    }
    if request.match_info["method"] == "streamGenerateContent":
        return await _stream(request, [_sse(None, answer)])
    return await _reply(request, answer)


async def models(request: web.Request) -> web.StreamResponse:
    return await _reply(
        request,
        {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": 1700000000, "owned_by": "apiyi"}
                for m in MODELS
            ],
        },
    )


async def unknown(request: web.Request) -> web.Response:
    """404 for paths APIYI lacks, echoing what arrived and sending hop-by-hop headers back."""
    body = {
        "error": {
            "message": f"Invalid URL ({request.method} {request.path})",
            "type": "invalid_request_error",
            "code": "unknown_url",
        },
        "echo": {
            "method": request.method,
            "path_qs": request.raw_path,
            "body_sha256": hashlib.sha256(request[BODY]).hexdigest(),
        },
    }
    return web.Response(
        status=404,
        body=_json.encode(body),
        content_type="application/json",
        headers={
            "Connection": "X-Upstream-Hop",
            "X-Upstream-Hop": "1",
            "Keep-Alive": "timeout=5",
            "Proxy-Authenticate": "Basic",
            "X-Upstream-End-To-End": "kept",
        },
    )


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
    stats.peers.add(str(request.transport.get_extra_info("peername") if request.transport else ""))
    stats.last = {
        "method": request.method,
        "path_qs": request.raw_path,
        "headers": [[k, v] for k, v in request.headers.items()],
        "body_sha256": hashlib.sha256(body).hexdigest(),
        "body_bytes": len(body),
    }
    try:
        fault = request.headers.get("X-Fake-Fault", "").lower()
        if fault == "429":
            return _error(429, "Too many requests for this model.", {"Retry-After": "7"})
        if fault == "hang":
            await asyncio.Event().wait()
        return await handler(request)
    except asyncio.CancelledError:
        stats.cancelled += 1
        raise


async def stats_view(request: web.Request) -> web.Response:
    stats = request.app[STATS]
    return web.json_response(
        {
            "requests": stats.requests,
            "cancelled": stats.cancelled,
            "connections": len(stats.peers),
            "by_path": stats.by_path,
        }
    )


async def last_view(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATS].last)


async def reset_view(request: web.Request) -> web.Response:
    request.app[STATS].reset()
    return web.json_response({})


def create_fake_app(settings: FakeSettings | None = None) -> web.Application:
    app = web.Application(middlewares=[record], client_max_size=512 * 2**20)
    app[SETTINGS] = settings or FakeSettings()
    app[STATS] = FakeStats()
    r = app.router
    r.add_get("/_fake/stats", stats_view)
    r.add_get("/_fake/last", last_view)
    r.add_post("/_fake/reset", reset_view)
    r.add_post("/v1/images/generations", images_generations)
    r.add_post("/v1/images/edits", images_edits)
    r.add_post("/v1/images/variations", images_edits)
    r.add_post("/v1/chat/completions", chat_completions)
    r.add_get("/v1/models", models)
    r.add_post("/v1beta/models/{model}:{method}", generate_content)
    r.add_route("*", "/{tail:.*}", unknown)
    return app


async def start_fake(settings: FakeSettings, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(create_fake_app(settings), handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=8192).start()
    return runner


async def serve_fake(settings: FakeSettings, host: str, port: int) -> None:
    runner = await start_fake(settings, host, port)
    print(f"fake upstream on http://{host}:{port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
