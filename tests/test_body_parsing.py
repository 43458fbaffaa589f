"""What the gateway reads of a caller's body (its model, whether it is JSON) costs time linear
in its size, whatever its shape, and a body it cannot read is a 400 or a plain pass-through,
never a 500."""

from __future__ import annotations

import asyncio
import io
import json
import time
from pathlib import Path

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.sniff import ModelScanner, model_from_body
from tests.conftest import Fake, Gateway, GatewayFactory

MULTIPART = "multipart/form-data; boundary=xyz"
# Pieces a hostile multipart or JSON body is built of: part names, quotes, line ends and blank
# lines in every order, the kind that made a backtracking pattern quadratic.
_PIECES = st.sampled_from(
    [
        b"name=model",
        b'; name="model"',
        b"name=model\r\n",
        b"\r\n",
        b"\r\n\r\n",
        b";",
        b'"',
        b"a",
        b"Content-Type: x\r\n",
        b'"model"',
        b":",
        b" ",
        b'"model": "',
    ]
)


@settings(max_examples=40, deadline=None)
@given(pattern=st.lists(_PIECES, min_size=1, max_size=6))
def test_scanning_any_body_for_its_model_takes_time_linear_in_its_size(
    pattern: list[bytes],
) -> None:
    unit = b"".join(pattern)
    body = unit * (256 * 1024 // len(unit) + 1)
    for content_type in (MULTIPART, "application/octet-stream+json"):
        started = time.process_time()
        model_from_body(content_type, body)
        scanner = ModelScanner(content_type)
        for at in range(0, len(body), 64 * 1024):
            scanner.feed(body[at : at + 64 * 1024])
        seconds_per_kib = (time.process_time() - started) / (len(body) / 1024)
        # Linear scans take microseconds a KiB; the backtracking pattern took 70 ms a KiB at
        # 128 KiB, and more the larger the body.
        assert seconds_per_kib < 0.5e-3, (unit, seconds_per_kib)


def test_the_model_is_found_in_a_part_however_the_body_is_cut() -> None:
    body = (
        b"--xyz\r\n"
        b'Content-Disposition: form-data; name="image"; filename="model"\r\n'
        b"Content-Type: image/png\r\n\r\n" + b"\x89PNG" * 300 + b"\r\n"
        b"--xyz\r\n"
        b'Content-Disposition: form-data; name="model"\r\n'
        b"Content-Type: text/plain\r\n\r\n"
        b"gpt-image-1\r\n"
        b"--xyz--\r\n"
    )
    assert model_from_body(MULTIPART, body) == "gpt-image-1"
    for size in (7, 64, 333):
        scanner = ModelScanner(MULTIPART)
        found = [scanner.feed(body[at : at + size]) for at in range(0, len(body), size)]
        assert "gpt-image-1" in found, size
    # A file named `model` is not the model field.
    assert (
        model_from_body(
            MULTIPART, body.split(b'--xyz\r\nContent-Disposition: form-data; name="model"')[0]
        )
        is None
    )


async def test_a_hostile_multipart_body_does_not_stall_the_replica(
    gateway: Gateway, fake: Fake
) -> None:
    """1 MiB of `name=model` lines held the event loop for minutes: /healthz timed out and
    SIGTERM went unheard. Now other callers are answered throughout."""
    body = b"name=model\r\n" * (1024 * 1024 // 12)
    async with aiohttp.ClientSession() as http:

        async def edit() -> int:
            async with http.post(
                gateway.url + "/v1/images/edits",
                data=body,
                headers={"Content-Type": MULTIPART, "Authorization": "Bearer sk-x"},
            ) as resp:
                await resp.read()
                return resp.status

        call = asyncio.create_task(edit())
        slowest_s = 0.0
        while not call.done():
            started = time.monotonic()
            async with http.get(gateway.url + "/healthz") as resp:
                assert resp.status == 200
            slowest_s = max(slowest_s, time.monotonic() - started)
            await asyncio.sleep(0.02)
        assert await asyncio.wait_for(call, 10) < 500
    assert slowest_s < 1.0


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Prefer": "respond-async"}, 400),
        ({"Idempotency-Key": "deep-1"}, 400),
        ({"x-stainless-retry-count": "0"}, None),  # an SDK call the gateway cannot read: plain
        ({}, None),  # a plain call: forwarded, the upstream says what is wrong with it
    ],
)
async def test_json_nested_past_the_decoders_depth_is_a_400_or_goes_plain(
    gateway: Gateway, fake: Fake, headers: dict[str, str], expected: int | None
) -> None:
    body = b'{"model": "gpt-image-1", "prompt": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            gateway.url + "/v1/images/generations",
            data=body,
            headers={"Content-Type": "application/json", "Authorization": "Bearer sk-x", **headers},
        ) as resp,
    ):
        answer = await resp.read()
    if expected is None:
        assert fake.stats.requests == 1  # it went upstream unchanged, as a direct call would
    else:
        assert resp.status == expected
        assert json.loads(answer)["error"]["message"] == (
            "The request body's JSON is nested too deeply."
        )
        assert fake.stats.requests == 0


async def test_a_keyed_form_of_nothing_but_delimiters_does_not_stall_the_replica(
    gateway_factory: GatewayFactory, fake: Fake, tmp_path: Path
) -> None:
    """A keyed call's form is fingerprinted part by part so its boundary does not count; 24 MB
    of a one-letter boundary's delimiters made 8 million parts, walked in Python, and held the
    event loop for seconds."""
    gateway = await gateway_factory(tasks={"results_url": f"file://{tmp_path}"})
    body = b"--a" * (8 * 2**20) + b"--a--"
    async with aiohttp.ClientSession() as http:

        async def edit() -> int:
            async with http.post(
                gateway.url + "/v1/images/edits",
                data=io.BytesIO(body),
                headers={
                    "Content-Type": "multipart/form-data; boundary=a",
                    "Authorization": "Bearer sk-x",
                    "Idempotency-Key": "many-parts",
                },
            ) as resp:
                await resp.read()
                return resp.status

        call = asyncio.create_task(edit())
        slowest_s = 0.0
        while not call.done():
            # The replica runs in this process: a stall of its event loop is a late wake-up.
            started = time.monotonic()
            await asyncio.sleep(0.02)
            slowest_s = max(slowest_s, time.monotonic() - started)
        assert await asyncio.wait_for(call, 10) < 500
    assert slowest_s < 1.0
