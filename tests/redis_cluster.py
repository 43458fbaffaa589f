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
    def __init__(self, directory: Path, nodes: int = 6) -> None:
        self.nodes: list[RedisServer] = []
        for i in range(nodes):
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
                    port=_cluster_port(),
                )
            )
        cli = shutil.which("redis-cli")
        assert cli, "redis-cli is not installed: .ci/run installs it with redis-server"
        subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{node.port}" for node in self.nodes),
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
                    [cli, "-p", str(node.port), "cluster", "info"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                ).stdout
                for node in self.nodes
            ]
            links = [
                subprocess.run(
                    [cli, "-p", str(node.port), "info", "replication"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                ).stdout
                for node in self.nodes
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
