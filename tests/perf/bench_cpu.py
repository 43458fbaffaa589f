"""Gateway CPU per call, this checkout against another, with the noise floor beside it.

    python -m tests.perf.bench_cpu --baseline DIR [--turns 10] [--seconds 3]

Wall-clock throughput on a shared 2-core machine moves by 10-20 % from run to run, so this
compares CPU seconds per call read from /proc, for `POST /v1/images/generations` (a JSON body, a
bearer key) against an nginx `return 200` origin. Three gateways run at once: this checkout twice
and DIR (e.g. `git worktree add DIR REV`) once; wrk drives each in turn, `--turns` times. The two
copies of this checkout are the same code, so the spread between them is the noise floor any
difference to DIR must clear.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
from pathlib import Path

from tests.perf.bench_sync import (
    NGINX_CONF,
    POST_LUA,
    cpu_s,
    ensure_tools,
    free_port,
    gateway,
    running,
    wrk,
)


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
        gateways = {
            "this checkout": (free_port(), None),
            "this checkout, again": (free_port(), None),
            "--baseline": (free_port(), {"PYTHONPATH": str(args.baseline.resolve())}),
        }
        with contextlib.ExitStack() as stack:
            stack.enter_context(running(["nginx", "-c", str(tmp / "nginx.conf")], ports["proxy"]))
            pids = {
                label: stack.enter_context(running(gateway(port, origin, tmp), port, env, cwd=tmp))
                for label, (port, env) in gateways.items()
            }
            per_call = _measure(gateways, pids, tmp / "post.lua", args.turns, args.seconds)
    print(f"\nPOST /v1/images/generations: gateway CPU µs per call, {args.turns} turns")
    print(f"{'gateway':24} {'min':>7} {'p25':>7} {'median':>7}")
    for label, values in per_call.items():
        p25 = statistics.quantiles(values, n=4)[0]
        print(f"{label:24} {min(values):7.1f} {p25:7.1f} {statistics.median(values):7.1f}")


def _measure(
    gateways: dict[str, tuple[int, dict[str, str] | None]],
    pids: dict[str, int],
    script: Path,
    turns: int,
    seconds: int,
) -> dict[str, list[float]]:
    per_call: dict[str, list[float]] = {label: [] for label in gateways}
    for _ in range(turns):
        for label, (port, _) in gateways.items():
            url = f"http://127.0.0.1:{port}/v1/images/generations"
            wrk(url, 64, 1, script)
            before = cpu_s(pids[label])
            _, _, count = wrk(url, 64, seconds, script)
            per_call[label].append((cpu_s(pids[label]) - before) / count * 1e6)
    return per_call


if __name__ == "__main__":
    main()
