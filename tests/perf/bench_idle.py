"""What idle keep-alive connections cost: N callers that made one request and keep their
connection open, RSS growth per connection, the gateway beside nginx in one run.

    python -m tests.perf.bench_idle [--connections 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import tempfile
from pathlib import Path

from tests.perf.bench_sync import (
    NGINX_CONF,
    ensure_tools,
    free_port,
    gateway,
    nginx_worker,
    rss_kb,
    running,
)


async def _hold(port: int, count: int, pid: int) -> tuple[int, int, int]:
    before = rss_kb(pid)
    conns = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        await reader.readuntil(b"\r\n\r\n")
        conns.append((reader, writer))
    await asyncio.sleep(2)
    held = rss_kb(pid)
    alive = sum(not reader.at_eof() for reader, _ in conns)
    for _, writer in conns:
        writer.close()
    return before, held, alive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=10_000)
    args = parser.parse_args()
    ensure_tools()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ports = {name: free_port() for name in ("origin", "proxy", "fake", "proxy_fake")}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        (tmp / "nginx.conf").write_text(NGINX_CONF.format(tmp=tmp, **ports))
        gw_port = free_port()
        origin = f"http://127.0.0.1:{ports['origin']}"
        with (
            running(["nginx", "-c", str(tmp / "nginx.conf")], ports["proxy"]) as nginx_pid,
            running(gateway(gw_port, origin, tmp, access_log=False), gw_port) as gw_pid,
        ):
            rows = {
                "gateway": asyncio.run(_hold(gw_port, args.connections, gw_pid)),
                "nginx": asyncio.run(
                    _hold(ports["proxy"], args.connections, nginx_worker(nginx_pid))
                ),
            }
    print(f"\n{args.connections} idle keep-alive connections (one request each, then held)")
    print(f"{'server':10} {'alive':>7} {'RSS before':>11} {'RSS held':>10} {'per conn':>9}")
    for label, (before, held, alive) in rows.items():
        per = (held - before) / args.connections
        print(f"{label:10} {alive:7d} {before / 1024:9.1f}MB {held / 1024:8.1f}MB {per:7.2f}KB")


if __name__ == "__main__":
    main()
