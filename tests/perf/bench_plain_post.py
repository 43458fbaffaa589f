"""What the run-once machinery costs a plain sync call: nothing, shown side by side.

    python -m tests.perf.bench_plain_post --baseline DIR [--seconds 10]

DIR is a checkout of the gateway from before the feature (e.g. `git worktree add /tmp/base
<commit>`). Both gateways forward `POST /v1/images/generations` (a JSON body, no
Idempotency-Key, no SDK header) to an nginx `return 200` origin, and are measured in turns in one
run with wrk: throughput at 64 connections and median latency at one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from tests.perf.bench_sync import NGINX_CONF, ensure_tools, free_port, gateway, running, wrk

POST_LUA = """
wrk.method = "POST"
wrk.body = '{"model": "gpt-image-1", "prompt": "a lighthouse at dawn", "size": "1024x1024"}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench"
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="checkout to compare with")
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    ensure_tools()
    ports = {name: free_port() for name in ("origin", "proxy", "fake", "proxy_fake")}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        (tmp / "nginx.conf").write_text(NGINX_CONF.format(tmp=tmp, **ports))
        (tmp / "post.lua").write_text(POST_LUA)
        origin = f"http://127.0.0.1:{ports['origin']}"
        now_port, base_port = free_port(), free_port()
        base_env = {"PYTHONPATH": str(args.baseline.resolve())}
        with (
            running(["nginx", "-c", str(tmp / "nginx.conf")], ports["proxy"]),
            # Started outside any checkout, so each imports the gateway it is meant to.
            running(gateway(now_port, origin, tmp, access_log=False), now_port, cwd=tmp),
            running(
                gateway(base_port, origin, tmp, access_log=False), base_port, base_env, cwd=tmp
            ),
        ):
            results: dict[str, list[tuple[float, float]]] = {"before": [], "now": []}
            for _ in range(2):  # in turns, so drift on a shared machine hits both alike
                for label, port in (("before", base_port), ("now", now_port)):
                    url = f"http://127.0.0.1:{port}/v1/images/generations"
                    wrk(url, 64, 2, script=tmp / "post.lua")
                    rps, _ = wrk(url, 64, args.seconds, script=tmp / "post.lua")
                    _, p50 = wrk(url, 1, args.seconds, script=tmp / "post.lua")
                    results[label].append((rps, p50))
    print(f"\nPOST /v1/images/generations, no key, no SDK header (python {sys.version.split()[0]})")
    print(f"{'gateway':10} {'req/s (each turn)':>22} {'p50 ms (each turn)':>22}")
    for label, runs in results.items():
        rps_text = " ".join(f"{r:8.0f}" for r, _ in runs)
        p50_text = " ".join(f"{p:8.3f}" for _, p in runs)
        print(f"{label:10} {rps_text:>22} {p50_text:>22}")
    ratio = sum(r for r, _ in results["now"]) / sum(r for r, _ in results["before"])
    print(f"now / before throughput: {ratio:.3f}")


if __name__ == "__main__":
    main()
