"""Sync pass-through benchmark: the gateway side by side with nginx and a bare aiohttp proxy.

    python tests/perf/bench_sync.py [--seconds 10] [--held 6000] [--skip-held] [--baseline DIR]
                                    [--rounds 1]

Needs `nginx` and `wrk` (Debian packages; installed with apt-get when missing). Everything runs
on loopback on this machine, in one run, so the figures are ratios measured side by side:
  1. throughput at 64 connections and median latency at 1 connection, against an nginx
     `return 200` upstream: direct, via nginx, via a bare aiohttp proxy, via the gateway (and
     via the gateway of another checkout, `--baseline DIR`, e.g. `git worktree add DIR REV`);
     for the call users make (`POST /v1/images/generations`, a JSON body, a bearer key) and
     for `GET /v1/models`;
  2. memory per held call: N generations in flight at once (the stand-in answers after 20 s),
     RSS growth divided by N, for the gateway, nginx and the bare proxy;
  3. a 20 MB answer streamed through the gateway: growth of its peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
NGINX_CONF = """
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections 30000; }}
worker_rlimit_nofile 20000;
http {{
  access_log off;
  upstream origin {{ server 127.0.0.1:{origin}; keepalive 256; }}
  upstream fake {{ server 127.0.0.1:{fake}; keepalive 256; }}
  server {{ listen 127.0.0.1:{origin} backlog=8192; location / {{ return 200 '{{"ok":true}}'; }} }}
  server {{
    listen 127.0.0.1:{proxy} backlog=8192;
    location / {{ proxy_pass http://origin; proxy_http_version 1.1;
                 proxy_set_header Connection ""; }}
  }}
  server {{
    listen 127.0.0.1:{proxy_fake} backlog=8192;
    client_max_body_size 0;
    location / {{ proxy_pass http://fake; proxy_http_version 1.1; proxy_set_header Connection "";
                 proxy_read_timeout 600s; proxy_buffering off; }}
  }}
}}
"""


# The call this gateway exists for, as wrk sends it.
POST_LUA = """
wrk.method = "POST"
wrk.body = '{"model": "gpt-image-1", "prompt": "a lighthouse at dawn", "size": "1024x1024"}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench"
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _raise_fd_limit() -> None:
    # Thousands of held calls need two sockets each in a proxy: take all the hard limit allows.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def ensure_tools() -> None:
    missing = [tool for tool in ("nginx", "wrk") if shutil.which(tool) is None]
    if missing:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True)


def wait_port(port: int, within_s: float = 15) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


@contextlib.contextmanager
def running(
    args: list[str], port: int, env: dict[str, str] | None = None, cwd: Path | None = None
) -> Iterator[int]:
    proc = subprocess.Popen(
        args,
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
        preexec_fn=_raise_fd_limit,
    )
    try:
        wait_port(port)
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def gateway(port: int, upstream: str, tmp: Path, access_log: bool = True) -> list[str]:
    config = tmp / f"gateway-{port}.toml"
    # Defaults (access log on, as shipped) but an unlimited pool for thousands of held calls.
    log = "true" if access_log else "false"
    config.write_text(
        f"[server]\naccess_log = {log}\n[upstream]\nurl = '{upstream}'\npool_size = 0\n"
    )
    return [
        sys.executable,
        "-m",
        "gateway",
        "serve",
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    assert match
    return int(match.group(1))


def nginx_worker(master: int) -> int:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return int(children[0])


def wrk(
    url: str, connections: int, seconds: int, script: Path | None = None
) -> tuple[float, float, int]:
    """Requests per second, median latency in ms, and the number of requests made."""
    extra = ["-s", str(script)] if script is not None else []
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", *extra, url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    count = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    assert p50
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[p50.group(2)]
    return rps, float(p50.group(1)) * scale, count


def cpu_s(pid: int) -> float:
    """User plus system CPU seconds a process has used (from /proc: robust to a busy box)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_throughput(
    seconds: int, tmp: Path, ports: dict[str, int], baseline: Path | None = None, rounds: int = 1
) -> None:
    origin = f"http://127.0.0.1:{ports['origin']}"
    gw_port, quiet_port, bare_port, base_port = (free_port() for _ in range(4))
    (tmp / "post.lua").write_text(POST_LUA)
    with contextlib.ExitStack() as stack:
        # Started outside any checkout, so each imports the gateway it is meant to.
        bare = [sys.executable, str(HERE / "bare_proxy.py"), origin, str(bare_port)]
        pythons: list[tuple[int, list[str], dict[str, str] | None]] = [
            (gw_port, gateway(gw_port, origin, tmp), None),
            (quiet_port, gateway(quiet_port, origin, tmp, access_log=False), None),
            (bare_port, bare, None),
        ]
        if baseline is not None:
            base_env = {"PYTHONPATH": str(baseline)}
            pythons.append((base_port, gateway(base_port, origin, tmp), base_env))
        pids = {
            port: stack.enter_context(running(argv, port, env, cwd=tmp))
            for port, argv, env in pythons
        }
        targets = {
            "direct (nginx return 200)": ports["origin"],
            "nginx reverse proxy": ports["proxy"],
            "bare aiohttp proxy": bare_port,
            "gateway": gw_port,
            "gateway, access log off": quiet_port,
        }
        if baseline is not None:
            targets["gateway at --baseline"] = base_port
        for label, path, script in (
            ("POST /v1/images/generations (JSON, bearer key)", "/v1/images/generations", "post"),
            ("GET /v1/models", "/v1/models", None),
        ):
            lua = tmp / "post.lua" if script else None
            runs: dict[str, list[tuple[float, float, float | None]]] = {n: [] for n in targets}
            for turn in range(rounds):
                # In turns, each round in another order: drift on a shared box hits all alike.
                names = list(targets)[turn % len(targets) :] + list(targets)[: turn % len(targets)]
                for name in names:
                    port = targets[name]
                    url = f"http://127.0.0.1:{port}{path}"
                    wrk(url, 64, 2, lua)  # warm up connections and caches
                    before = cpu_s(pids[port]) if port in pids else 0.0
                    rps, _, count = wrk(url, 64, seconds, lua)
                    cpu = (cpu_s(pids[port]) - before) / count * 1000 if port in pids else None
                    _, p50, _ = wrk(url, 1, seconds, lua)
                    runs[name].append((rps, p50, cpu))
            results = {name: _median(measured) for name, measured in runs.items()}
            _print_throughput(f"{label}, median of {rounds}", seconds, results)


def _median(
    runs: list[tuple[float, float, float | None]],
) -> tuple[float, float, float | None]:
    cpus = [cpu for _, _, cpu in runs if cpu is not None]
    return (
        statistics.median(r for r, _, _ in runs),
        statistics.median(p for _, p, _ in runs),
        statistics.median(cpus) if cpus else None,
    )


def _print_throughput(
    label: str, seconds: int, results: dict[str, tuple[float, float, float | None]]
) -> None:
    bare_rps, _, bare_cpu = results["bare aiohttp proxy"]
    nginx_rps = results["nginx reverse proxy"][0]
    direct_p50 = results["direct (nginx return 200)"][1]
    print(f"\n## {label}: throughput (wrk -t1 -c64 -d{seconds}s), latency (wrk -t1 -c1)")
    print(
        f"{'target':28} {'req/s':>9} {'x nginx':>8} {'x bare':>7} {'p50 ms':>8} {'added ms':>9}"
        f" {'CPU ms/call':>12} {'x bare':>7}"
    )
    for name, (rps, p50, cpu_ms) in results.items():
        cpu = "" if cpu_ms is None else f" {cpu_ms:12.3f} {cpu_ms / (bare_cpu or 1):7.3f}"
        print(
            f"{name:28} {rps:9.0f} {rps / nginx_rps:8.3f} {rps / bare_rps:7.3f} "
            f"{p50:8.3f} {p50 - direct_p50:9.3f}{cpu}"
        )


async def _held_call(port: int, body: bytes, extra: bytes = b"") -> int:
    """One call on its own connection, read to the end like a well-behaved client."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/images/generations HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        b"%sContent-Length: %d\r\n\r\n%s" % (extra, len(body), body)
    )
    try:
        status = int((await reader.readline()).split()[1])
        length = 0
        while line := (await reader.readline()).strip():
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        await reader.readexactly(length)
        return status
    finally:
        writer.close()


async def _upstream_requests(fake_port: int) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", fake_port)
    writer.write(b"GET /_fake/stats HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
    raw = await reader.read()
    writer.close()
    return int(json.loads(raw.split(b"\r\n\r\n", 1)[1])["requests"])


async def _hold(port: int, count: int, pid: int, fake_port: int) -> tuple[int, int, int, int]:
    """Open `count` calls; RSS when the upstream holds all of them, and the peak overall."""
    body = b'{"model":"gpt-image-1","prompt":"a held call"}'
    peak = 0
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_kb(pid))
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample())
    seen_before = await _upstream_requests(fake_port)
    calls = []
    for start in range(0, count, 500):  # open in waves: the listen backlogs are finite
        wave = min(count, start + 500) - start
        calls += [asyncio.create_task(_held_call(port, body)) for _ in range(wave)]
        await asyncio.sleep(0.3)
    deadline = time.monotonic() + 15
    while await _upstream_requests(fake_port) - seen_before < count:
        if time.monotonic() > deadline or any(c.done() for c in calls):
            break  # some calls failed early: reported below as failed
        await asyncio.sleep(0.2)
    await asyncio.sleep(0.5)
    held = rss_kb(pid)
    statuses = await asyncio.gather(*calls, return_exceptions=True)
    done.set()
    await sampler
    ok = sum(1 for s in statuses if s == 200)
    return ok, count - ok, held, peak


def bench_held(count: int, tmp: Path, ports: dict[str, int], nginx_pid: int) -> None:
    fake = f"http://127.0.0.1:{ports['fake']}"
    gw_port, bare_port = free_port(), free_port()
    print(f"\n## {count} generations held in flight at once (upstream answers after 20 s)")
    print("KB/call: RSS growth while the upstream holds all calls, per call; peak: the same at")
    print("the highest RSS seen, including the burst when all answers arrive together")
    print(
        f"{'target':22} {'ok':>6} {'failed':>6} {'base MB':>8} {'held MB':>8} {'KB/call':>8} "
        f"{'peak KB/call':>12}"
    )
    with (
        running(gateway(gw_port, fake + "/v1", tmp), gw_port) as gw_pid,
        running(
            [sys.executable, str(HERE / "bare_proxy.py"), fake, str(bare_port)], bare_port
        ) as bare_pid,
    ):
        targets = [
            ("gateway", gw_port, gw_pid),
            ("nginx reverse proxy", ports["proxy_fake"], nginx_worker(nginx_pid)),
            ("bare aiohttp proxy", bare_port, bare_pid),
        ]
        for name, port, pid in targets:
            asyncio.run(_warm(port))
            before = rss_kb(pid)
            ok, failed, held, peak = asyncio.run(_hold(port, count, pid, ports["fake"]))
            print(
                f"{name:22} {ok:6d} {failed:6d} {before / 1024:8.1f} {held / 1024:8.1f} "
                f"{(held - before) / count:8.1f} {(peak - before) / count:12.1f}"
            )


async def _warm(port: int) -> None:
    # Warm-up calls with no latency: a first call allocates pools and caches once.
    body = b'{"model":"gpt-image-1","prompt":"warm"}'
    for _ in range(20):
        await asyncio.gather(*[_held_call(port, body, b"X-Fake-Latency: 0\r\n") for _ in range(50)])


def bench_large(tmp: Path, ports: dict[str, int]) -> None:
    fake = f"http://127.0.0.1:{ports['fake']}/v1"
    port = free_port()
    with running(gateway(port, fake, tmp), port) as pid:
        asyncio.run(_warm(port))
        before = rss_kb(pid, "VmHWM")
        size = asyncio.run(_large(port))
        after = rss_kb(pid, "VmHWM")
        uploaded, status = asyncio.run(_upload(port, 100 * 2**20))
        after_upload = rss_kb(pid, "VmHWM")
    print("\n## Large bodies through the gateway (peak RSS growth)")
    print(f"answer {size / 2**20:.1f} MB: {(after - before) / 1024:.1f} MB")
    grown_mb = (after_upload - after) / 1024
    print(f"upload {uploaded / 2**20:.1f} MB (status {status}): {grown_mb:.1f} MB")


async def _upload(port: int, size: int) -> tuple[int, int]:
    """A 100 MB body (Nano Banana's limit) sent in 1 MiB writes; the stand-in answers with 404."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/uploads/bench HTTP/1.1\r\nHost: bench\r\nX-Fake-Latency: 0\r\n"
        b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n" % size
    )
    piece = os.urandom(2**20)
    for _ in range(size // len(piece)):
        writer.write(piece)
        await writer.drain()
    status = int((await reader.readline()).split()[1])
    writer.close()
    return size, status


async def _large(port: int) -> int:
    body = b'{"model":"gpt-image-1","prompt":"a large image"}'
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/images/generations HTTP/1.1\r\nHost: bench\r\nX-Fake-Latency: 0\r\n"
        b"X-Fake-Image-Bytes: 15728640\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    size = 0
    while chunk := await reader.read(2**16):
        size += len(chunk)
        await asyncio.sleep(0.001)  # a reader slower than loopback: backpressure must hold
        if size > 15728640 * 4 // 3:
            break
    writer.close()
    return size


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--held", type=int, default=6000)
    parser.add_argument("--skip-held", action="store_true")
    parser.add_argument("--baseline", type=Path, help="another checkout's gateway, side by side")
    parser.add_argument("--rounds", type=int, default=1, help="throughput runs, in turns")
    args = parser.parse_args()
    ensure_tools()
    _raise_fd_limit()
    ports = {name: free_port() for name in ("origin", "proxy", "fake", "proxy_fake")}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        (tmp / "nginx.conf").write_text(NGINX_CONF.format(tmp=tmp, **ports))
        print(f"cores: {os.cpu_count()}; python {sys.version.split()[0]}")
        with (
            running(["nginx", "-c", str(tmp / "nginx.conf")], ports["proxy"]) as nginx_pid,
            running(
                [
                    sys.executable,
                    "-m",
                    "gateway",
                    "fake-upstream",
                    "--port",
                    str(ports["fake"]),
                    "--latency-s",
                    "20",
                    "--image-bytes",
                    "1000",
                ],
                ports["fake"],
            ),
        ):
            baseline = args.baseline.resolve() if args.baseline else None
            bench_throughput(args.seconds, tmp, ports, baseline, args.rounds)
            if not args.skip_held:
                bench_held(args.held, tmp, ports, nginx_pid)
            bench_large(tmp, ports)


if __name__ == "__main__":
    main()
