"""CORS answered by the gateway, and signed task links (without a browser: see test_browser)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.auth import key_digest
from gateway.tasks import links
from gateway.tasks.service import TASKS
from tests.conftest import Fake, Gateway, GatewayFactory
from tests.helpers import GENERATE, submit

APP = "https://app.example.com"
EVIL = "https://evil.example.net"
CLIENT_KEY = "gw-client-key"
KEY = {"Authorization": f"Bearer {CLIENT_KEY}"}
# Key injection: what a deployment fronting browsers runs (the page never holds APIYI's key).
INJECTING = {"client_key_sha256": [key_digest(CLIENT_KEY)], "upstream_api_key": "sk-UPSTREAM"}


@pytest.fixture
async def gateway(gateway_factory: GatewayFactory) -> Gateway:
    return await gateway_factory(cors={"allowed_origins": [APP]}, auth=INJECTING)


def _preflight(origin: str, method: str = "POST") -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "authorization,content-type,prefer,x-stainless-os",
    }


def _cors(headers: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items() if k.lower().startswith("access-control-")}


@pytest.mark.parametrize(
    "path", ["/v1/images/generations", "/v1/tasks/task_AAAAAAAAAAAAAAAAAAAAAA/events"]
)
async def test_preflight_is_answered_by_the_gateway_never_the_upstream(
    gateway: Gateway, fake: Fake, http: aiohttp.ClientSession, path: str
) -> None:
    async with http.options(f"{gateway.url}{path}", headers=_preflight(APP)) as resp:
        assert resp.status == 204
        cors = _cors(resp.headers)
    assert cors["access-control-allow-origin"] == APP
    assert "POST" in cors["access-control-allow-methods"]
    allowed = cors["access-control-allow-headers"].split(", ")
    assert allowed == ["authorization", "content-type", "prefer", "x-stainless-os"]
    assert cors["access-control-max-age"] == "600"
    async with http.options(f"{gateway.url}{path}", headers=_preflight(EVIL)) as resp:
        assert resp.status == 403
        assert (await resp.json())["error"]["code"] == "origin_not_allowed"
        assert _cors(resp.headers) == {}
    assert fake.stats.requests == 0  # neither preflight reached the upstream


@pytest.mark.parametrize(
    "path", ["/v1/images/generations", "/v1/tasks/task_AAAAAAAAAAAAAAAAAAAAAA/result"]
)
async def test_preflight_is_refused_when_no_origin_is_configured(
    gateway_factory: GatewayFactory, fake: Fake, http: aiohttp.ClientSession, path: str
) -> None:
    gateway = await gateway_factory()  # pass-through: before, the upstream got (and answered) it
    async with http.options(gateway.url + path, headers=_preflight(APP)) as resp:
        assert resp.status == 403
        assert _cors(resp.headers) == {}
    assert fake.stats.requests == 0


async def test_an_allowed_origin_may_read_the_answer_and_its_headers(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    headers = {**KEY, "Origin": APP, "Prefer": "respond-async"}
    url = f"{gateway.url}/v1/images/generations"
    async with http.post(url, json=GENERATE, headers=headers) as resp:
        assert resp.status == 202
        cors = _cors(resp.headers)
        vary = resp.headers.getall("Vary")
    assert cors["access-control-allow-origin"] == APP
    exposed = cors["access-control-expose-headers"].lower()
    for name in ("location", "retry-after", "x-request-id", "preference-applied"):
        assert name in exposed
    assert "Origin" in ", ".join(vary)
    assert "Prefer" in ", ".join(vary)
    async with http.post(url, json=GENERATE, headers={**headers, "Origin": EVIL}) as resp:
        assert resp.status == 202
        assert _cors(resp.headers) == {}  # the browser keeps the answer from the page


@pytest.fixture
async def permissive_upstream() -> AsyncIterator[str]:
    """An upstream with a CORS policy of its own, wider than the gateway's."""

    async def models(request: web.Request) -> web.Response:
        headers = {"Access-Control-Allow-Origin": "*", "Access-Control-Allow-Headers": "*"}
        return web.json_response({"object": "list", "data": []}, headers=headers)

    app = web.Application()
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}/v1"
    await runner.cleanup()


async def test_the_upstreams_own_cors_headers_are_not_the_gateways(
    gateway_factory: GatewayFactory, permissive_upstream: str, http: aiohttp.ClientSession
) -> None:
    gateway = await gateway_factory(permissive_upstream, cors={"allowed_origins": [APP]})
    url = f"{gateway.url}/v1/models"
    async with http.get(url, headers={**KEY, "Origin": EVIL}) as resp:
        assert resp.status == 200
        assert _cors(resp.headers) == {}
    async with http.get(url, headers={**KEY, "Origin": APP}) as resp:
        assert _cors(resp.headers)["access-control-allow-origin"] == APP
        assert "access-control-allow-headers" not in _cors(resp.headers)


async def _submit(http: aiohttp.ClientSession, gateway: Gateway, latency_s: float = 0.3) -> Any:
    return await submit(http, gateway.url, key=KEY, headers={"X-Fake-Latency": str(latency_s)})


async def _events(http: aiohttp.ClientSession, url: str) -> list[str]:
    """The event names of a stream read to its end, with no header at all."""
    async with http.get(url) as resp:
        assert resp.status == 200, await resp.text()
        return re.findall(r"^event: (\w+)", await resp.text(), re.MULTILINE)


async def test_signed_links_open_the_tasks_events_and_result_without_a_key(
    gateway_factory: GatewayFactory, store: dict[str, Any], http: aiohttp.ClientSession
) -> None:
    first = await gateway_factory(tasks=store, auth=INJECTING)
    task = await _submit(http, first)
    assert task["signed_events_url"].startswith(f"/v1/tasks/{task['id']}/events?exp=")
    # With Redis, another replica honours the link: the secret is shared, not per process.
    other = await gateway_factory(tasks=store, auth=INJECTING) if store else first
    events = await _events(http, other.url + task["signed_events_url"])
    assert events[-1] == "completed"
    async with http.get(other.url + task["signed_result_url"]) as resp:
        assert resp.status == 200
        assert (await resp.json())["data"][0]["b64_json"]
    async with http.get(f"{other.url}{task['result_url']}") as resp:
        assert resp.status == 401  # the plain path still needs the key


async def test_a_link_opens_its_own_path_of_its_own_task_only(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    mine, theirs = await _submit(http, gateway, 0.1), await _submit(http, gateway, 0.1)
    query = mine["signed_result_url"].partition("?")[2]
    refused = [
        f"{theirs['result_url']}?{query}",  # another task
        f"{mine['events_url']}?{query}",  # the events, with the result's signature
        f"{mine['url']}?{query}",  # the task itself is not a signed path
        mine["signed_result_url"].replace("sig=", "sig=A"),  # tampered
        mine["signed_result_url"].replace("exp=", "exp=9"),  # a later expiry
        mine["result_url"] + "?exp=99999999999&sig=",
    ]
    for path in refused:
        async with http.get(gateway.url + path) as resp:
            assert resp.status in (401, 404), path
            if path.startswith(mine["url"] + "/"):
                assert resp.status == 404, path
    async with http.get(gateway.url + mine["signed_result_url"]) as resp:
        assert resp.status in (200, 202)


async def test_an_expired_link_gets_404(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    task = await _submit(http, gateway, 0.1)
    secret = links.link_secret(await gateway.app[TASKS].store.owner_key())
    async with http.get(gateway.url + links.sign(secret, task["result_url"], -1.0)) as resp:
        assert resp.status == 404
    # The same signing, unexpired, opens it: the 404 above is the expiry's.
    async with http.get(gateway.url + links.sign(secret, task["result_url"], 60.0)) as resp:
        assert resp.status in (200, 202)


async def test_a_link_followed_before_the_end_hands_out_no_fresh_links(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    """A 202 to a signed result link must not renew it, or a link would live for ever."""
    task = await _submit(http, gateway, latency_s=2.0)
    async with http.get(gateway.url + task["signed_result_url"]) as resp:
        assert resp.status == 202
        body = await resp.json()
    assert body["signed_result_url"] is None
    assert body["signed_events_url"] is None


async def test_key_in_the_query_still_opens_the_events(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    """`?key=` keeps working (the README steers pages to signed links instead)."""
    task = await _submit(http, gateway, 0.1)
    events = await _events(http, f"{gateway.url}{task['events_url']}?key={CLIENT_KEY}")
    assert events[-1] == "completed"
