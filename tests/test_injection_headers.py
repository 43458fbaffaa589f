"""Which headers and query parameters cross the gateway when it holds the organisation's key:
nothing of a caller's network or account choice goes upstream, nothing of the upstream's
sessions, servers or account comes back, stored replays included. Passing through, both
directions stay as they are (hop-by-hop aside)."""

from __future__ import annotations

import uuid
from typing import Any

import aiohttp
import openai
import pytest
from multidict import CIMultiDictProxy

from gateway.auth import key_digest
from tests.conftest import Fake, Gateway, GatewayFactory
from tests.helpers import GENERATE
from tests.redis_server import RedisServer

CLIENT_KEY = "gw-team-a-0123456789"
INJECTING = {"client_key_sha256": [key_digest(CLIENT_KEY)], "upstream_api_key": "sk-UPSTREAM"}
KEY = {"Authorization": f"Bearer {CLIENT_KEY}"}
# What a caller (or a proxy in front of the gateway) may send that says where it is or which
# of the organisation's accounts pays.
CALLER_SIDE = {
    "Forwarded": "for=10.1.2.3;host=gateway.internal",
    "X-Forwarded-For": "10.1.2.3",
    "X-Forwarded-Host": "gateway.internal",
    "X-Real-IP": "10.1.2.3",
    "OpenAI-Organization": "org-someone-else",
    "OpenAI-Project": "proj_someone_else",
}
# What the stand-in's edge answers with (gateway/fake/app.py) that stays with the upstream.
UPSTREAM_SIDE = {"Set-Cookie", "Via", "OpenAI-Organization"}


def _sent(fake: Fake) -> dict[str, str]:
    return {k.lower(): v for k, v in fake.stats.last["headers"]}


def _assert_upstream_side_dropped(headers: CIMultiDictProxy[str]) -> None:
    assert not UPSTREAM_SIDE & headers.keys()
    assert headers.get("Server") != "cloudflare"
    assert headers["Content-Type"] == "application/json"
    assert headers["x-ratelimit-remaining-requests"] == "4999"  # SDKs back off by it


@pytest.fixture
async def injecting(gateway_factory: GatewayFactory) -> Gateway:
    return await gateway_factory(auth=INJECTING)


async def test_injecting_the_caller_side_stays_and_the_upstream_side_comes_back_without_its_own(
    injecting: Gateway, fake: Fake, http: aiohttp.ClientSession
) -> None:
    url = f"{injecting.url}/v1/images/generations"
    async with http.post(url, json=GENERATE, headers={**KEY, **CALLER_SIDE}) as resp:
        assert resp.status == 200
        _assert_upstream_side_dropped(resp.headers)
    sent = _sent(fake)
    assert not {name.lower() for name in CALLER_SIDE} & sent.keys()
    assert sent["authorization"] == "Bearer sk-UPSTREAM"
    # An upstream refusal keeps what tells the caller when to come back.
    limited = {**KEY, "X-Fake-Fault": "429", "X-Fake-Retry-After": "3"}
    async with http.post(url, json=GENERATE, headers=limited) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "3"
        _assert_upstream_side_dropped(resp.headers)


async def test_the_sdks_organization_and_project_do_not_pick_the_account_billed(
    injecting: Gateway, fake: Fake
) -> None:
    async with openai.AsyncOpenAI(
        base_url=f"{injecting.url}/v1",
        api_key=CLIENT_KEY,
        organization="org-someone-else",
        project="proj_someone_else",
    ) as sdk:
        answer = await sdk.images.with_raw_response.generate(model="gpt-image-1", prompt="x")
    assert "set-cookie" not in answer.headers
    sent = _sent(fake)
    assert "openai-organization" not in sent
    assert "openai-project" not in sent


async def test_passing_through_both_sides_are_forwarded(
    gateway: Gateway, fake: Fake, http: aiohttp.ClientSession
) -> None:
    headers = {"Authorization": "Bearer sk-caller", **CALLER_SIDE}
    url = f"{gateway.url}/v1/images/generations?api_key=sk-caller"
    async with http.post(url, json=GENERATE, headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["Set-Cookie"].startswith("__cf_bm=")
        assert resp.headers["Server"] == "cloudflare"
        assert resp.headers["OpenAI-Organization"] == "org-fake-upstream"
    sent = _sent(fake)
    assert {k.lower(): v for k, v in CALLER_SIDE.items()}.items() <= sent.items()
    assert fake.stats.last["path_qs"].endswith("?api_key=sk-caller")


async def _result(http: aiohttp.ClientSession, url: str, task_id: str) -> aiohttp.ClientResponse:
    wait = {**KEY, "Prefer": "wait=10"}
    async with http.get(f"{url}/v1/tasks/{task_id}/result", headers=wait) as resp:
        await resp.read()
        return resp


async def test_stored_answers_replay_without_the_upstream_side(
    injecting: Gateway, fake: Fake, http: aiohttp.ClientSession
) -> None:
    url = f"{injecting.url}/v1/images/generations"
    submit = {**KEY, **CALLER_SIDE, "Prefer": "respond-async"}
    async with http.post(url, json=GENERATE, headers=submit) as resp:
        assert resp.status == 202
        task = await resp.json()
    result = await _result(http, injecting.url, task["id"])
    assert result.status == 200
    _assert_upstream_side_dropped(result.headers)
    assert not {name.lower() for name in CALLER_SIDE} & _sent(fake).keys()
    keyed = {**KEY, "Idempotency-Key": "render-1"}
    for _ in range(2):
        async with http.post(url, json=GENERATE, headers=keyed) as resp:
            assert resp.status == 200
            _assert_upstream_side_dropped(resp.headers)
    assert resp.headers["Idempotent-Replayed"] == "true"
    assert fake.stats.requests == 2


async def test_an_answer_kept_before_key_injection_replays_without_the_upstream_side(
    gateway_factory: GatewayFactory, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    """A task run passing through (or by an older gateway) kept every header; once the
    gateway holds the organisation's key, replaying it must not hand them out."""
    prefix = f"replay-{uuid.uuid4().hex[:8]}"
    tasks: dict[str, Any] = {"redis_url": redis_server.url, "key_prefix": prefix}
    passing = await gateway_factory(tasks=tasks)
    injecting = await gateway_factory(tasks={**tasks, "workers": 0}, auth=INJECTING)
    submit = {**KEY, "Prefer": "respond-async"}
    async with http.post(
        f"{passing.url}/v1/images/generations", json=GENERATE, headers=submit
    ) as resp:
        task = await resp.json()
    kept = await _result(http, passing.url, task["id"])
    assert kept.headers["Set-Cookie"].startswith("__cf_bm=")
    result = await _result(http, injecting.url, task["id"])
    assert result.status == 200
    _assert_upstream_side_dropped(result.headers)


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("api_key=sk-mine", "api_key"),
        ("%61pi_key=sk-mine", "api_key"),
        ("size=1024x1024&ACCESS_TOKEN=t", "access_token"),
        ("token=t", "token"),
        ("apikey=sk-mine", "apikey"),
    ],
)
async def test_injecting_a_credential_in_the_query_is_a_400_that_names_it(
    injecting: Gateway, fake: Fake, http: aiohttp.ClientSession, query: str, named: str
) -> None:
    url = f"{injecting.url}/v1/images/generations?{query}"
    async with http.post(url, json=GENERATE, headers=KEY) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert f"`{named}`" in error["message"]
    assert error["type"] == "invalid_request_error"
    assert fake.stats.requests == 0


async def test_injecting_the_key_parameter_still_authenticates_and_stays_here(
    injecting: Gateway, fake: Fake, http: aiohttp.ClientSession
) -> None:
    url = f"{injecting.url}/v1beta/models/gemini-2.5-flash-image:generateContent?key={CLIENT_KEY}"
    async with http.post(url, json={"contents": []}) as resp:
        assert resp.status == 200
    assert "key=" not in fake.stats.last["path_qs"]
