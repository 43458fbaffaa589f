"""The stand-in's endpoints, in APIYI's shapes, and running it."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from typing import Any

from aiohttp import web

from gateway.fake.behaviour import (
    BODY,
    SETTINGS,
    STATS,
    Control,
    FakeSettings,
    FakeStats,
    encode_json,
    error,
    form,
    json_body,
    png_b64,
    record,
    reply,
    sse,
    stream,
)
from gateway.fake.images import add_image_routes, hosted_url

MODELS = (
    "gpt-image-1",
    "gpt-image-2",
    "gemini-2.5-flash-image",
    "gemini-3-pro-image-preview",
    "seedream-4-0-250828",
    "flux-kontext-pro",
    "gpt-4o-mini",
)


def _usage() -> dict[str, Any]:
    return {
        "input_tokens": 12,
        "input_tokens_details": {"image_tokens": 0, "text_tokens": 12},
        "output_tokens": 4160,
        "total_tokens": 4172,
    }


def _image_events(prefix: str, image_b64: str, partials: int) -> list[bytes]:
    events = [
        sse(
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
        sse(
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


async def images_generations(request: web.Request) -> web.StreamResponse:
    body = json_body(request)
    image = png_b64(Control.of(request).image_bytes)
    if body.get("stream"):
        return await stream(
            request, _image_events("image_generation", image, int(body.get("partial_images") or 0))
        )
    item: dict[str, str] = {"b64_json": image}
    if body.get("response_format") == "url":
        # APIYI hosts the image and answers with its address, as OpenAI's dall-e does.
        item = {"url": hosted_url(request, base64.b64decode(image))}
    data = [item] * int(body.get("n") or 1)
    return await reply(request, {"created": int(time.time()), "data": data, "usage": _usage()})


async def images_edits(request: web.Request) -> web.StreamResponse:
    """An identity edit: the first uploaded image comes back, so callers can compare bytes."""
    fields = form(request)
    images = fields.get("image[]") or fields.get("image") or []
    if not images:
        return error(400, "image is required")
    image = base64.b64encode(images[0]).decode()
    if fields.get("stream", [b""])[0] == b"true":
        partials = int(fields.get("partial_images", [b"0"])[0])
        return await stream(request, _image_events("image_edit", image, partials))
    return await reply(
        request, {"created": int(time.time()), "data": [{"b64_json": image}], "usage": _usage()}
    )


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = json_body(request)
    model = str(body.get("model", ""))
    content = f"![image](data:image/png;base64,{png_b64(Control.of(request).image_bytes)})"
    if body.get("stream"):
        pieces = [
            content[i : i + len(content) // 4 + 1]
            for i in range(0, len(content), len(content) // 4 + 1)
        ]
        events = [
            sse(
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
        events.append(sse(None, b"[DONE]"))
        return await stream(request, events)
    return await reply(
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
    json_body(request)
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
        return await stream(request, [sse(None, answer)])
    return await reply(request, answer)


async def models(request: web.Request) -> web.StreamResponse:
    return await reply(
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
        body=encode_json(body),
        content_type="application/json",
        headers={
            "Connection": "X-Upstream-Hop",
            "X-Upstream-Hop": "1",
            "Keep-Alive": "timeout=5",
            "Proxy-Authenticate": "Basic",
            "X-Upstream-End-To-End": "kept",
        },
    )


async def stats_view(request: web.Request) -> web.Response:
    stats = request.app[STATS]
    return web.json_response(
        {
            "requests": stats.requests,
            "cancelled": stats.cancelled,
            "running": stats.running,
            "connections": len(stats.peers),
            "by_path": stats.by_path,
            "max_calls_per_key": max(stats.by_key.values(), default=0),
        }
    )


async def last_view(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATS].last)


async def reset_view(request: web.Request) -> web.Response:
    request.app[STATS].reset()
    return web.json_response({})


# What APIYI's edge (Cloudflare) adds to its answers: a session cookie, its servers, the
# account, the key's rate limits. The gateway in key-injection mode keeps the last only.
_EDGE_HEADERS = (
    ("Set-Cookie", "__cf_bm=fake-edge-session; path=/; HttpOnly; Secure"),
    ("Server", "cloudflare"),
    ("Via", "1.1 fake-edge"),
    ("OpenAI-Organization", "org-fake-upstream"),
    ("x-ratelimit-remaining-requests", "4999"),
)


async def _add_edge_headers(request: web.Request, response: web.StreamResponse) -> None:
    if not request.path.startswith("/_fake/"):
        for name, value in _EDGE_HEADERS:
            response.headers[name] = value  # over aiohttp's own Server


def create_fake_app(settings: FakeSettings | None = None) -> web.Application:
    app = web.Application(middlewares=[record], client_max_size=512 * 2**20)
    app.on_response_prepare.append(_add_edge_headers)
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
    add_image_routes(app)
    r.add_post("/v1beta/models/{model}:{method}", generate_content)
    r.add_post("/v1/models/{model}:{method}", generate_content)
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
