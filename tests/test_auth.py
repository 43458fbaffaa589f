"""Key injection: callers hold gateway keys, only the gateway holds the upstream key."""

from __future__ import annotations

import aiohttp
import openai
import pytest
from multidict import CIMultiDict

from gateway.auth import key_digest
from tests.conftest import Fake, Gateway, GatewayFactory

CLIENT_KEY = "gw-team-a-0123456789"


@pytest.fixture
async def injecting(gateway_factory: GatewayFactory) -> Gateway:
    return await gateway_factory(
        auth={"client_key_sha256": [key_digest(CLIENT_KEY)], "upstream_api_key": "sk-UPSTREAM"}
    )


def _sent_headers(fake: Fake) -> dict[str, str]:
    return {k.lower(): v for k, v in fake.stats.last["headers"]}


async def test_client_key_is_swapped_for_the_upstream_key(injecting: Gateway, fake: Fake) -> None:
    async with openai.AsyncOpenAI(base_url=f"{injecting.url}/v1", api_key=CLIENT_KEY) as sdk:
        result = await sdk.images.generate(model="gpt-image-1", prompt="x")
    assert result.data
    assert _sent_headers(fake)["authorization"] == "Bearer sk-UPSTREAM"


async def test_google_style_key_header_is_accepted_and_not_forwarded(
    injecting: Gateway, fake: Fake, http: aiohttp.ClientSession
) -> None:
    async with http.post(
        f"{injecting.url}/v1beta/models/gemini-2.5-flash-image:generateContent",
        json={"contents": []},
        headers={"x-goog-api-key": CLIENT_KEY},
    ) as resp:
        assert resp.status == 200
    sent = _sent_headers(fake)
    assert sent["authorization"] == "Bearer sk-UPSTREAM"
    assert "x-goog-api-key" not in sent


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong-key"}, {"Authorization": f"Basic {CLIENT_KEY}"}]
)
async def test_unknown_or_missing_key_is_a_401_and_nothing_is_sent(
    injecting: Gateway, fake: Fake, http: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    async with http.post(
        f"{injecting.url}/v1/images/generations", json={"model": "gpt-image-1"}, headers=headers
    ) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == "invalid_api_key"
    assert fake.stats.requests == 0


async def test_sdk_with_a_wrong_key_gets_an_authentication_error(injecting: Gateway) -> None:
    async with openai.AsyncOpenAI(base_url=f"{injecting.url}/v1", api_key="nope") as sdk:
        with pytest.raises(openai.AuthenticationError):
            await sdk.models.list()


async def test_without_an_upstream_key_the_callers_key_passes_through(
    gateway: Gateway, fake: Fake, sdk: openai.AsyncOpenAI
) -> None:
    await sdk.models.list()
    assert _sent_headers(fake)["authorization"] == "Bearer sk-caller"


@pytest.mark.parametrize("mode", ["injecting", "passing through"])
async def test_keys_that_differ_in_two_headers_are_a_401(
    gateway_factory: GatewayFactory, fake: Fake, http: aiohttp.ClientSession, mode: str
) -> None:
    """A bearer key and another in `x-api-key`: one would be charged here, the other billed."""
    auth = {"client_key_sha256": [key_digest(CLIENT_KEY)], "upstream_api_key": "sk-UPSTREAM"}
    gateway = await gateway_factory(auth=auth if mode == "injecting" else {})
    headers = {"Authorization": f"Bearer {CLIENT_KEY}", "x-api-key": "sk-someone-else"}
    body = {"model": "gpt-image-1", "prompt": "x"}
    async with http.post(
        f"{gateway.url}/v1/images/generations", json=body, headers=headers
    ) as resp:
        assert resp.status == 401
        assert "two different API keys" in (await resp.json())["error"]["message"]
    assert fake.stats.requests == 0


@pytest.mark.parametrize("mode", ["injecting", "passing through"])
async def test_a_second_authorization_header_with_another_key_is_a_401(
    gateway_factory: GatewayFactory, fake: Fake, http: aiohttp.ClientSession, mode: str
) -> None:
    """The gateway must not charge one key while the upstream (which may read the last header)
    bills another; the same key twice is only untidy."""
    auth = {"client_key_sha256": [key_digest(CLIENT_KEY)], "upstream_api_key": "sk-UPSTREAM"}
    gateway = await gateway_factory(auth=auth if mode == "injecting" else {})
    url = f"{gateway.url}/v1/images/generations"
    body = {"model": "gpt-image-1", "prompt": "x"}
    two = CIMultiDict([("Authorization", f"Bearer {CLIENT_KEY}"), ("Authorization", "Bearer x")])
    async with http.post(url, json=body, headers=two) as resp:
        assert resp.status == 401
        assert "two different API keys" in (await resp.json())["error"]["message"]
    assert fake.stats.requests == 0
    same = CIMultiDict([("Authorization", f"Bearer {CLIENT_KEY}")] * 2)
    async with http.post(url, json=body, headers=same) as resp:
        assert resp.status == 200


@pytest.mark.parametrize("mode", ["injecting", "passing through"])
@pytest.mark.parametrize("other", ["Basic dXNlcjpwYXNz", "Token sk-someone-else"])
async def test_another_scheme_beside_a_bearer_key_is_a_401(
    gateway_factory: GatewayFactory, fake: Fake, http: aiohttp.ClientSession, mode: str, other: str
) -> None:
    """`Authorization: Basic ...` or `Token ...` is a credential too: passed through beside a
    bearer key, the upstream could bill it while the gateway counts the bearer."""
    auth = {"client_key_sha256": [key_digest(CLIENT_KEY)], "upstream_api_key": "sk-UPSTREAM"}
    gateway = await gateway_factory(auth=auth if mode == "injecting" else {})
    two = CIMultiDict([("Authorization", f"Bearer {CLIENT_KEY}"), ("Authorization", other)])
    body = {"model": "gpt-image-1", "prompt": "x"}
    async with http.post(f"{gateway.url}/v1/images/generations", json=body, headers=two) as resp:
        assert resp.status == 401
        assert "two different API keys" in (await resp.json())["error"]["message"]
    assert fake.stats.requests == 0


async def test_another_scheme_alone_passes_through(
    gateway: Gateway, fake: Fake, http: aiohttp.ClientSession
) -> None:
    """Passing through, the upstream judges a lone `Basic` credential, not the gateway."""
    headers = {"Authorization": "Basic dXNlcjpwYXNz"}
    async with http.get(f"{gateway.url}/v1/models", headers=headers) as resp:
        assert resp.status == 200
    assert _sent_headers(fake)["authorization"] == "Basic dXNlcjpwYXNz"


async def test_a_named_clients_keys_are_accepted_and_only_the_upstream_key_goes_on(
    gateway_factory: GatewayFactory, fake: Fake
) -> None:
    # Keys listed under [clients.<name>] alone are enough for key-injection mode.
    gateway = await gateway_factory(
        auth={"upstream_api_key": "sk-UPSTREAM"},
        clients={"design": {"key_sha256": [key_digest(CLIENT_KEY)]}},
    )
    async with openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=CLIENT_KEY) as sdk:
        assert (await sdk.images.generate(model="gpt-image-1", prompt="x")).data
        with pytest.raises(openai.AuthenticationError):
            await sdk.with_options(api_key="gw-someone-else", max_retries=0).images.generate(
                model="gpt-image-1", prompt="x"
            )
    assert _sent_headers(fake)["authorization"] == "Bearer sk-UPSTREAM"
    assert fake.stats.requests == 1
