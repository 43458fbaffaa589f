"""A real redis-server for the tests, on a free port, with AOF like production."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.procs import free_port


class RedisServer:
    def __init__(self, directory: Path, *extra: str, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed: .ci/run installs it (apt-get)"
        self.port = free_port() if port is None else port
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._args = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--dir",
            str(directory),
            *extra,
        ]
        self.proc = self._spawn()

    def _spawn(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(self._args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    # NOAUTH: alive, and closed to the default user (an ACL test's server).
                    if sock.recv(16).startswith((b"+PONG", b"-NOAUTH")):
                        return proc
            except OSError:
                time.sleep(0.05)
        proc.kill()
        raise AssertionError("redis-server did not start")

    def stop(self) -> None:
        """A clean shutdown: Redis writes its AOF out first."""
        self.proc.terminate()
        self.proc.wait(10)

    def start(self) -> None:
        """Start again on the same port and directory: what AOF kept comes back."""
        self.proc = self._spawn()
