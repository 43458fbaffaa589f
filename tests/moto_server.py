"""moto's S3 stand-in as a real server process on a free port, for the `s3://` results tests."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.procs import free_port


class MotoServer:
    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = (directory / f"moto-{self.port}.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 15
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError("moto server did not start")
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), 0.2) as sock:
                sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
                return sock.recv(12).startswith(b"HTTP/1.")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: the storage is gone at once, as in a crash or a network cut."""
        self.proc.kill()
        self.proc.wait()
        self._log.close()
