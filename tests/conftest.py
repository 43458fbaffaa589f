"""Real parts only: the APIYI stand-in and the gateway on real sockets, real clients."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import openai
import pytest
from aiohttp import web

from gateway.config import Config
from gateway.edge.app import create_app
from gateway.edge.server import start
from gateway.fake import STATS, FakeSettings, FakeStats, start_fake
from gateway.metrics import METRICS, Metrics
from tests.procs import GatewayProcess, free_port
from tests.redis_cluster import ClusterNodes
from tests.redis_server import RedisServer


@dataclasses.dataclass
class Fake:
    url: str
    runner: web.AppRunner

    @property
    def stats(self) -> FakeStats:
        return self.runner.app[STATS]

    async def until_running(self, count: int = 1) -> None:
        """Until `count` generations are under way at the stand-in."""
        while self.stats.running < count:
            await asyncio.sleep(0.01)


@dataclasses.dataclass
class Gateway:
    url: str
    app: web.Application
    config: Config

    @property
    def metrics(self) -> Metrics:
        return self.app[METRICS]

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


def _port(runner: web.AppRunner) -> int:
    port = runner.addresses[0][1]
    assert isinstance(port, int)
    return port


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterNodes]:
    """A real six-node Redis Cluster (three primaries, three replicas), shared by the tests."""
    cluster = ClusterNodes(tmp_path_factory.mktemp("cluster"))
    yield cluster
    cluster.stop()


@pytest.fixture(params=["memory", "redis", "cluster"])
def store(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The [tasks] config of the store under test: a test using it runs on every store (the
    embedded one, a standalone Redis, a Redis Cluster)."""
    if request.param == "memory":
        return {}
    server = request.getfixturevalue(
        "redis_cluster" if request.param == "cluster" else "redis_server"
    )
    prefix = f"test-{uuid.uuid4().hex[:8]}"  # a fresh key space per test on the shared server
    return {"redis_url": server.url, "key_prefix": prefix}


@pytest.fixture
async def fake() -> AsyncIterator[Fake]:
    runner = await start_fake(FakeSettings(image_bytes=64 * 1024), "127.0.0.1", 0)
    yield Fake(f"http://127.0.0.1:{_port(runner)}", runner)
    await runner.cleanup()


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and key in out else value
    return out


def make_config(upstream_url: str, **sections: dict[str, Any]) -> Config:
    """A Config decoded the way the file is, so tests exercise the same validation."""
    raw: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0, "drain_timeout_s": 2.0},
        "upstream": {"url": upstream_url},
    }
    return msgspec.convert(merge(raw, sections), Config)


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def gateway_factory(fake: Fake) -> AsyncIterator[GatewayFactory]:
    runners: list[web.AppRunner] = []

    async def make(upstream_url: str | None = None, **sections: dict[str, Any]) -> Gateway:
        config = make_config(upstream_url or f"{fake.url}/v1", **sections)
        app = create_app(config)
        runner = await start(app, config)
        runners.append(runner)
        return Gateway(f"http://127.0.0.1:{_port(runner)}", app, config)

    yield make
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def gateway(gateway_factory: GatewayFactory) -> Gateway:
    return await gateway_factory()


Spawn = Callable[..., Awaitable[tuple[GatewayProcess, str]]]


@pytest.fixture
async def spawn(tmp_path: Path) -> AsyncIterator[Spawn]:
    """`spawn(toml, env, command="serve")`: a real gateway process and its URL."""
    procs: list[GatewayProcess] = []

    async def start(
        config: str = "", env: dict[str, str] | None = None, command: str = "serve"
    ) -> tuple[GatewayProcess, str]:
        port = free_port()
        file = tmp_path / f"gw-{port}.toml"
        file.write_text(config)
        args = [command, "--config", str(file)]
        if command == "serve":
            args += ["--host", "127.0.0.1", "--port", str(port)]
        proc = GatewayProcess(args, tmp_path / f"gw-{port}.log", env)
        procs.append(proc)
        if command == "serve":
            await proc.wait_listening(port)
        return proc, f"http://127.0.0.1:{port}"

    yield start
    for proc in procs:
        proc.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def sdk(gateway: Gateway) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=f"{gateway.url}/v1", api_key="sk-caller", max_retries=2
    ) as client:
        yield client
