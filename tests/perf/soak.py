"""Soak with chaos: mixed traffic on two replicas and one Redis while things break, checked by
invariants at the end.

    python -m tests.perf.soak [--seconds 120] [--rate 30] [--flood 20]

Replicas A and B (each running workers) share a real Redis (AOF on) and the stand-in process.
Traffic: sync calls (some with stand-in faults: 503, 429, reset, hang, trickle), async tasks
(some followed over SSE and dropped mid-stream), async calls with an Idempotency-Key sent twice,
streamed chat, multipart edits, and callers that hang up mid-call; beside them a second tenant
floods the queue with `--flood` async tasks a second, which must not hold the first one up.
Chaos, in turn: A killed with SIGKILL and started again, Redis stopped and started again.

Invariants: every accepted task ends in exactly one terminal state; a completed task's image is
byte for byte the upstream's; a keyed call reaches the upstream no more often than its task was
started (a kill cuts an attempt, whose generation is lost upstream); replica B's RSS comes back to
within 10% of its warmed-up baseline; no traceback or ERROR in any gateway log. Exit status 1 on
any violation.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import random
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from gateway.fake import png
from tests.procs import GatewayProcess, free_port
from tests.redis_server import RedisServer

KEY = {"Authorization": "Bearer sk-soak"}
SIZES = (2_000, 30_000, 200_000)
TERMINAL = ("completed", "failed", "cancelled")
FAULTS = ("", "", "", "503", "429", "reset", "hang", "trickle")
_HANG_S = 60.0


async def _read_ok(http: aiohttp.ClientSession, url: str) -> bytes:
    """A body as a patient client gets it: a 503 just after a Redis restart is retried."""
    for _ in range(40):
        async with http.get(url, headers=KEY, timeout=aiohttp.ClientTimeout(total=30)) as resp:
            if resp.status != 503:
                return await resp.read()
        await asyncio.sleep(0.25)
    raise AssertionError(f"{url}: still 503 after 10 s")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Soak:
    def __init__(self, tmp: Path, seconds: float, rate: float, flood: float = 0.0) -> None:
        self.tmp, self.seconds, self.rate, self.flood_rate = tmp, seconds, rate, flood
        self.redis = RedisServer(tmp)
        self.fake_port = free_port()
        self.fake = GatewayProcess(
            ["fake-upstream", "--port", str(self.fake_port)], tmp / "fake.log"
        )
        self.procs: dict[str, GatewayProcess] = {}
        self.ports = {"A": free_port(), "B": free_port()}
        self.counts: collections.Counter[str] = collections.Counter()
        self.tasks: dict[str, int] = {}  # task id -> image size asked for
        self.keyed: dict[str, str] = {}  # Idempotency-Key -> task id
        self.violations: list[str] = []

    async def start(self, name: str) -> None:
        port = self.ports[name]
        config = self.tmp / f"{name}.toml"
        config.write_text(
            "[server]\ndrain_timeout_s = 1.0\naccess_log = false\n"
            f"[upstream]\nurl = 'http://127.0.0.1:{self.fake_port}/v1'\n"
            f"[tasks]\nredis_url = '{self.redis.url}'\nworkers = 8\nlease_s = 3.0\n"
        )
        args = ["serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
        log = self.tmp / f"{name}-{len(self.procs)}-{time.monotonic_ns()}.log"
        self.procs[name] = GatewayProcess(args, log)
        await self.procs[name].wait_listening(port, within_s=30)

    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports[random.choice('AB')]}"

    async def one(self, http: aiohttp.ClientSession) -> None:
        kind = random.choice(
            ("sync", "sync", "async", "keyed", "chat", "edit", "hangup", "slowread")
        )
        self.counts[f"requests {kind}"] += 1
        try:
            # No call may hang: the longest legitimate one (a slow reader) takes seconds.
            async with asyncio.timeout(_HANG_S):
                try:
                    await getattr(self, f"_{kind}")(http)
                except TimeoutError:
                    self.counts["requests cut by chaos or by the caller"] += 1
        except TimeoutError:
            self.violations.append(f"a {kind} call hung for {_HANG_S:.0f} s")
        except aiohttp.ClientConnectionError:
            self.counts["requests cut by chaos or by the caller"] += 1
        except aiohttp.ClientPayloadError:
            # A reset mid-answer (or a kill mid-stream) must reach the caller as a cut body.
            self.counts["answers cut mid-body, as they must be"] += 1

    def _generate(self, size: int, **headers: str) -> dict[str, Any]:
        return {
            "json": {"model": "gpt-image-1", "prompt": f"soak {uuid.uuid4()}"},
            "headers": {**KEY, "X-Fake-Image-Bytes": str(size), **headers},
        }

    async def _sync(self, http: aiohttp.ClientSession) -> None:
        fault = random.choice(FAULTS)
        self.counts[f"faults {fault or 'none'}"] += 1
        extra = {"X-Fake-Fault": fault, "X-Fake-Latency": "0.5", "X-Request-Timeout": "3"}
        size = random.choice(SIZES)
        async with http.post(
            f"{self.url()}/v1/images/generations", **self._generate(size, **extra)
        ) as resp:
            body = await resp.read()
        expected = {"": 200, "trickle": 200, "503": 503, "429": 429, "reset": 502, "hang": 504}
        if resp.status != expected[fault]:
            self.violations.append(f"sync fault {fault!r}: {resp.status} {body[:120]!r}")

    async def _async(
        self, http: aiohttp.ClientSession, key: str | None = None, size: int | None = None
    ) -> None:
        size = size or random.choice(SIZES)
        extra = {"Prefer": "respond-async", "X-Fake-Latency": str(random.uniform(0.2, 2))}
        if key:
            extra["Idempotency-Key"] = key
        request = self._generate(size, **extra)
        if key:
            request["json"]["prompt"] = key  # the same request each time
        async with http.post(f"{self.url()}/v1/images/generations", **request) as resp:
            if resp.status == 503:  # Redis is down: a clear, retryable refusal
                self.counts["async refused while Redis was down"] += 1
                return
            task = await resp.json()
        if resp.status != 202:
            self.violations.append(f"async submit: {resp.status} {task}")
            return
        self.tasks[task["id"]] = size
        if key and self.keyed.setdefault(key, task["id"]) != task["id"]:
            self.violations.append(f"key {key} gave two tasks")
        if random.random() < 0.3:  # follow it over SSE, and drop the stream half-way
            async with http.get(
                f"{self.url()}/v1/tasks/{task['id']}/events",
                headers=KEY,
                timeout=aiohttp.ClientTimeout(total=random.uniform(0.1, 1)),
            ) as sse:
                await sse.content.readany()
                self.counts["SSE streams dropped mid-way"] += 1

    async def _keyed(self, http: aiohttp.ClientSession) -> None:
        key, size = f"soak-{uuid.uuid4()}", random.choice(SIZES)
        await self._async(http, key, size)
        await asyncio.sleep(random.uniform(0, 1))
        await self._async(http, key, size)  # the retry: the same task, no second generation

    async def _chat(self, http: aiohttp.ClientSession) -> None:
        async with http.post(
            f"{self.url()}/v1/chat/completions",
            json={"model": "gemini-2.5-flash-image", "stream": True, "messages": []},
            headers={**KEY, "X-Fake-Latency": "0.3"},
        ) as resp:
            body = await resp.read()
        if resp.status != 200 or not body.rstrip().endswith(b"data: [DONE]"):
            self.violations.append(f"streamed chat: {resp.status} {body[-80:]!r}")

    async def _edit(self, http: aiohttp.ClientSession) -> None:
        image = png(random.choice(SIZES))
        form = aiohttp.FormData()
        form.add_field("model", "gpt-image-1")
        form.add_field("prompt", "same")
        form.add_field("image", image, filename="in.png", content_type="image/png")
        async with http.post(f"{self.url()}/v1/images/edits", data=form, headers=KEY) as resp:
            answer = await resp.json()
        if resp.status != 200 or base64.b64decode(answer["data"][0]["b64_json"]) != image:
            self.violations.append(f"edit: {resp.status}")

    async def _slowread(self, http: aiohttp.ClientSession) -> None:
        """A caller on a bad link: 16 KB at a time, with pauses."""
        async with http.post(
            f"{self.url()}/v1/images/generations", **self._generate(SIZES[-1])
        ) as resp:
            body = b""
            while chunk := await resp.content.read(16_384):
                body += chunk
                await asyncio.sleep(0.01)
        image = base64.b64decode(msgspec.json.decode(body)["data"][0]["b64_json"])
        if resp.status != 200 or image != png(SIZES[-1]):
            self.violations.append(f"slow reader: {resp.status}")

    async def _hangup(self, http: aiohttp.ClientSession) -> None:
        try:
            async with http.post(
                f"{self.url()}/v1/images/generations",
                timeout=aiohttp.ClientTimeout(total=0.2),
                **self._generate(2_000, **{"X-Fake-Latency": "1"}),
            ) as resp:
                await resp.read()
        except TimeoutError:
            self.counts["callers hung up mid-call"] += 1

    async def flood(self, http: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        """A second tenant queueing far more than the workers run: it gets its turns (and 429s
        past its caps), the soak's own tasks still end within the check's minute."""
        request = self._generate(2_000, **{"Prefer": "respond-async", "X-Fake-Latency": "1"})
        request["headers"]["Authorization"] = "Bearer sk-flood"
        while not stop.is_set():
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.post(f"{self.url()}/v1/images/generations", **request) as resp:
                    self.counts[f"flood tenant submits answered {resp.status}"] += 1
            await asyncio.sleep(random.expovariate(self.flood_rate))

    async def chaos(self) -> None:
        step = self.seconds / 5
        await asyncio.sleep(step)
        for round_ in range(2):
            self.procs["A"].proc.send_signal(signal.SIGKILL)
            self.procs["A"].proc.wait()
            self.counts["faults: replica killed with SIGKILL"] += 1
            await asyncio.sleep(0.5)
            await self.start("A")
            await asyncio.sleep(step)
            self.redis.stop()
            self.counts["faults: Redis restarted"] += 1
            await asyncio.sleep(0.5)
            self.redis.start()
            if round_ == 0:
                await asyncio.sleep(step)

    async def check(self, http: aiohttp.ClientSession) -> None:
        b = f"http://127.0.0.1:{self.ports['B']}"
        deadline = time.monotonic() + 60
        open_ids = set(self.tasks)
        while open_ids and time.monotonic() < deadline:
            for task_id in list(open_ids):
                async with http.get(f"{b}/v1/tasks/{task_id}", headers=KEY) as resp:
                    if resp.status == 200 and (await resp.json())["status"] in TERMINAL:
                        open_ids.discard(task_id)
            await asyncio.sleep(0.5)
        for task_id in open_ids:
            async with http.get(f"{b}/v1/tasks/{task_id}", headers=KEY) as resp:
                seen = await resp.text()
            self.violations.append(f"task {task_id} never ended: {seen[:200]}")
        async with http.get(f"http://127.0.0.1:{self.fake_port}/_fake/stats") as resp:
            stats = await resp.json()
        attempts: dict[str, int] = {}
        for task_id, size in self.tasks.items():
            if task_id in open_ids:
                continue  # its event stream would wait for an end that never comes
            lines = (await _read_ok(http, f"{b}/v1/tasks/{task_id}/events")).decode().splitlines()
            events = [line[7:] for line in lines if line.startswith("event: ")]
            attempts[task_id] = events.count("in_progress")
            ends = [e for e in events if e in TERMINAL]
            self.counts[f"tasks {ends[-1] if ends else 'open'}"] += 1
            if len(ends) != 1:
                self.violations.append(f"task {task_id}: terminal events {ends}")
            elif ends[0] == "completed":
                answer = msgspec.json.decode(await _read_ok(http, f"{b}/v1/tasks/{task_id}/result"))
                image = base64.b64decode(answer["data"][0]["b64_json"])
                if image != png(size):
                    self.violations.append(f"task {task_id}: result differs from the upstream's")
        most = stats["max_calls_per_key"]
        if self.keyed and most > max(attempts[t] for t in self.keyed.values()):
            self.violations.append(f"a keyed call reached the upstream {most} times")
        self.counts["upstream calls"] = stats["requests"]

    def logs_clean(self) -> None:
        for log in self.tmp.glob("[AB]-*.log"):
            text = log.read_text(errors="replace")
            if "Traceback" in text or " ERROR " in text:
                self.violations.append(f"{log.name}: an unhandled error was logged")

    async def run(self) -> int:
        await self.fake.wait_listening(self.fake_port)
        await self.start("A")
        await self.start("B")
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as http:
            await asyncio.gather(*(self.one(http) for _ in range(20)))  # warm up
            await asyncio.sleep(1)
            baseline = rss_mb(self.procs["B"].proc.pid)
            chaos = asyncio.ensure_future(self.chaos())
            stop_flood = asyncio.Event()
            flood = asyncio.ensure_future(
                self.flood(http, stop_flood) if self.flood_rate else stop_flood.wait()
            )
            load: list[asyncio.Future[None]] = []
            started = time.monotonic()
            while time.monotonic() - started < self.seconds:
                load.append(asyncio.ensure_future(self.one(http)))
                await asyncio.sleep(random.expovariate(self.rate))
            await asyncio.gather(*load)
            stop_flood.set()
            await flood
            await chaos
            await self.check(http)
            await asyncio.sleep(2)
            after = rss_mb(self.procs["B"].proc.pid)
        if after > baseline * 1.10:
            self.violations.append(f"B's RSS {after:.1f} MB vs baseline {baseline:.1f} MB")
        self.logs_clean()
        for name, count in sorted(self.counts.items()):
            print(f"{name:45} {count:7d}")
        print(f"{'replica B RSS, baseline -> after (MB)':45} {baseline:7.1f} -> {after:.1f}")
        print(f"{'violations':45} {len(self.violations):7d}")
        for violation in self.violations[:20]:
            print(f"  {violation}")
        return 1 if self.violations else 0

    def close(self) -> None:
        for proc in self.procs.values():
            proc.close()
        self.fake.close()
        self.redis.stop()


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--rate", type=float, default=30, help="new calls per second")
    parser.add_argument("--flood", type=float, default=20, help="the second tenant's tasks/s")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        soak = Soak(Path(tmp), args.seconds, args.rate, args.flood)
        try:
            return await soak.run()
        finally:
            soak.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
