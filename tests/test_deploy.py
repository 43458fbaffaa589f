"""What SREs ship: a real Prometheus scraping a real gateway under mixed traffic evaluates every
dashboard panel with data; alert rules pass promtool's checks and unit tests; the compose and
Kubernetes files parse and point at files that exist."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
import yaml

from gateway.auth import key_digest
from gateway.config import Config
from tests.conftest import Fake, GatewayFactory, Spawn
from tests.helpers import KEY
from tests.procs import GatewayProcess, free_port
from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARDS = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
CLIENT_KEY = "gw-team-a-0123456789"


def _promtool(*args: str, cwd: Path) -> str:
    assert shutil.which("promtool"), "promtool is missing: .ci/run installs Debian's prometheus"
    done = subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    assert "SUCCESS: 8 rules found" in _promtool(
        "check", "rules", "alerts.yml", cwd=DEPLOY / "prometheus"
    )
    assert "SUCCESS" in _promtool("test", "rules", "alerts.test.yml", cwd=DEPLOY / "prometheus")
    _promtool("check", "config", "prometheus.yml", cwd=DEPLOY / "prometheus")


def test_every_alert_has_a_runbook_line() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert {a["alert"] for a in alerts} >= {
        "GatewayDown",
        "GatewayTimeoutRatioHigh",
        "Gateway5xxRatioHigh",
        "GatewayTaskQueueStuck",
        "GatewayNoLiveWorkers",
        "GatewayRedisErrors",
        "GatewayWebhookReceiverFailing",
        "GatewayWebhooksGivenUp",
    }
    assert all(a["annotations"]["runbook"] and a["annotations"]["summary"] for a in alerts)


def _config(text: str) -> Config:
    return msgspec.convert(msgspec.toml.decode(text.encode()), Config)


def _metrics_port_of(text: str) -> int:
    return _config(text).server.metrics_port


def test_compose_parses_and_mounts_files_that_exist() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    for name, service in compose["services"].items():
        if "build" in service:
            context = DEPLOY / service["build"]["context"]
            assert (context / service["build"]["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source}"
    assert "--appendonly" in compose["services"]["redis"]["command"]
    for name in ("gateway", "worker"):  # results in a volume every replica reads
        assert "results:/results" in compose["services"][name]["volumes"]
        assert "file:///results" in compose["services"][name]["environment"]["GATEWAY_RESULTS_URL"]
    nodes = [s for s in compose["services"].values() if "--cluster-enabled" in s.get("command", [])]
    assert len(nodes) == 6
    assert all(node["profiles"] == ["cluster"] for node in nodes)
    assert "--cluster-replicas 1" in compose["services"]["redis-cluster-init"]["command"][0]
    drain = _config((DEPLOY / "gateway.toml").read_text()).server.drain_timeout_s
    assert float(compose["services"]["gateway"]["stop_grace_period"].rstrip("s")) > drain


def test_the_dockerfile_copies_files_that_exist() -> None:
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source
    assert "USER gateway" in (DEPLOY / "Dockerfile").read_text()
    assert "HEALTHCHECK" in (DEPLOY / "Dockerfile").read_text()


def test_kubernetes_manifests_probe_drain_and_mount_their_config() -> None:
    docs = [
        doc
        for path in sorted((DEPLOY / "k8s").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
    ]
    configs = {
        name: _config(text)
        for doc in docs
        if doc["kind"] == "ConfigMap"
        for name, text in doc["data"].items()
    }
    deployments = [doc for doc in docs if doc["kind"] == "Deployment"]
    assert {d["metadata"]["name"] for d in deployments} == {"image-app", "image-gateway-worker"}
    for deployment in deployments:
        pod = deployment["spec"]["template"]["spec"]
        (gateway,) = [c for c in pod["containers"] if "image-gateway" in c["image"]]
        env = {e["name"]: e.get("value") for e in gateway["env"]}
        config = configs[Path(env["GATEWAY_CONFIG"]).name]
        assert pod["terminationGracePeriodSeconds"] > config.server.drain_timeout_s
        assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert config.server.metrics_port == 9100
        assert env["GATEWAY_RESULTS_URL"].startswith("s3://")  # no shared volume in k8s
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= env.keys()
    worker = next(d for d in deployments if d["metadata"]["name"] == "image-gateway-worker")
    assert worker["spec"]["template"]["spec"]["containers"][0]["args"] == ["worker"]
    assert configs["worker.toml"].tasks.workers > 0


def test_scrapes_probes_and_health_checks_point_at_the_metrics_port() -> None:
    """Prometheus, the pod annotations, the probes and the image's health check all reach
    the operators' port; the callers' port published by compose is not it."""
    port = _metrics_port_of((DEPLOY / "gateway.toml").read_text())
    assert port
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = [
        t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]
    ]
    assert targets
    assert all(t.endswith(f":{port}") for t in targets)
    assert f"127.0.0.1:{port}/healthz" in (DEPLOY / "Dockerfile").read_text()
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert all(not p.endswith(f":{port}") for p in compose["services"]["gateway"]["ports"])
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc["kind"] != "Deployment":
                continue
            pod = doc["spec"]["template"]
            assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)
            (gateway,) = [c for c in pod["spec"]["containers"] if "image-gateway" in c["image"]]
            ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
            assert ports["metrics"] == port
            assert gateway["readinessProbe"]["httpGet"]["port"] == "metrics"


async def test_with_the_shipped_config_metrics_are_off_the_callers_port(
    spawn: Spawn, fake: Fake, http: aiohttp.ClientSession
) -> None:
    """deploy/gateway.toml in key-injection mode (its port moved to a free one): tenants get
    404 for /metrics, even with their key; the operators' port serves it."""
    port = free_port()
    shipped = (DEPLOY / "gateway.toml").read_text()
    moved = shipped.replace(f"metrics_port = {_metrics_port_of(shipped)}", f"metrics_port = {port}")
    assert _metrics_port_of(moved) == port
    keys = f"client_key_sha256 = ['{key_digest(CLIENT_KEY)}']"
    config = f"{moved}\n[upstream]\nurl = '{fake.url}/v1'\n[auth]\n{keys}\n"
    _, url = await spawn(config, {"GATEWAY_UPSTREAM_API_KEY": "sk-UPSTREAM"})
    for headers in ({}, {"Authorization": f"Bearer {CLIENT_KEY}"}):
        async with http.get(f"{url}/metrics", headers=headers) as resp:
            assert resp.status == 404
    async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
        assert resp.status == 200
        assert "gateway_requests_total" in await resp.text()


@pytest.mark.parametrize("mode", ["injecting", "passing through"])
async def test_key_injection_never_serves_metrics_on_the_callers_port(
    gateway_factory: GatewayFactory, http: aiohttp.ClientSession, mode: str
) -> None:
    """config/gateway.toml (no metrics port): holding the organisation's key, the gateway keeps
    every tenant's traffic to itself; passing through, /metrics stays where the contract has it."""
    auth = {"client_key_sha256": [key_digest(CLIENT_KEY)], "upstream_api_key": "sk-UPSTREAM"}
    gateway = await gateway_factory(auth=auth if mode == "injecting" else {})
    assert gateway.config.server.metrics_port == Config().server.metrics_port == 0
    async with http.get(
        f"{gateway.url}/metrics", headers={"Authorization": f"Bearer {CLIENT_KEY}"}
    ) as resp:
        assert resp.status == (404 if mode == "injecting" else 200)


def _exprs(dashboard: dict[str, Any]) -> list[tuple[str, list[str]]]:
    return [(p["title"], [t["expr"] for t in p["targets"]]) for p in dashboard["panels"]]


def _concrete(expr: str) -> str:
    """A panel's query as Grafana sends it with every instance and model selected."""
    return expr.replace("$__rate_interval", "1m").replace("$instance", ".*").replace("$model", ".*")


def _base(metric: str) -> str:
    """A metric's family name, whichever of its series a query or the exposition names."""
    return re.sub(r"_(bucket|count|sum|total|info)$", "", metric)


@pytest.fixture
async def prometheus(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    """A real Prometheus (Debian's package); the test writes the gateway target in."""
    assert shutil.which("prometheus"), "prometheus is missing: .ci/run installs it"
    port = free_port()
    targets = tmp_path / "targets.json"
    targets.write_text("[]")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: image-gateway\n"
        f"    file_sd_configs: [{{files: ['{targets}'], refresh_interval: 1s}}]\n"
    )
    proc = GatewayProcess.command(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        tmp_path / "prometheus.log",
    )
    try:
        await proc.wait_listening(port, within_s=30)
        yield f"http://127.0.0.1:{port}", targets
    finally:
        proc.close()


async def _until_scraped(http: aiohttp.ClientSession, prom_url: str) -> None:
    for _ in range(300):
        async with http.get(
            f"{prom_url}/api/v1/query", params={"query": 'up{job="image-gateway"} == 1'}
        ) as resp:
            if (await resp.json())["data"]["result"]:
                return
        await asyncio.sleep(0.1)
    raise AssertionError("Prometheus never scraped the gateway")


async def _traffic(http: aiohttp.ClientSession, url: str) -> None:
    """Sync, async with its events, an upstream 503, a deadline and a caller hanging up."""
    generate = f"{url}/v1/images/generations"
    body = {"model": "gpt-image-1", "prompt": "x"}
    for _ in range(3):
        async with http.post(generate, json=body, headers=KEY) as resp:
            assert resp.status == 200
    async with http.post(generate, json=body, headers={**KEY, "X-Fake-Fault": "503"}) as resp:
        assert resp.status == 503
    slow = {**KEY, "X-Fake-Latency": "2", "X-Request-Timeout": "0.3"}
    async with http.post(generate, json=body, headers=slow) as resp:
        assert resp.status == 504
    with pytest.raises(TimeoutError):
        async with http.post(
            generate,
            json=body,
            headers={**KEY, "X-Fake-Latency": "2"},
            timeout=aiohttp.ClientTimeout(total=0.3),
        ) as resp:
            await resp.read()
    async with http.post(generate, json=body, headers={**KEY, "Prefer": "respond-async"}) as resp:
        task = await resp.json()
    async with http.get(f"{url}/v1/tasks/{task['id']}/events", headers=KEY) as resp:
        await resp.read()


async def test_prometheus_scrapes_a_gateway_and_every_dashboard_panel_shows_data(
    spawn: Spawn, fake: Fake, redis_server: RedisServer, prometheus: tuple[str, Path]
) -> None:
    prom_url, targets = prometheus
    metrics_port = free_port()
    team_a = key_digest(KEY["Authorization"].removeprefix("Bearer "))
    _, url = await spawn(
        f"[server]\nmetrics_port = {metrics_port}\n[upstream]\nurl = '{fake.url}/v1'\n"
        f"[tasks]\nredis_url = '{redis_server.url}'\nkey_prefix = 'prom'\n"
        # A named client with a budget: the spend panel's series; with a webhook to a port
        # nothing listens on: the webhook panels' (its async task's end fails a try).
        f"[clients.team-a]\nkey_sha256 = ['{team_a}']\n"
        "daily_budget_usd = 100.0\n"
        f"webhook_url = 'http://127.0.0.1:{free_port()}/hooks'\n"
        f"webhook_secret = 'whsec_{base64.b64encode(bytes(32)).decode()}'\n"
    )
    targets.write_text(json.dumps([{"targets": [f"127.0.0.1:{metrics_port}"]}]))
    async with aiohttp.ClientSession() as http:
        await _until_scraped(http, prom_url)
        await _traffic(http, url)
        await asyncio.sleep(4)  # several scrapes after the traffic
        async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as resp:
            exported = {_base(n) for n in re.findall(r"^# TYPE (\w+)", await resp.text(), re.M)}
        async with http.get(
            f"{prom_url}/api/v1/label/instance/values",
            params={"match[]": "gateway_build_info"},
        ) as resp:
            assert (await resp.json())["data"], "the instance variable would be empty"
        empty: list[str] = []
        for dashboard in DASHBOARDS:
            for title, exprs in _exprs(json.loads(dashboard.read_text())):
                results = []
                for expr in exprs:
                    bases = {_base(n) for n in re.findall(r"\bgateway_\w+", expr)}
                    assert bases <= exported, f"{dashboard.name} {title}: {bases - exported}"
                    async with http.get(
                        f"{prom_url}/api/v1/query", params={"query": _concrete(expr)}
                    ) as resp:
                        answer = await resp.json()
                    assert answer["status"] == "success", f"{title}: {answer}"
                    results.append(answer["data"]["result"])
                if not any(results):
                    empty.append(f"{dashboard.name}: {title}")
    assert not empty, f"panels without data: {empty}"
