"""The trust boundary, attacked as a hostile caller would: raw bytes over a socket, and an
upstream that records every request line and header it receives.

The gateway holds the organisation's APIYI key, so what must hold is: nothing leaves except to
the configured origin with a checked path, and no caller credential reaches the upstream.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import redis.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.auth import key_digest
from gateway.errors import BadRequest
from gateway.target import check_target
from gateway.upstream import Origin, OriginMoved
from tests.capture import CaptureServer, raw_request
from tests.conftest import Fake, Gateway, GatewayFactory, Spawn
from tests.procs import free_port
from tests.redis_server import RedisServer

KEY_A = "gw-tenant-a-0123456789"
KEY_B = "gw-tenant-b-0123456789"
UPSTREAM_KEY = "sk-THE-ORGANISATIONS-APIYI-KEY"
GENERATE = b'{"model": "gpt-image-1", "prompt": "a lighthouse"}'


@pytest.fixture
async def capture() -> AsyncIterator[CaptureServer]:
    server = CaptureServer()
    await server.start()
    yield server
    await server.close()


def _injecting(keys: tuple[str, ...] = (KEY_A, KEY_B)) -> dict[str, Any]:
    return {
        "client_key_sha256": [key_digest(k) for k in keys],
        "upstream_api_key": UPSTREAM_KEY,
    }


@pytest.fixture
async def guarded(gateway_factory: GatewayFactory, capture: CaptureServer) -> Gateway:
    """Key injection in front of the capturing upstream."""
    return await gateway_factory(f"{capture.url}/v1", auth=_injecting())


def _post(target: bytes, *headers: bytes, body: bytes = GENERATE) -> bytes:
    return b"\r\n".join(
        [
            b"POST " + target + b" HTTP/1.1",
            b"Host: gateway",
            b"Authorization: Bearer " + KEY_A.encode(),
            b"Content-Type: application/json",
            b"Content-Length: %d" % len(body),
            *headers,
        ]
    )


async def _submit(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str], path: str = ""
) -> aiohttp.ClientResponse:
    """An async generation call (`Prefer: respond-async`); the answer, read."""
    async with http.post(
        f"{url}/v1/images/generations{path}",
        data=GENERATE,
        headers={"Content-Type": "application/json", "Prefer": "respond-async", **headers},
    ) as resp:
        await resp.read()
        return resp


def _assert_only_checked_requests_left(capture: CaptureServer) -> None:
    for sent in capture.requests:
        check_target(sent.target)  # a path the gateway would let through, nothing else
        assert sent.header("Host") == [capture.url.removeprefix("http://")]
        assert sent.header("Authorization") == [f"Bearer {UPSTREAM_KEY}"]


ABSOLUTE_FORM = [
    b"pany://x/v1/images/generations",
    b"http://127.0.0.1:1/v1/images/generations",
    b"https://evil.example/v1/images/generations",
    b"HTTP://evil.example/v1/models",
    b"//evil.example/v1/images/generations",
]
TRAVERSAL = [
    b"/v1/../admin",
    b"/v1/./images/generations",
    b"/v1/%2e%2e/admin",
    b"/v1/%2E%2e/admin",
    b"/v1beta/..%2fadmin",
    b"/v1/images%2f..%2f..%2fadmin",
    b"/v1/%252e%252e/admin",
    b"/v1/..;/admin",
    b"/v1/images\\..\\admin",
    b"/v1/images%5c..%5cadmin",
    b"/v1/a%00b",
    b"/v1/a%0aX-Injected:%20yes",
    # Dots to lenient decoders: overlong UTF-8, fullwidth, trailing spaces (IIS), three dots.
    b"/v1/%c0%ae%c0%ae/admin",
    b"/v1/%e0%80%ae%e0%80%ae/admin",
    b"/v1/%ef%bc%8e%ef%bc%8e/admin",
    b"/v1/..%20/admin",
    b"/v1/.../admin",
]


@pytest.mark.parametrize("target", ABSOLUTE_FORM + TRAVERSAL)
@pytest.mark.parametrize("prefer", [b"X-Nothing: 1", b"Prefer: respond-async"])
async def test_targets_that_could_move_the_call_never_leave(
    guarded: Gateway, capture: CaptureServer, target: bytes, prefer: bytes
) -> None:
    status, answer = await raw_request(guarded.url, _post(target, prefer), GENERATE)
    # A 400 from the gateway's checks, or a 404 where aiohttp's router does not match at all
    # (a raw line break in a decoded path): either way an OpenAI-shaped refusal, sent nowhere.
    assert status in (400, 404), answer[:200]
    assert b'"error"' in answer
    await asyncio.sleep(0.2)  # a worker would have picked up a task by now
    assert capture.requests == []


@pytest.mark.parametrize("method", [b"TRACE", b"PROPFIND", b"MKCOL", b"BREW", b"CONNECT"])
async def test_methods_outside_the_api_never_leave(
    guarded: Gateway, capture: CaptureServer, method: bytes
) -> None:
    head = _post(b"/v1/images/generations").replace(b"POST", method, 1)
    status, answer = await raw_request(guarded.url, head, GENERATE)
    if method in (b"BREW", b"CONNECT"):
        # aiohttp's parser refuses a method it does not know, and CONNECT names no path.
        assert status in (400, 404), answer[:200]
    else:
        assert status == 405, answer[:200]
        assert b"Allow: DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT" in answer
        assert b'"code":"method_not_allowed"' in answer
    assert capture.requests == []


async def test_no_caller_credential_in_any_form_reaches_the_upstream(
    guarded: Gateway, capture: CaptureServer
) -> None:
    # `key` however spelt: `%6Bey` and `KEY` too, and after a `;` as some servers split there.
    query = f"key={KEY_A}&%6Bey={KEY_A}&keep=1&KEY={KEY_A}&x=1;k%65y={KEY_A}&key%3D=y"
    head = _post(
        f"/v1/images/generations?{query}".encode(),
        b"x-goog-api-key: " + KEY_A.encode(),
        b"api-key: " + KEY_A.encode(),
        b"X-Api-Key: " + KEY_A.encode(),
        b"Cookie: session=abc",
    )
    status, _ = await raw_request(guarded.url, head, GENERATE)
    assert status == 200
    [sent] = capture.requests
    _assert_only_checked_requests_left(capture)
    assert KEY_A not in sent.target
    # Other query parameters go on byte for byte (`key=` is another name).
    assert sent.target == "/v1/images/generations?keep=1&x=1&key%3D=y"
    for name in ("x-goog-api-key", "api-key", "x-api-key", "cookie"):
        assert sent.header(name) == []
    assert all(KEY_A not in value for _, value in sent.headers)
    assert sent.body == GENERATE


async def test_a_key_in_the_query_alone_is_a_credential(
    guarded: Gateway, capture: CaptureServer
) -> None:
    # google-genai style: `?key=`; the key is checked, then stripped.
    body = b'{"contents": []}'
    target = f"/v1beta/models/gemini-2.5-flash-image:generateContent?key={KEY_B}".encode()
    head = b"POST " + target + b" HTTP/1.1\r\nHost: g\r\nContent-Length: %d" % len(body)
    assert (await raw_request(guarded.url, head, body))[0] == 200
    [sent] = capture.requests
    assert sent.target == "/v1beta/models/gemini-2.5-flash-image:generateContent"
    _assert_only_checked_requests_left(capture)


async def test_two_different_keys_in_one_request_are_refused(
    guarded: Gateway, capture: CaptureServer
) -> None:
    # `Connection: Authorization` once made the checked key and the owning key differ.
    head = _post(
        b"/v1/images/generations",
        b"Connection: Authorization",
        b"x-goog-api-key: " + KEY_B.encode(),
    )
    status, answer = await raw_request(guarded.url, head, GENERATE)
    assert status == 401, answer[:200]
    assert capture.requests == []


async def test_a_revoked_key_loses_its_tasks(
    gateway_factory: GatewayFactory, redis_server: RedisServer, http: aiohttp.ClientSession
) -> None:
    tasks = {"redis_url": redis_server.url, "key_prefix": f"sec-{uuid.uuid4().hex[:8]}"}
    before = await gateway_factory(auth=_injecting(), tasks=tasks)
    resp = await _submit(http, before.url, {"Authorization": f"Bearer {KEY_A}"})
    assert resp.status == 202
    location = resp.headers["Location"]
    # The same store, with KEY_A taken out of the config.
    after = await gateway_factory(auth=_injecting((KEY_B,)), tasks=tasks)
    for headers in (
        {"Authorization": f"Bearer {KEY_A}"},
        {"Authorization": f"Bearer {KEY_A}", "Connection": "Authorization", "api-key": KEY_B},
    ):
        for path in (location, f"{location}/result", f"{location}/events"):
            async with http.get(after.url + path, headers=headers) as resp:
                assert resp.status == 401, path
    async with http.get(after.url + location, headers={"Authorization": f"Bearer {KEY_B}"}) as r:
        assert r.status == 404  # another tenant's task does not exist for KEY_B
    async with http.get(before.url + location, headers={"Authorization": f"Bearer {KEY_A}"}) as r:
        assert r.status == 200  # where the key is still configured, the owner still sees it


async def test_a_deadline_gone_before_sending_is_a_retry_safe_408(
    guarded: Gateway, capture: CaptureServer
) -> None:
    status, answer = await raw_request(
        guarded.url, _post(b"/v1/images/generations", b"X-Request-Timeout: 1e-300"), GENERATE
    )
    assert status == 408, answer[:200]
    assert b"x-should-retry: true" in answer
    assert b'"code":"request_timeout"' in answer
    status, answer = await raw_request(
        guarded.url,
        _post(b"/v1/images/generations", b"X-Request-Timeout: 1e-300", b"Prefer: respond-async"),
        GENERATE,
    )
    assert status == 400, answer[:200]  # no task that could never run is accepted
    await asyncio.sleep(0.2)
    assert capture.requests == []


async def test_a_last_event_id_outside_redis_id_space_is_a_400(
    gateway_factory: GatewayFactory, store: dict[str, Any], http: aiohttp.ClientSession
) -> None:
    gateway = await gateway_factory(tasks=store)
    location = (await _submit(http, gateway.url, {"Authorization": f"Bearer {KEY_A}"})).headers[
        "Location"
    ]
    port = gateway.url.rsplit(":", 1)[1]
    for bad in (
        "99999999999999999999-0",
        "0-18446744073709551616",
        "18446744073709551616",
        "18446744073709551615-18446744073709551615",  # the largest: no id comes after it
        "\u0661-\u0661",  # Arabic-Indic digits are digits to `\\d`, not to Redis
    ):
        head = (
            (
                f"GET {location}/events HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer {KEY_A}\r\n"
            ).encode()
            + b"Last-Event-ID: "
            + bad.encode()
        )
        status, answer = await raw_request(f"http://127.0.0.1:{port}", head)
        assert status == 400, (bad, answer[:300])
        assert b'"type":"invalid_request_error"' in answer


async def test_queued_tasks_hold_no_credential_in_the_store(
    gateway_factory: GatewayFactory,
    redis_server: RedisServer,
    capture: CaptureServer,
    http: aiohttp.ClientSession,
) -> None:
    # No workers here: the task waits in Redis, where an operator with a dump could read it.
    tasks = {"redis_url": redis_server.url, "key_prefix": f"sec-{uuid.uuid4().hex[:8]}"}
    gateway = await gateway_factory(
        f"{capture.url}/v1", auth=_injecting(), tasks={**tasks, "workers": 0}
    )
    auth = {"Authorization": f"Bearer {KEY_A}", "api-key": KEY_A}
    assert (await _submit(http, gateway.url, auth, path=f"?key={KEY_A}")).status == 202
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        values = [
            await _stored_text(client, key)
            async for key in client.scan_iter(f"{tasks['key_prefix']}:*")
        ]
    finally:
        await client.aclose()
    assert any("images/generations" in value for value in values)  # the job is there
    for value in values:
        assert UPSTREAM_KEY not in value
        assert KEY_A not in value
    # A worker (a second replica on the same Redis) adds the gateway's key when it sends.
    await gateway_factory(f"{capture.url}/v1", auth=_injecting(), tasks=tasks)
    for _ in range(200):
        if capture.requests:
            break
        await asyncio.sleep(0.02)
    _assert_only_checked_requests_left(capture)
    assert [sent.target for sent in capture.requests] == ["/v1/images/generations"]


async def _stored_text(client: redis.asyncio.Redis, key: bytes) -> str:
    """Everything a key holds, whatever its type, as text to search (bytes as their repr)."""
    readers: dict[bytes, Callable[[bytes], Awaitable[Any]]] = {
        b"string": client.get,
        b"hash": client.hgetall,
        b"stream": client.xrange,
        b"zset": lambda k: client.zrange(k, 0, -1),
        b"list": lambda k: client.lrange(k, 0, -1),
    }
    kind: Any = await client.type(key)
    return repr(await readers[kind](key))


async def test_a_callers_tasks_share_its_cap_on_the_pool(
    gateway_factory: GatewayFactory, fake: Fake, http: aiohttp.ClientSession
) -> None:
    # One call per caller at once (4 x 0.25): its tasks cannot take the pool its sync calls
    # may not.
    gateway = await gateway_factory(upstream={"pool_size": 4, "credential_share": 0.25})
    for _ in range(3):
        auth = {"Authorization": "Bearer sk-greedy", "X-Fake-Latency": "1"}
        assert (await _submit(http, gateway.url, auth)).status == 202
    await fake.until_running(1)
    await asyncio.sleep(0.3)
    assert fake.stats.running == 1  # the other two wait their turn, queued
    async with http.get(
        f"{gateway.url}/v1/models", headers={"Authorization": "Bearer sk-other"}
    ) as resp:
        assert resp.status == 200


async def test_the_start_up_log_shows_no_secret_of_the_upstream_url(
    spawn: Spawn, fake: Fake
) -> None:
    host = fake.url.removeprefix("http://")
    proc, _ = await spawn(f'[upstream]\nurl = "http://ops:PASSWORD1@{host}/v1?key=QUERYKEY1"\n')
    await asyncio.sleep(0.2)
    log = proc.output()
    assert f"upstream http://{host}/v1" in log
    assert "PASSWORD1" not in log
    assert "QUERYKEY1" not in log


async def test_upstream_failures_name_neither_its_host_nor_its_key(
    gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    port = free_port()  # nothing listens there
    gateway = await gateway_factory(f"http://127.0.0.1:{port}/v1", auth=_injecting())
    async with http.post(
        f"{gateway.url}/v1/images/generations",
        data=GENERATE,
        headers={"Authorization": f"Bearer {KEY_A}", "Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 502
        text = await resp.text()
    assert "Connection refused" in text
    for secret in (str(port), "127.0.0.1", UPSTREAM_KEY):
        assert secret not in text


async def test_trickling_uploaders_do_not_hold_the_upstream_pool(
    gateway_factory: GatewayFactory, fake: Fake, http: aiohttp.ClientSession
) -> None:
    pool = 4
    gateway = await gateway_factory(upstream={"pool_size": pool})
    port = int(gateway.url.rsplit(":", 1)[1])

    async def trickle(i: int) -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /v1/images/generations HTTP/1.1\r\nHost: g\r\n"
            b"Authorization: Bearer sk-trickler-%d\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000\r\n\r\n{" % i
        )
        for _ in range(20):  # bounded: a byte every 0.2 s for 4 s, then hang up
            await asyncio.sleep(0.2)
            writer.write(b" ")
            await writer.drain()
        writer.close()

    tricklers = [asyncio.create_task(trickle(i)) for i in range(pool + 10)]
    await asyncio.sleep(1.0)  # every trickler is mid-body
    for path in ("/v1/models", "/v1/images/generations"):
        started = time.monotonic()
        async with (
            http.post(
                gateway.url + path,
                data=GENERATE,
                headers={"Authorization": "Bearer sk-small", "Content-Type": "application/json"},
            )
            if path.endswith("generations")
            else http.get(gateway.url + path, headers={"Authorization": "Bearer sk-small"}) as resp
        ):
            assert resp.status == 200
            await resp.read()
        assert time.monotonic() - started < 1.0, path
    assert fake.stats.requests == 2  # no trickler's half body went upstream
    await asyncio.gather(*tricklers)


async def test_a_body_that_stalls_gets_408_and_nothing_is_sent(
    gateway_factory: GatewayFactory, fake: Fake
) -> None:
    gateway = await gateway_factory(server={"body_read_timeout_s": 0.5})
    head = b"POST /v1/images/generations HTTP/1.1\r\nHost: g\r\nContent-Length: 100"
    started = time.monotonic()
    status, answer = await raw_request(gateway.url, head, b'{"model": ')
    assert status == 408, answer[:200]
    assert time.monotonic() - started < 2
    assert fake.stats.requests == 0


async def test_one_credential_cannot_take_the_whole_pool(
    gateway_factory: GatewayFactory, fake: Fake, http: aiohttp.ClientSession
) -> None:
    gateway = await gateway_factory(upstream={"pool_size": 4, "credential_share": 0.5})

    async def call(key: str) -> tuple[int, dict[str, str]]:
        async with http.post(
            f"{gateway.url}/v1/images/generations",
            data=GENERATE,
            headers={
                "Authorization": f"Bearer {key}",
                "Content-Type": "application/json",
                "X-Fake-Latency": "1",
            },
        ) as resp:
            await resp.read()
            return resp.status, dict(resp.headers)

    flood = [asyncio.create_task(call("sk-greedy")) for _ in range(2)]
    await fake.until_running(2)
    status, headers = await call("sk-greedy")  # a third at once: over its share
    assert status == 429
    assert headers["Retry-After"] == "1"
    assert headers["x-should-retry"] == "true"
    assert (await call("sk-other"))[0] == 200  # the rest of the pool is still there
    assert [s for s, _ in await asyncio.gather(*flood)] == [200, 200]


async def test_logs_cannot_be_forged_and_hold_no_secret(spawn: Spawn, fake: Fake) -> None:
    config = (
        f'[upstream]\nurl = "{fake.url}/v1"\n[auth]\nclient_key_sha256 = ["{key_digest(KEY_A)}"]\n'
    )
    proc, url = await spawn(config, {"GATEWAY_UPSTREAM_API_KEY": UPSTREAM_KEY})
    forged = b"FORGED-LINE%20status=200"
    model_body = b'{"model": "gpt\\nFORGED-LINE status=200\\u2028x", "prompt": "p"}'
    bad_header = b"sk-SECRET-IN-A-BAD-HEADER"
    attacks = [
        (_post(b"/v1/x%0a" + forged), GENERATE),
        (_post(b"/v1/x%0d%0a" + forged), GENERATE),
        (_post(b"/nowhere%0a" + forged), GENERATE),
        (_post(b"/v1/tasks/task_%00%0a" + forged), GENERATE),
        (_post(b"/v1/images/generations", body=model_body), model_body),
        # Malformed header lines carrying a key: the parser's complaint must not quote them.
        (_post(b"/v1/models", b"X-Bad: " + bad_header + b"\x01"), GENERATE),
        (b"GET /v1/models HTTP/1.1\r\nAuthorization: Bearer " + bad_header + b"\x7f\x00", b""),
    ]
    for head, body in attacks:
        await raw_request(url, head, body)
    await asyncio.sleep(0.3)
    log = proc.output()
    lines = log.splitlines()
    assert not any(line.startswith("FORGED") for line in lines), log
    assert "\x00" not in log
    for secret in ("sk-SECRET-IN-A-BAD-HEADER", KEY_A, UPSTREAM_KEY):
        assert secret not in log
    assert "bad request from a client" in log  # the malformed ones were seen, and said so


async def test_json_access_lines_stay_valid_json(spawn: Spawn, fake: Fake) -> None:
    proc, url = await spawn(
        f'[server]\naccess_log_json = true\n[upstream]\nurl = "{fake.url}/v1"\n'
    )
    for target in (b"/v1/x%0a%22%7d", b"/v1/%ed%a0%80", b"/elsewhere%0a", b"/v1/models"):
        await raw_request(url, b"GET " + target + b" HTTP/1.1\r\nHost: g")
    await asyncio.sleep(0.3)
    access = [line for line in proc.output().splitlines() if " gateway.access " in line]
    assert len(access) == 4
    for line in access:
        json.loads(line.split(" gateway.access ", 1)[1])


# --- Fuzz: for any request target, the upstream sees nothing or the configured origin ----------

PIECES = [*"/v1beta.%2eEfF5cC0aA\\;:?#&=@x-_~", "%2e", "%2f", "%5c", "..", "%25", "//", "://"]
TARGET_TEXT = st.lists(st.sampled_from(PIECES), max_size=24).map(
    lambda pieces: "/v1/" + "".join(pieces)
) | st.text(max_size=40)


@settings(max_examples=2000, deadline=None)
@given(target=TARGET_TEXT)
def test_a_checked_target_always_builds_the_configured_origin(target: str) -> None:
    try:
        url = Origin("https://api.apiyi.com/v1").url(target)
    except (BadRequest, OriginMoved):  # refused: nothing is built, nothing is sent
        return
    assert (url.scheme, url.host, url.port) == ("https", "api.apiyi.com", 443)
    assert url.raw_path.startswith(("/v1/", "/v1beta/"))
    assert ".." not in url.path.split("/")


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(target=TARGET_TEXT.map(lambda t: t.encode("utf-8", "replace")))
async def test_any_target_over_a_socket_reaches_only_the_configured_origin(
    guarded: Gateway, capture: CaptureServer, target: bytes
) -> None:
    if not target or any(b in target for b in b" \r\n"):
        target = b"/v1/" + target.replace(b" ", b"").replace(b"\r", b"").replace(b"\n", b"")
    status, _ = await raw_request(guarded.url, _post(target), GENERATE)
    assert status < 500
    _assert_only_checked_requests_left(capture)


async def test_a_request_line_without_a_version_never_leaves(
    guarded: Gateway, capture: CaptureServer
) -> None:
    """`POST /path` and no version reads as HTTP/0.9, whose request has no headers: what
    follows is a smuggled header block, not a client's request."""
    head = _post(b"/v1/images/generations").replace(b" HTTP/1.1", b"", 1)
    _, answer = await raw_request(guarded.url, head, GENERATE)
    assert b" 400 " in answer.split(b"\r\n", 1)[0], answer[:200]
    assert b'"code":"http_version_not_supported"' in answer
    await asyncio.sleep(0.2)
    assert capture.requests == []
