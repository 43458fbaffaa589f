"""A page on another origin follows a task to its image in headless Chromium: fetch with a key
to submit (a CORS preflight first), EventSource on the signed events link, fetch of the signed
result link. Chromium is driven over the DevTools protocol (aiohttp's websocket client)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.auth import key_digest
from gateway.fake import STATS, FakeSettings, start_fake
from tests.conftest import GatewayFactory

CLIENT_KEY = "gw-browser-key"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
)

# What a frontend does (the README's snippet): the outcome is written into the page.
_PAGE = """<!doctype html><html><body><pre id="out"></pre><script>
const GATEWAY = %(gateway)s, KEY = %(key)s;
const out = (text) => { document.getElementById("out").textContent = text; };
async function run() {
  const submitted = await fetch(GATEWAY + "/v1/images/generations", {
    method: "POST",
    headers: {"Authorization": "Bearer " + KEY, "Content-Type": "application/json",
              "Prefer": "respond-async"},
    body: JSON.stringify({model: "gpt-image-1", prompt: "a lighthouse"}),
  });
  const task = await submitted.json();
  const location = submitted.headers.get("Location");
  const seen = [];
  const events = new EventSource(GATEWAY + task.signed_events_url);
  events.addEventListener("error", () => { events.close(); out("error: event stream"); });
  events.addEventListener("completed", async () => {
    events.close();
    seen.push("completed");
    const result = await fetch(GATEWAY + task.signed_result_url);
    const answer = await result.json();
    out(JSON.stringify({submit: submitted.status, location, seen, result: result.status,
                        image_chars: answer.data[0].b64_json.length}));
  });
  events.addEventListener("in_progress", () => seen.push("in_progress"));
}
run().catch((e) => out("error: " + e));
</script></body></html>"""


@pytest.fixture
async def slow_fake() -> AsyncIterator[web.AppRunner]:
    """The stand-in taking half a second per image, so the page sees the task run."""
    runner = await start_fake(FakeSettings(latency_s=0.5), "127.0.0.1", 0)
    yield runner
    await runner.cleanup()


@pytest.fixture
async def page_server() -> AsyncIterator[tuple[str, dict[str, str]]]:
    """A second origin serving the page; its body is set once the gateway's URL is known."""
    page: dict[str, str] = {}

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=page["html"], content_type="text/html")

    app = web.Application()
    app.router.add_get("/", index)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}", page
    await runner.cleanup()


@contextlib.asynccontextmanager
async def chromium(url: str, profile: Path) -> AsyncIterator[str]:
    """Headless Chromium showing `url`; yields its page's DevTools websocket URL."""
    assert CHROMIUM is not None
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM,
        *_FLAGS,
        f"--user-data-dir={profile}",
        url,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        yield await _page_socket(profile)
    finally:
        proc.kill()
        await proc.wait()


async def _page_socket(profile: Path, within_s: float = 30.0) -> str:
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + within_s
    while not port_file.exists() or not port_file.read_text().strip():
        assert time.monotonic() < deadline, "Chromium did not open its DevTools port"
        await asyncio.sleep(0.1)
    port = port_file.read_text().split()[0]
    async with aiohttp.ClientSession() as http:
        while True:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as resp:
                pages = [t for t in await resp.json() if t["type"] == "page"]
            if pages:
                return str(pages[0]["webSocketDebuggerUrl"])
            assert time.monotonic() < deadline, "Chromium opened no page"
            await asyncio.sleep(0.1)


async def _page_text(socket_url: str, within_s: float = 30.0) -> str:
    """The page's outcome (`#out`), once its script has written one."""
    ids = itertools.count(1)
    deadline = time.monotonic() + within_s
    expression = "document.getElementById('out') ? document.getElementById('out').textContent : ''"
    async with aiohttp.ClientSession() as http, http.ws_connect(socket_url) as ws:
        while time.monotonic() < deadline:
            call_id = next(ids)
            params = {"expression": expression, "returnByValue": True}
            await ws.send_json({"id": call_id, "method": "Runtime.evaluate", "params": params})
            reply: dict[str, Any] = {}
            while reply.get("id") != call_id:
                reply = await ws.receive_json()
            text = str(reply["result"]["result"].get("value") or "")
            if text:
                return text
            await asyncio.sleep(0.2)
    raise AssertionError("the page wrote no outcome")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium here (.ci/run installs it)")
async def test_a_page_on_another_origin_follows_a_task_to_its_image(
    gateway_factory: GatewayFactory,
    slow_fake: web.AppRunner,
    page_server: tuple[str, dict[str, str]],
    tmp_path: Path,
) -> None:
    origin, page = page_server
    gateway = await gateway_factory(
        f"http://127.0.0.1:{slow_fake.addresses[0][1]}/v1",
        cors={"allowed_origins": [origin]},
        auth={"client_key_sha256": [key_digest(CLIENT_KEY)], "upstream_api_key": "sk-UPSTREAM"},
    )
    page["html"] = _PAGE % {"gateway": json.dumps(gateway.url), "key": json.dumps(CLIENT_KEY)}
    async with chromium(f"{origin}/", tmp_path / "profile") as socket_url:
        outcome = await _page_text(socket_url)
    assert not outcome.startswith("error"), outcome
    seen = json.loads(outcome)
    assert seen["submit"] == 202
    assert seen["location"].startswith("/v1/tasks/task_")  # an exposed header
    assert seen["seen"] == ["in_progress", "completed"]
    assert seen["result"] == 200
    assert seen["image_chars"] > 1000
    # One generation upstream: the browser's preflight was answered by the gateway.
    assert slow_fake.app[STATS].requests == 1
