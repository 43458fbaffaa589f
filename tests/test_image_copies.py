"""Answers kept for retries and `/result` (24 h) outlive the image URLs they hold (Flux's live
10 minutes): the images are copied into the results store as the task ends, and the kept answer
points at the gateway's copy, fetched from allowed hosts only, within a timeout and a size cap."""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from gateway.fake import png
from gateway.tasks.service import TASKS
from tests import test_results_s3
from tests.conftest import Fake, Gateway, GatewayFactory
from tests.helpers import KEY
from tests.procs import free_port

# S3 from moto's server, as test_results_s3 runs it.
moto_server = test_results_s3.moto_server
s3 = test_results_s3.s3

IMAGE_BYTES = 64 * 1024  # the `fake` fixture's image size
URL_IMAGE = {"model": "flux-kontext-pro", "prompt": "a lighthouse", "response_format": "url"}


def _tasks(tmp_path: Path, **keys: Any) -> dict[str, Any]:
    """[tasks] with a results store, fetching from the stand-in on 127.0.0.1."""
    return {
        "results_url": f"file://{tmp_path}/results",
        "image_fetch_hosts": ["127.0.0.1"],
        "image_fetch_private": True,
        **keys,
    }


async def _kept_answer(
    http: aiohttp.ClientSession, gateway: Gateway, headers: dict[str, str] | None = None
) -> tuple[dict[str, Any], str | None]:
    """An async task's kept answer, read from `/result` once the task has ended, and its
    `x-gateway-image-copy`."""
    async with http.post(
        f"{gateway.url}/v1/images/generations",
        json=URL_IMAGE,
        headers={**KEY, **(headers or {}), "Prefer": "respond-async"},
    ) as resp:
        assert resp.status == 202, await resp.text()
        task = gateway.url + resp.headers["Location"]
    async with http.get(f"{task}/result", headers={**KEY, "Prefer": "wait=30"}) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json(), resp.headers.get("x-gateway-image-copy")


async def _forget(http: aiohttp.ClientSession, fake: Fake) -> None:
    """The upstream's links expire."""
    async with http.post(f"{fake.url}/_fake/images/forget") as resp:
        assert resp.status == 200


async def _image(http: aiohttp.ClientSession, url: str) -> tuple[int, bytes, str]:
    """GET an image as a browser would: no Authorization."""
    async with http.get(url) as resp:
        return resp.status, await resp.read(), resp.content_type


async def test_an_async_tasks_url_image_is_served_by_the_gateway_after_the_upstream_forgot_it(
    gateway_factory: GatewayFactory,
    fake: Fake,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    store: dict[str, Any],
) -> None:
    gateway = await gateway_factory(tasks={**store, **_tasks(tmp_path)})
    answer, copy = await _kept_answer(http, gateway)
    assert copy == "copied"
    url = answer["data"][0]["url"]
    assert url.startswith("/v1/files/img_"), url
    assert url.endswith(".png"), url
    await _forget(http, fake)
    status, body, content_type = await _image(http, gateway.url + url)
    assert (status, content_type) == (200, "image/png")
    assert body == png(IMAGE_BYTES)
    assert gateway.sample("gateway_image_copies_total", outcome="copied") == 1


async def test_a_keyed_sync_calls_retry_gets_the_gateways_copy_at_the_configured_address(
    gateway_factory: GatewayFactory, fake: Fake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    base = "https://images-gw.example.com/"
    gateway = await gateway_factory(tasks=_tasks(tmp_path, image_base_url=base))
    keyed = {**KEY, "Idempotency-Key": secrets.token_hex(8)}
    body = {**URL_IMAGE, "n": 2}
    async with http.post(f"{gateway.url}/v1/images/generations", json=body, headers=keyed) as resp:
        assert resp.status == 200
        first = await resp.json()
    await _forget(http, fake)
    async with http.post(f"{gateway.url}/v1/images/generations", json=body, headers=keyed) as resp:
        assert resp.headers["Idempotent-Replayed"] == "true"
        assert resp.headers["x-gateway-image-copy"] == "copied"
        retried = await resp.json()
    urls = [item["url"] for item in retried["data"]]
    assert urls == [item["url"] for item in first["data"]]
    assert len(set(urls)) == 2  # each image its own copy
    for url in urls:
        assert url.startswith("https://images-gw.example.com/v1/files/img_"), url
        path = url.removeprefix("https://images-gw.example.com")
        assert await _image(http, gateway.url + path) == (200, png(IMAGE_BYTES), "image/png")
    assert retried["usage"] == first["usage"]  # the rest of the answer as it came


async def test_an_openai_sdk_call_gets_a_url_that_outlives_the_upstreams(
    gateway_factory: GatewayFactory, fake: Fake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """The SDK's calls run once as tasks (so its retries attach): what it gets is the kept
    answer, an absolute URL on the gateway's configured address."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    tasks = _tasks(tmp_path, image_base_url=base)
    gateway = await gateway_factory(server={"port": port}, tasks=tasks)
    async with openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="sk-caller") as sdk:
        result = await sdk.images.generate(
            model="gpt-image-1", prompt="a lighthouse", response_format="url"
        )
    assert result.data is not None
    url = result.data[0].url
    assert url is not None
    assert url.startswith(f"{base}/v1/files/img_"), url
    await _forget(http, fake)
    assert await _image(http, url) == (200, png(IMAGE_BYTES), "image/png")


@pytest.mark.parametrize(
    ("hosts", "private", "outcome"),
    [
        (["images.example.com"], True, "refused"),  # not on the allow-list
        (["127.0.0.1"], False, "refused"),  # loopback, not allowed explicitly
    ],
)
async def test_an_image_the_gateway_may_not_fetch_is_not_fetched_and_the_answer_says_so(
    gateway_factory: GatewayFactory,
    fake: Fake,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    hosts: list[str],
    private: bool,
    outcome: str,
) -> None:
    tasks = _tasks(tmp_path, image_fetch_hosts=hosts, image_fetch_private=private)
    gateway = await gateway_factory(tasks=tasks)
    answer, copy = await _kept_answer(http, gateway)
    assert copy == "failed"
    assert answer["data"][0]["url"].startswith(f"{fake.url}/_fake/images/")  # as it came
    assert not [path for path in fake.stats.by_path if path.startswith("/_fake/images/")]
    assert gateway.sample("gateway_image_copies_total", outcome=outcome) == 1


async def test_a_name_resolving_to_loopback_is_refused(
    gateway_factory: GatewayFactory, fake: Fake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """The address a name resolves to is checked where the connection is made."""
    upstream = fake.url.replace("127.0.0.1", "localhost") + "/v1"
    tasks = _tasks(tmp_path, image_fetch_hosts=["localhost"], image_fetch_private=False)
    gateway = await gateway_factory(upstream, tasks=tasks)
    answer, copy = await _kept_answer(http, gateway)
    assert copy == "failed"
    assert answer["data"][0]["url"].startswith(upstream.removesuffix("/v1"))
    assert not [path for path in fake.stats.by_path if path.startswith("/_fake/images/")]
    assert gateway.sample("gateway_image_copies_total", outcome="refused") == 1


async def test_a_redirect_off_the_allow_list_is_not_followed(
    gateway_factory: GatewayFactory, fake: Fake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    gateway = await gateway_factory(tasks=_tasks(tmp_path))
    elsewhere = fake.url.replace("127.0.0.1", "localhost") + "/_fake/stats"
    _, copy = await _kept_answer(http, gateway, {"X-Fake-Image-Redirect": elsewhere})
    assert copy == "failed"
    assert "/_fake/stats" not in fake.stats.by_path
    assert gateway.sample("gateway_image_copies_total", outcome="refused") == 1


async def test_a_redirect_on_the_allow_list_is_followed(
    gateway_factory: GatewayFactory, fake: Fake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    gateway = await gateway_factory(tasks=_tasks(tmp_path))
    async with http.post(f"{fake.url}/v1/images/generations", json=URL_IMAGE) as resp:
        there = (await resp.json())["data"][0]["url"]  # an image the stand-in hosts
    answer, copy = await _kept_answer(http, gateway, {"X-Fake-Image-Redirect": there})
    assert copy == "copied"
    assert await _image(http, gateway.url + answer["data"][0]["url"]) == (
        200,
        png(IMAGE_BYTES),
        "image/png",
    )


@pytest.mark.parametrize(
    ("tasks", "headers", "outcome"),
    [
        ({"image_fetch_max_bytes": len(png(IMAGE_BYTES)) - 1}, {}, "too_large"),
        ({"image_fetch_timeout_s": 0.5}, {"X-Fake-Image-Delay": "5"}, "timeout"),
    ],
)
async def test_a_failed_copy_keeps_the_original_answer_and_says_so(
    gateway_factory: GatewayFactory,
    fake: Fake,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    tasks: dict[str, Any],
    headers: dict[str, str],
    outcome: str,
) -> None:
    gateway = await gateway_factory(tasks=_tasks(tmp_path, **tasks))
    with caplog.at_level(logging.WARNING, "gateway.tasks.images"):
        answer, copy = await _kept_answer(http, gateway, headers)
    assert copy == "failed"
    url = answer["data"][0]["url"]
    assert url.startswith(f"{fake.url}/_fake/images/")
    assert gateway.sample("gateway_image_copies_total", outcome=outcome) == 1
    assert f"image copy failed ({outcome})" in caplog.text
    assert not list((tmp_path / "results").glob("img_*"))  # nothing half-copied left
    if outcome == "too_large":  # the upstream's own link still works while it lives
        assert await _image(http, url) == (200, png(IMAGE_BYTES), "image/png")


async def test_an_unknown_file_id_is_404_and_never_goes_upstream(
    gateway_factory: GatewayFactory, fake: Fake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    gateway = await gateway_factory(tasks=_tasks(tmp_path))
    await _kept_answer(http, gateway)  # a copy exists, just not this one
    requests = fake.stats.requests
    status, body, content_type = await _image(
        http, f"{gateway.url}/v1/files/img_{secrets.token_hex(16)}.png"
    )
    assert (status, content_type) == (404, "application/json")
    assert b'"error"' in body
    assert fake.stats.requests == requests


async def test_without_a_results_store_the_kept_answer_keeps_the_upstreams_urls(
    gateway_factory: GatewayFactory, fake: Fake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    tasks = _tasks(tmp_path)
    del tasks["results_url"]
    gateway = await gateway_factory(tasks=tasks)
    answer, copy = await _kept_answer(http, gateway)
    assert copy is None
    assert answer["data"][0]["url"].startswith(f"{fake.url}/_fake/images/")


async def test_a_plain_call_is_passed_through_untouched(
    gateway_factory: GatewayFactory, fake: Fake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    gateway = await gateway_factory(tasks=_tasks(tmp_path))
    async with http.post(
        f"{gateway.url}/v1/images/generations", json=URL_IMAGE, headers=KEY
    ) as resp:
        assert "x-gateway-image-copy" not in resp.headers
        assert (await resp.json())["data"][0]["url"].startswith(f"{fake.url}/_fake/images/")
    assert not list((tmp_path / "results").glob("img_*"))


async def _copied(gateway: Gateway, fake: Fake, http: aiohttp.ClientSession) -> str:
    """A task's image copied and served after the upstream forgot it; the copy's path."""
    answer, copy = await _kept_answer(http, gateway)
    assert copy == "copied"
    path = str(answer["data"][0]["url"])
    await _forget(http, fake)
    assert await _image(http, gateway.url + path) == (200, png(IMAGE_BYTES), "image/png")
    return path


async def _swept(gateway: Gateway, http: aiohttp.ClientSession, path: str) -> None:
    """The copy goes with its retention, as the results it sits beside do."""
    results = gateway.app[TASKS].results
    assert results is not None
    assert await results.sweep(older_than_s=3600) == 0
    assert await results.sweep(older_than_s=0) == 1
    status, _, _ = await _image(http, gateway.url + path)
    assert status == 404


async def test_a_copy_lives_in_a_results_directory_and_goes_with_its_retention(
    gateway_factory: GatewayFactory, fake: Fake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    gateway = await gateway_factory(tasks=_tasks(tmp_path))
    path = await _copied(gateway, fake, http)
    results = tmp_path / "results"
    assert [file.name for file in results.iterdir()] == [path.removeprefix("/v1/files/")]
    await _swept(gateway, http, path)
    assert not list(results.iterdir())


async def test_a_copy_lives_in_s3_and_goes_with_its_retention(
    gateway_factory: GatewayFactory,
    fake: Fake,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    s3: test_results_s3.S3,
) -> None:
    gateway = await gateway_factory(tasks={**_tasks(tmp_path), "results_url": s3.url("gw")})
    path = await _copied(gateway, fake, http)
    key = f"gw/{path.removeprefix('/v1/files/')}"
    assert await s3.keys() == [key]
    assert await s3.size(key) == len(png(IMAGE_BYTES))
    await _swept(gateway, http, path)
    assert await s3.keys() == []
