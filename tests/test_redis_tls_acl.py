"""The task store over TLS (`rediss://`, a throwaway CA made here) and with an ACL user
(`redis://user:password@`), on a standalone Redis and on a Redis Cluster: tasks run end to end,
and a wrong password is refused."""

from __future__ import annotations

import subprocess
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from tests.conftest import Fake, Spawn
from tests.procs import free_port
from tests.redis_cluster import ClusterNodes
from tests.redis_server import RedisServer
from tests.test_replicas import _assert_completed_once, _config, _submit, _until_all_ended

ACL = "gw-tasks"
SECRET = "s3cret-for-the-test"


def _certificates(directory: Path) -> dict[str, Path]:
    """A CA, and a certificate it signed for 127.0.0.1: made for this test, thrown away."""
    files = {
        name: directory / name for name in ("ca.key", "ca.crt", "node.key", "node.csr", "node.crt")
    }

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=test CA",
        "-keyout",
        str(files["ca.key"]),
        "-out",
        str(files["ca.crt"]),
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        str(files["node.key"]),
        "-out",
        str(files["node.csr"]),
    )
    extensions = directory / "san.ext"
    extensions.write_text("subjectAltName = IP:127.0.0.1\n")
    openssl(
        "x509",
        "-req",
        "-in",
        str(files["node.csr"]),
        "-CA",
        str(files["ca.crt"]),
        "-CAkey",
        str(files["ca.key"]),
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        str(extensions),
        "-out",
        str(files["node.crt"]),
    )
    return files


# A Redis closed to its default user and open to the ACL user (redis-server joins the words
# after an option until the next `--`); replicas log in to their primary as that user too.
_ACL_OPTIONS = ("--user", "default", "off", "--user", ACL, "on", f">{SECRET}", "~*", "&*", "+@all")
_REPLICATION_OPTIONS = ("--masteruser", ACL, "--masterauth", SECRET)


def _tls_options(certs: dict[str, Path]) -> tuple[str, ...]:
    return (
        "--tls-cert-file",
        str(certs["node.crt"]),
        "--tls-key-file",
        str(certs["node.key"]),
        "--tls-ca-cert-file",
        str(certs["ca.crt"]),
        "--tls-auth-clients",
        "no",
    )


def _secured_redis(directory: Path, tls: bool) -> tuple[RedisServer, str]:
    """A standalone Redis behind the ACL user, over TLS when `tls`; the url the gateway is given."""
    if not tls:
        server = RedisServer(directory, *_ACL_OPTIONS)
        return server, f"redis://{ACL}:{SECRET}@127.0.0.1:{server.port}/0"
    certs = _certificates(directory)
    tls_port = free_port()
    server = RedisServer(
        directory, *_ACL_OPTIONS, "--tls-port", str(tls_port), *_tls_options(certs)
    )
    url = f"rediss://{ACL}:{SECRET}@127.0.0.1:{tls_port}/0?ssl_ca_certs={certs['ca.crt']}"
    return server, url


def _secured_cluster(directory: Path, tls: bool) -> tuple[ClusterNodes, str]:
    """A Redis Cluster behind the ACL user, over TLS (clients, replication, the bus) when `tls`;
    the url of one of its nodes (the gateway finds the rest)."""
    cli: tuple[str, ...] = ("--user", ACL, "--pass", SECRET)
    if not tls:
        cluster = ClusterNodes(directory, *_ACL_OPTIONS, *_REPLICATION_OPTIONS, cli_auth=cli)
        port = cluster.nodes[3].port  # a replica, most likely: any node will do
        return cluster, f"redis://{ACL}:{SECRET}@127.0.0.1:{port}"
    certs = _certificates(directory)
    over_tls = ("--tls-cluster", "yes", "--tls-replication", "yes", *_tls_options(certs))
    cli = ("--tls", "--cacert", str(certs["ca.crt"]), *cli)
    cluster = ClusterNodes(
        directory / "tls", *_ACL_OPTIONS, *_REPLICATION_OPTIONS, cli_auth=cli, tls=over_tls
    )
    port = cluster.client_ports[0]
    return cluster, f"rediss://{ACL}:{SECRET}@127.0.0.1:{port}?ssl_ca_certs={certs['ca.crt']}"


class _Url(RedisServer):
    """What `_config` reads of a server: its url (here with a user, a password and a CA)."""

    def __init__(self, url: str) -> None:
        self.url = url


async def _runs_a_task(spawn: Spawn, fake: Fake, url: str, kind: str) -> None:
    """A gateway on `url` says what kind of Redis it found, runs a task to its end, and logs
    no password."""
    proc, gateway = await spawn(_config(fake, _Url(url), "sec", workers=2))
    port = URL(url).port
    assert f"task store: {kind} at 127.0.0.1:{port}" in proc.output()
    async with aiohttp.ClientSession() as http:
        task_id = await _submit(http, gateway, latency_s=0.1)
        await _until_all_ended(http, gateway, [task_id], within_s=10)
        await _assert_completed_once(http, gateway, task_id)
    assert SECRET not in proc.output()


@pytest.mark.parametrize("tls", [False, True], ids=["acl", "tls+acl"])
async def test_tasks_run_over_a_secured_redis(
    spawn: Spawn, fake: Fake, tmp_path: Path, tls: bool
) -> None:
    server, url = _secured_redis(tmp_path, tls)
    try:
        await _runs_a_task(spawn, fake, url, "standalone Redis")
        wrong = url.replace(SECRET, "not-the-password")
        proc, gateway = await spawn(_config(fake, _Url(wrong), "sec", workers=1))
        async with aiohttp.ClientSession() as http, http.get(f"{gateway}/readyz") as resp:
            assert resp.status == 503  # refused by Redis: not ready for tasks
        assert SECRET not in proc.output()
    finally:
        server.stop()


@pytest.mark.parametrize("tls", [False, True], ids=["acl", "tls+acl"])
async def test_tasks_run_on_a_secured_redis_cluster(
    spawn: Spawn, fake: Fake, tmp_path: Path, tls: bool
) -> None:
    cluster, url = _secured_cluster(tmp_path, tls)
    try:
        await _runs_a_task(spawn, fake, url, "Redis Cluster")
    finally:
        cluster.stop()
