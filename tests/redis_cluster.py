"""A real Redis Cluster for the tests: six `redis-server --cluster-enabled yes` nodes on free
ports (three primaries, three replicas), joined by `redis-cli --cluster create`."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.redis_server import RedisServer


def _cluster_port() -> int:
    """A free port whose cluster bus port (the port + 10000) is free too."""
    for _ in range(200):
        port = random.randint(20000, 50000)
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise AssertionError("no free port pair for a cluster node")


class ClusterNodes:
    def __init__(
        self,
        directory: Path,
        *extra: str,
        nodes: int = 6,
        cli_auth: tuple[str, ...] = (),
        tls: tuple[str, ...] = (),
    ) -> None:
        """`extra`: more redis-server options for every node; `cli_auth`: redis-cli's options
        to log in with (an ACL test's `--user`, `--pass`, a TLS test's `--tls`, `--cacert`);
        `tls`: the TLS options of every node, which then serve clients, replicas and the bus
        over TLS (each keeps a plain port for the tests' own readiness check)."""
        self._cli_auth = cli_auth
        self.nodes: list[RedisServer] = []
        self.client_ports: list[int] = []
        for i in range(nodes):
            tls_port = _cluster_port() if tls else 0
            per_node = ("--tls-port", str(tls_port), *tls) if tls else ()
            node_dir = directory / f"node-{i}"
            node_dir.mkdir(parents=True, exist_ok=True)
            self.nodes.append(
                RedisServer(
                    node_dir,
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(node_dir / "nodes.conf"),
                    # A primary that stops answering is replaced within seconds.
                    "--cluster-node-timeout",
                    "2000",
                    # Replicas sync at once (the default waits 5 s for more of them): a replica
                    # that never synced is never promoted.
                    "--repl-diskless-sync-delay",
                    "0",
                    *extra,
                    *per_node,
                    port=_cluster_port(),
                )
            )
            self.client_ports.append(tls_port or self.nodes[-1].port)
        cli = shutil.which("redis-cli")
        assert cli, "redis-cli is not installed: .ci/run installs it with redis-server"
        subprocess.run(
            [
                cli,
                *cli_auth,
                "--cluster",
                "create",
                *(f"127.0.0.1:{port}" for port in self.client_ports),
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        self._until_ok(cli)
        # Any node will do: the gateway finds the others.
        self.url = self.nodes[0].url.removesuffix("/0")

    def _until_ok(self, cli: str) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            states = [
                subprocess.run(
                    [cli, *self._cli_auth, "-p", str(port), "cluster", "info"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                ).stdout
                for port in self.client_ports
            ]
            links = [
                subprocess.run(
                    [cli, *self._cli_auth, "-p", str(port), "info", "replication"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                ).stdout
                for port in self.client_ports
            ]
            replicas_synced = all(
                "master_link_status:up" in link for link in links if "role:slave" in link
            )
            if all("cluster_state:ok" in state for state in states) and replicas_synced:
                return
            time.sleep(0.2)
        raise AssertionError("the Redis Cluster did not become ready")

    def stop(self) -> None:
        for node in self.nodes:
            if node.proc.poll() is None:
                node.stop()
