"""The gateway as a real process: start-up, bad config, and draining on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from gateway.auth import key_digest
from tests.conftest import Fake, Spawn
from tests.procs import GatewayProcess, free_port


async def test_serves_on_defaults_with_no_config_file(tmp_path: Path) -> None:
    port = free_port()
    # Run from an empty directory: no config/gateway.toml to find, no Redis, no edits.
    proc = GatewayProcess(["serve", "--port", str(port)], tmp_path / "gw.log")
    try:
        await proc.wait_listening(port)
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/healthz") as r,
        ):
            assert r.status == 200
        assert "upstream https://api.apiyi.com/v1" in proc.output()
    finally:
        proc.close()


def test_bad_config_stops_start_up_naming_the_key(tmp_path: Path) -> None:
    file = tmp_path / "bad.toml"
    file.write_text("[server]\nport = 8080\nmax_body = 10\n")
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(file)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "max_body" in done.stderr
    assert "bad.toml" in done.stderr


def _gateway(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=None if env is None else {**os.environ, **env},
    )


def test_a_port_in_use_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _gateway("serve", "--host", "127.0.0.1", "--port", str(port))
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"gateway: cannot listen on 127.0.0.1:{port}: Address already in use"
    )


def test_a_bad_upstream_url_in_the_environment_names_the_variable(tmp_path: Path) -> None:
    done = _gateway("serve", env={"GATEWAY_UPSTREAM_URL": "api.apiyi.com/v1"})
    assert done.returncode == 2
    assert "GATEWAY_UPSTREAM_URL must be an http(s) URL" in done.stderr
    assert "gateway.toml" not in done.stderr


def _one_line(done: subprocess.CompletedProcess[str]) -> str:
    """The refusal a process printed, asserted to be one line and no traceback."""
    assert "Traceback" not in done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    return done.stderr.strip()


@pytest.mark.parametrize(
    ("toml", "named"),
    [
        ("[tasks]\nworkers = -3", "tasks.workers: expected `int` >= 0"),
        ("[timeouts]\ndefault_s = 0", "timeouts.default_s: expected `float` > 0.0"),
        ("[server]\nmax_body_bytes = -1", "server.max_body_bytes: expected `int` >= 1"),
    ],
)
def test_a_number_out_of_range_stops_start_up_in_one_line(
    tmp_path: Path, toml: str, named: str
) -> None:
    file = tmp_path / "gw.toml"
    file.write_text(toml + "\n")
    done = _gateway("serve", "--config", str(file), "--port", str(free_port()))
    assert done.returncode == 2
    assert _one_line(done) == f"gateway: bad configuration: {file}: {named}"


@pytest.mark.parametrize("command", ["serve", "fake-upstream"])
def test_a_port_out_of_range_is_one_line(command: str) -> None:
    done = _gateway(command, "--port", "99999")
    assert done.returncode == 2
    assert _one_line(done) == (
        f"gateway {command}: error: argument --port: 99999 is not a port number (0 to 65535) "
        f"(see `gateway {command} --help`)"
    )


@pytest.mark.parametrize("url", ["notaurl", "http://x"])
def test_a_bogus_redis_url_is_one_line(url: str) -> None:
    done = _gateway("serve", "--port", str(free_port()), env={"GATEWAY_REDIS_URL": url})
    assert done.returncode == 2
    assert _one_line(done).startswith(
        "gateway: bad configuration: GATEWAY_REDIS_URL must be a redis://, rediss:// or unix://"
    )


def test_the_stand_in_on_a_port_in_use_is_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _gateway("fake-upstream", "--port", str(port))
    assert done.returncode == 1
    assert _one_line(done) == f"gateway: cannot listen on 127.0.0.1:{port}: Address already in use"


async def test_help_names_the_environment_and_log_level_goes_anywhere(tmp_path: Path) -> None:
    done = _gateway("serve", "--help")
    for var in ("GATEWAY_UPSTREAM_URL", "GATEWAY_UPSTREAM_API_KEY", "GATEWAY_REDIS_URL"):
        assert var in done.stdout
    # The environment speaks to the commands that read the configuration, and only to them.
    assert "GATEWAY_REDIS_URL" in _gateway("worker", "--help").stdout
    for other in (["--help"], ["fake-upstream", "--help"], ["hash-key", "--help"]):
        assert "GATEWAY_" not in _gateway(*other).stdout
    assert "gateway serve --help" in _gateway("--help").stdout
    done = _gateway("hash-key", "--log-level", "loud")
    assert done.returncode == 2
    assert "invalid choice: 'LOUD'" in _one_line(done)
    port = free_port()
    proc = GatewayProcess(["serve", "--port", str(port), "--log-level", "warning"], tmp_path / "l")
    try:
        await proc.wait_listening(port)
        assert " INFO " not in proc.output()  # the start-up lines are INFO: not shown
    finally:
        proc.close()


def test_hash_key_prints_the_digest_for_the_config() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "hash-key"],
        input="gw-secret\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0
    assert done.stdout.strip() == key_digest("gw-secret")


async def test_sigterm_finishes_in_flight_calls_and_refuses_new_ones(
    spawn: Spawn, fake: Fake
) -> None:
    proc, url = await spawn(f"[server]\ndrain_timeout_s = 5.0\n[upstream]\nurl = '{fake.url}/v1'\n")
    async with aiohttp.ClientSession() as http:
        call = asyncio.ensure_future(_generate(http, url, latency_s=1.5))
        await asyncio.sleep(0.5)
        proc.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        with pytest.raises(aiohttp.ClientConnectorError):
            await _generate(http, url, latency_s=0)
        status, size = await call
    assert status == 200
    assert size > 60_000
    assert await proc.wait_exit(within_s=5) == 0
    assert "draining" in proc.output()


async def test_drain_timeout_cuts_calls_that_run_too_long(spawn: Spawn, fake: Fake) -> None:
    proc, url = await spawn(f"[server]\ndrain_timeout_s = 1.0\n[upstream]\nurl = '{fake.url}/v1'\n")
    async with aiohttp.ClientSession() as http:
        call = asyncio.ensure_future(_generate(http, url, latency_s=30))
        await asyncio.sleep(0.5)
        proc.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await call
    assert await proc.wait_exit(within_s=5) == 0
    assert time.monotonic() - signalled < 3
    assert fake.stats.cancelled == 1  # the upstream call did not outlive the drain


async def _generate(http: aiohttp.ClientSession, url: str, latency_s: float) -> tuple[int, int]:
    async with http.post(
        f"{url}/v1/images/generations",
        json={"model": "gpt-image-1", "prompt": "x"},
        headers={"X-Fake-Latency": str(latency_s)},
    ) as resp:
        return resp.status, len(await resp.read())


def test_a_metrics_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        file = tmp_path / "gw.toml"
        file.write_text(f"[server]\nhost = '127.0.0.1'\nmetrics_port = {port}\n")
        done = _gateway("serve", "--config", str(file), "--port", str(free_port()))
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"gateway: cannot listen on 127.0.0.1:{port} (server.metrics_port): Address already in use"
    )


@pytest.mark.parametrize("command", ["serve", "fake-upstream"])
def test_an_address_that_is_not_ours_is_one_line(command: str) -> None:
    done = _gateway(command, "--host", "nosuch.invalid", "--port", "0")
    assert done.returncode == 1
    assert _one_line(done).startswith("gateway: cannot listen on nosuch.invalid:0: ")
    assert "Unknown error" not in done.stderr
