"""Gateway CPU per call, this checkout against another, with the noise floor beside it.

    python -m tests.perf.bench_cpu --baseline DIR [--turns 10] [--seconds 3]

Wall-clock throughput on a shared 2-core machine moves by 10-20 % from run to run, so this
compares CPU seconds per call read from /proc, for `POST /v1/images/generations` (a JSON body, a
bearer key) against an nginx `return 200` origin. Five proxies run at once: this checkout twice,
this checkout with its access log off, DIR (e.g. `git worktree add DIR REV`), and the bare
30-line aiohttp proxy; wrk drives each in turn, `--turns` times. The two copies of this checkout
are the same code, so the spread between them is the noise floor any difference must clear.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
from pathlib import Path

from tests.perf.bench_sync import (
    HERE,
    NGINX_CONF,
    POST_LUA,
    cpu_s,
    ensure_tools,
    free_port,
    gateway,
    running,
    wrk,
)

BARE = HERE / "bare_proxy.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="checkout to compare with")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--seconds", type=int, default=3)
    args = parser.parse_args()
    ensure_tools()
    ports = {name: free_port() for name in ("origin", "proxy", "fake", "proxy_fake")}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        (tmp / "nginx.conf").write_text(NGINX_CONF.format(tmp=tmp, **ports))
        (tmp / "post.lua").write_text(POST_LUA)
        origin = f"http://127.0.0.1:{ports['origin']}"
        base = {"PYTHONPATH": str(args.baseline.resolve())}
        proxies: dict[str, tuple[int, list[str], dict[str, str] | None]] = {}
        for label, env, log in (
            ("this checkout", None, True),
            ("this checkout, again", None, True),
            ("access log off", None, False),
            ("--baseline", base, True),
        ):
            port = free_port()
            proxies[label] = (port, gateway(port, origin, tmp, access_log=log), env)
        port = free_port()
        proxies["bare aiohttp proxy"] = (port, [sys.executable, str(BARE), origin, str(port)], None)
        with contextlib.ExitStack() as stack:
            stack.enter_context(running(["nginx", "-c", str(tmp / "nginx.conf")], ports["proxy"]))
            pids = {
                label: stack.enter_context(running(argv, port, env, cwd=tmp))
                for label, (port, argv, env) in proxies.items()
            }
            gateways = {label: port for label, (port, _, _) in proxies.items()}
            per_call = _measure(gateways, pids, tmp / "post.lua", args.turns, args.seconds)
    bare = statistics.median(per_call["bare aiohttp proxy"])
    print(f"\nPOST /v1/images/generations: proxy CPU µs per call, {args.turns} turns")
    print(f"{'proxy':24} {'min':>7} {'p25':>7} {'median':>7} {'x bare':>7}")
    for label, values in per_call.items():
        p25 = statistics.quantiles(values, n=4)[0]
        median = statistics.median(values)
        print(f"{label:24} {min(values):7.1f} {p25:7.1f} {median:7.1f} {median / bare:7.3f}")


def _measure(
    gateways: dict[str, int],
    pids: dict[str, int],
    script: Path,
    turns: int,
    seconds: int,
) -> dict[str, list[float]]:
    per_call: dict[str, list[float]] = {label: [] for label in gateways}
    for _ in range(turns):
        for label, port in gateways.items():
            url = f"http://127.0.0.1:{port}/v1/images/generations"
            wrk(url, 64, 1, script)
            before = cpu_s(pids[label])
            _, _, count = wrk(url, 64, seconds, script)
            per_call[label].append((cpu_s(pids[label]) - before) / count * 1e6)
    return per_call


if __name__ == "__main__":
    main()
