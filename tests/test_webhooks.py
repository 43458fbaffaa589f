"""Signed webhooks (issue 21 item 4): a client's async tasks announce their end to the URL in
its config, signed so that openai-python's `webhooks.unwrap` verifies them, retried until the
receiver takes them, delivered by any replica sharing the Redis."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from gateway.auth import key_digest
from gateway.config import ConfigError, load_config
from tests.conftest import Fake, GatewayFactory, Spawn
from tests.procs import free_port
from tests.redis_server import RedisServer

SECRET = "whsec_" + base64.b64encode(b"webhook signing key, 32 bytes..").decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"another client's signing key...!").decode()
ALPHA, BETA, GAMMA = "sk-alpha-0123", "sk-beta-0123", "sk-gamma-0123"
GENERATE = {"model": "gpt-image-1", "prompt": "a lighthouse at dusk"}
# Short retries: the schedule's shape, in seconds instead of hours.
FAST = {"retry_delays_s": [0.2, 0.2, 0.2, 0.2], "timeout_s": 2.0}
HANG_S = 3.0  # past FAST's timeout_s


class Receiver:
    """A webhook receiver on a real socket: answers each delivery as `script` says in turn
    ("500", "drop" the connection unanswered, "redirect" elsewhere, "hang" past the gateway's
    timeout_s), then 200."""

    def __init__(self, script: list[str] | None = None) -> None:
        self.script = list(script or [])
        self.deliveries: list[tuple[dict[str, str], bytes]] = []
        self.paths: list[str] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hooks/{tail:.*}", self._receive)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}/hooks/in"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _receive(self, request: web.Request) -> web.StreamResponse:
        self.deliveries.append((dict(request.headers), await request.read()))
        self.paths.append(request.path)
        action = self.script.pop(0) if self.script else "200"
        if action == "drop":
            assert request.transport is not None
            request.transport.abort()
            raise ConnectionResetError  # nothing is answered
        if action == "redirect":  # a receiver must not send the gateway's posts elsewhere
            raise web.HTTPTemporaryRedirect("/hooks/elsewhere")
        if action == "hang":
            await asyncio.sleep(HANG_S)  # the gateway gave up meanwhile
            action = "200"
        return web.Response(status=int(action))

    async def until(self, count: int, within_s: float = 15.0) -> None:
        deadline = time.monotonic() + within_s
        while len(self.deliveries) < count:
            assert time.monotonic() < deadline, f"{len(self.deliveries)} deliveries, not {count}"
            await asyncio.sleep(0.02)

    def events(self, secret: str = SECRET) -> list[Any]:
        """Every delivery, verified and parsed by the OpenAI SDK, unchanged."""
        sdk = openai.OpenAI(api_key="unused")
        return [
            sdk.webhooks.unwrap(body, headers, secret=secret) for headers, body in self.deliveries
        ]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    got = Receiver()
    await got.start()
    yield got
    await got.stop()


def _clients(**hooks: tuple[str, str, str]) -> dict[str, Any]:
    """[clients.<name>] tables: name = (key, webhook URL or "", secret or "")."""
    return {
        name: {"key_sha256": [key_digest(key)], "webhook_url": url, "webhook_secret": secret}
        for name, (key, url, secret) in hooks.items()
    }


async def _submit(
    http: aiohttp.ClientSession, url: str, key: str, **headers: str
) -> dict[str, Any]:
    async with http.post(
        f"{url}/v1/images/generations",
        json=GENERATE,
        headers={"Authorization": f"Bearer {key}", "Prefer": "respond-async", **headers},
    ) as resp:
        assert resp.status == 202, await resp.text()
        task: dict[str, Any] = await resp.json()
        return task


async def _task(http: aiohttp.ClientSession, url: str, key: str, task_id: str) -> Any:
    async with http.get(
        f"{url}/v1/tasks/{task_id}", headers={"Authorization": f"Bearer {key}"}
    ) as resp:
        return await resp.json()


async def test_an_async_task_announces_its_end_signed_and_retried_until_taken(
    gateway_factory: GatewayFactory,
    store: dict[str, Any],
    receiver: Receiver,
    http: aiohttp.ClientSession,
) -> None:
    """The receiver fails twice (500), drops the connection, redirects (not followed), then
    takes the event: five tries, each verified by the SDK's `unwrap` with the configured
    secret, one webhook-id."""
    receiver.script = ["500", "500", "drop", "redirect"]
    gateway = await gateway_factory(
        tasks=store, clients=_clients(alpha=(ALPHA, receiver.url, SECRET)), webhooks=FAST
    )
    task = await _submit(http, gateway.url, ALPHA)
    await receiver.until(5)
    events = receiver.events()
    assert [event.type for event in events] == ["task.completed"] * 5
    assert set(receiver.paths) == {"/hooks/in"}
    assert len({headers["webhook-id"] for headers, _ in receiver.deliveries}) == 1
    assert len({body for _, body in receiver.deliveries}) == 1  # the same event every try
    event = events[0]
    assert event.id == receiver.deliveries[0][0]["webhook-id"]
    assert event.id.startswith("evt_")
    assert event.object == "event"
    assert abs(event.created_at - time.time()) < 30
    data = json.loads(receiver.deliveries[0][1])["data"]
    assert data == await _task(http, gateway.url, ALPHA, task["id"]) | {
        "signed_events_url": None,
        "signed_result_url": None,
    }
    assert data["result_url"] == f"/v1/tasks/{task['id']}/result"
    # No prompt, image or key in it.
    body = receiver.deliveries[0][1].decode()
    assert "lighthouse" not in body
    assert ALPHA not in body
    assert "b64_json" not in body
    await asyncio.sleep(1.5)
    assert len(receiver.deliveries) == 5  # taken: never sent again
    assert (
        gateway.sample("gateway_webhook_deliveries_total", client="alpha", outcome="failed_attempt")
        == 4
    )
    assert (
        gateway.sample("gateway_webhook_deliveries_total", client="alpha", outcome="delivered") == 1
    )
    assert gateway.sample("gateway_webhook_pending") == 0


async def test_an_event_no_try_delivers_is_given_up_after_the_last_retry(
    gateway_factory: GatewayFactory,
    receiver: Receiver,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    receiver.script = ["503"] * 10
    gateway = await gateway_factory(
        clients=_clients(alpha=(ALPHA, receiver.url, SECRET)),
        webhooks={"retry_delays_s": [0.1, 0.1], "timeout_s": 2.0},
    )
    task = await _submit(http, gateway.url, ALPHA)
    await receiver.until(3)
    await asyncio.sleep(1.5)
    assert len(receiver.deliveries) == 3  # the first try and two retries
    assert (
        gateway.sample("gateway_webhook_deliveries_total", client="alpha", outcome="gave_up") == 1
    )
    assert gateway.sample("gateway_webhook_pending") == 0
    assert f"{task['id']}: webhook to client alpha given up after 3 tries" in caplog.text


async def test_a_burst_of_ends_is_announced_at_the_receivers_pace_not_the_polls(
    gateway_factory: GatewayFactory, receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    """200 tasks end at once: a delivery that ends frees its slot for the next due event at
    once (16 at a time), rather than at the next look at the outbox, once a second."""
    gateway = await gateway_factory(
        tasks={"workers": 32}, clients=_clients(alpha=(ALPHA, receiver.url, SECRET)), webhooks=FAST
    )
    submitted = await asyncio.gather(*(_submit(http, gateway.url, ALPHA) for _ in range(200)))
    await receiver.until(200, within_s=3.0)
    assert {event.data.id for event in receiver.events()} == {task["id"] for task in submitted}


async def test_a_receiver_that_hangs_holds_up_no_other_clients_events(
    gateway_factory: GatewayFactory, receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    """Alpha's receiver hangs past timeout_s with a backlog of events: it holds at most
    concurrency_per_client of the replica's deliveries, and beta's event goes at once."""
    receiver.script = ["hang"] * 12
    other = Receiver()
    await other.start()
    try:
        gateway = await gateway_factory(
            clients=_clients(
                alpha=(ALPHA, receiver.url, SECRET), beta=(BETA, other.url, OTHER_SECRET)
            ),
            webhooks=FAST | {"concurrency": 4, "concurrency_per_client": 2},
        )
        for _ in range(12):
            await _submit(http, gateway.url, ALPHA)
        await receiver.until(2)
        await _submit(http, gateway.url, BETA)
        await other.until(1, within_s=2.0)  # alpha's tries time out at 2 s, its backlog later
        assert len(receiver.deliveries) == 2  # the others wait their turn, not failed
    finally:
        await other.stop()


async def test_a_cancelled_and_a_failed_task_announce_their_end_too(
    gateway_factory: GatewayFactory, fake: Fake, receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    gateway = await gateway_factory(
        clients=_clients(alpha=(ALPHA, receiver.url, SECRET)), webhooks=FAST
    )
    running = await _submit(http, gateway.url, ALPHA, **{"X-Fake-Latency": "30"})
    await fake.until_running()
    async with http.delete(
        f"{gateway.url}/v1/tasks/{running['id']}", headers={"Authorization": f"Bearer {ALPHA}"}
    ) as resp:
        assert resp.status == 200
    failing = await _submit(http, gateway.url, ALPHA, **{"X-Fake-Fault": "500"})
    await receiver.until(2)
    by_task = {event.data.id: event for event in receiver.events()}
    assert by_task[running["id"]].type == "task.cancelled"
    assert by_task[failing["id"]].type == "task.failed"
    assert by_task[failing["id"]].data.error["code"] == "500"


async def test_each_client_gets_only_its_own_tasks_and_one_without_a_webhook_none(
    gateway_factory: GatewayFactory, receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    other = Receiver()
    await other.start()
    try:
        gateway = await gateway_factory(
            clients=_clients(
                alpha=(ALPHA, receiver.url, SECRET),
                beta=(BETA, other.url, OTHER_SECRET),
                gamma=(GAMMA, "", ""),
            ),
            webhooks=FAST,
        )
        alphas = [(await _submit(http, gateway.url, ALPHA))["id"] for _ in range(3)]
        gammas = [(await _submit(http, gateway.url, GAMMA))["id"] for _ in range(2)]
        beta = (await _submit(http, gateway.url, BETA))["id"]
        await receiver.until(3)
        await other.until(1)
        await asyncio.sleep(1.5)  # room for a stray delivery to arrive
        assert sorted(event.data.id for event in receiver.events()) == sorted(alphas)
        assert [event.data.id for event in other.events(OTHER_SECRET)] == [beta]
        for gamma in gammas:  # ended, announced nowhere
            assert (await _task(http, gateway.url, GAMMA, gamma))["status"] == "completed"
        with pytest.raises(openai.InvalidWebhookSignatureError):  # beta's secret is not alpha's
            openai.OpenAI(api_key="unused").webhooks.unwrap(
                other.deliveries[0][1], other.deliveries[0][0], secret=SECRET
            )
    finally:
        await other.stop()


async def test_a_sync_call_announces_nothing(
    gateway_factory: GatewayFactory, receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    """An SDK call (run as a task, once) and a keyed call get their answer in the response:
    a webhook would name a task their caller never saw."""
    gateway = await gateway_factory(
        clients=_clients(alpha=(ALPHA, receiver.url, SECRET)), webhooks=FAST
    )
    async with openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=ALPHA) as sdk:
        image = await sdk.images.generate(model="gpt-image-1", prompt="a lighthouse")
        assert image.data
    async with http.post(
        f"{gateway.url}/v1/images/generations",
        json=GENERATE,
        headers={"Authorization": f"Bearer {ALPHA}", "Idempotency-Key": uuid.uuid4().hex},
    ) as resp:
        assert resp.status == 200
    await _submit(http, gateway.url, ALPHA)  # an async one does
    await receiver.until(1)
    await asyncio.sleep(1.5)
    assert len(receiver.deliveries) == 1


async def test_two_replicas_deliver_each_event_once(
    gateway_factory: GatewayFactory,
    redis_server: RedisServer,
    receiver: Receiver,
    http: aiohttp.ClientSession,
) -> None:
    """Each due event is leased to one replica: two delivering replicas, one try each."""
    tasks = {"redis_url": redis_server.url, "key_prefix": f"wh-{uuid.uuid4().hex[:8]}"}
    clients = _clients(alpha=(ALPHA, receiver.url, SECRET))
    first = await gateway_factory(tasks=tasks, clients=clients, webhooks=FAST)
    second = await gateway_factory(tasks=tasks, clients=clients, webhooks=FAST)
    ids = [(await _submit(http, gw.url, ALPHA))["id"] for gw in (first, second) * 10]
    await receiver.until(20)
    await asyncio.sleep(1.5)
    assert sorted(event.data.id for event in receiver.events()) == sorted(ids)
    delivered = sum(
        gw.sample("gateway_webhook_deliveries_total", client="alpha", outcome="delivered")
        for gw in (first, second)
    )
    assert delivered == 20


async def test_an_event_waits_out_a_hung_redis_and_is_delivered_when_it_resumes(
    gateway_factory: GatewayFactory,
    tmp_path: Path,
    receiver: Receiver,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis stops answering (SIGSTOP) between two tries: no try is lost, none doubles, and
    the delivery goes on once it answers again."""
    redis = RedisServer(tmp_path)
    try:
        receiver.script = ["500"]
        gateway = await gateway_factory(
            tasks={"redis_url": redis.url, "store_timeout_s": 0.5},
            clients=_clients(alpha=(ALPHA, receiver.url, SECRET)),
            webhooks={"retry_delays_s": [0.2], "timeout_s": 1.0},
        )
        await _submit(http, gateway.url, ALPHA)
        await receiver.until(1)
        redis.proc.send_signal(signal.SIGSTOP)
        await asyncio.sleep(3.0)
        assert len(receiver.deliveries) == 1
        redis.proc.send_signal(signal.SIGCONT)
        # Soon: a take that Redis ran only as it resumed, after its caller gave up, took
        # nothing (else the event would wait out a lease nobody holds, 7.5 s here).
        await receiver.until(2, within_s=3.0)
        assert len({headers["webhook-id"] for headers, _ in receiver.deliveries}) == 1
        await asyncio.sleep(1.5)
        assert len(receiver.deliveries) == 2
        assert "webhooks wait until it is back" in caplog.text
        assert gateway.sample("gateway_webhook_pending") == 0
    finally:
        redis.proc.send_signal(signal.SIGCONT)
        redis.stop()


def _process_config(fake: Fake, redis_url: str, prefix: str, hook: str) -> str:
    return f"""
[server]
drain_timeout_s = 0.5
[upstream]
url = '{fake.url}/v1'
[tasks]
redis_url = '{redis_url}'
key_prefix = '{prefix}'
store_timeout_s = 0.5
[webhooks]
retry_delays_s = [0.5, 0.5, 0.5, 0.5]
timeout_s = 1.0
[clients.alpha]
key_sha256 = ['{key_digest(ALPHA)}']
webhook_url = '{hook}'
webhook_secret = '{SECRET}'
"""


@pytest.mark.parametrize("shared", ["redis_server", "redis_cluster"])
async def test_a_delivery_outlives_the_killed_replica_that_ended_the_task(
    spawn: Spawn,
    fake: Fake,
    shared: str,
    request: pytest.FixtureRequest,
    receiver: Receiver,
    http: aiohttp.ClientSession,
) -> None:
    """The replica that ran the task tries once (500) and is killed (-9); a `gateway worker`
    started after, sharing the Redis, goes on with the same event until the receiver takes it."""
    receiver.script = ["500", "500", "drop"]
    redis = request.getfixturevalue(shared)  # a standalone Redis, or a Redis Cluster
    config = _process_config(fake, redis.url, f"wh-{uuid.uuid4().hex[:8]}", receiver.url)
    first, first_url = await spawn(config)
    task = await _submit(http, first_url, ALPHA)
    await receiver.until(1)
    first.proc.kill()
    assert await first.wait_exit(5) != 0
    second, _ = await spawn(config, command="worker")
    await receiver.until(4, within_s=20)
    events = receiver.events()
    assert {event.data.id for event in events} == {task["id"]}
    assert {event.type for event in events} == {"task.completed"}
    assert len({headers["webhook-id"] for headers, _ in receiver.deliveries}) == 1
    await asyncio.sleep(1.5)
    assert len(receiver.deliveries) == 4
    assert "webhook to client alpha failed" in second.output()


@pytest.mark.parametrize(
    ("table", "says"),
    [
        (
            {"webhook_url": "https://hooks.example.com/in"},
            "clients.alpha.webhook_secret is missing",
        ),
        ({"webhook_secret": SECRET}, "clients.alpha.webhook_url is missing"),
        (
            {"webhook_url": "ftp://hooks.example.com/", "webhook_secret": SECRET},
            "clients.alpha.webhook_url must be an http(s) URL",
        ),
        (
            {"webhook_url": "https://hooks.example.com/", "webhook_secret": "whsec_not base64!"},
            "clients.alpha.webhook_secret must be",
        ),
        (
            {"webhook_url": "https://hooks.example.com/", "webhook_secret": "sk-plain-secret"},
            "clients.alpha.webhook_secret must be",
        ),
    ],
)
def test_a_webhook_config_that_cannot_work_is_refused_naming_the_key(
    tmp_path: Path, table: dict[str, str], says: str
) -> None:
    lines = [f"{key} = '{value}'" for key, value in table.items()]
    file = tmp_path / "gateway.toml"
    file.write_text("[clients.alpha]\n" + "\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as refused:
        load_config(file, {})
    message = str(refused.value)
    assert says in message
    assert "\n" not in message
    assert "not base64" not in message
    assert "sk-plain" not in message
