"""Typed configuration: a TOML file decoded into frozen structs, then environment overrides.

The struct defaults are the shipped `config/gateway.toml` (a test keeps the two equal), so the
gateway runs with no file at all.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from aiohttp import web

from gateway.tasks.models import QueueCaps

DEFAULT_CONFIG_PATH = Path("config/gateway.toml")
# Results store URLs: a directory, or a bucket (S3 and GCS naming rules, loosely) and a prefix.
_IMAGE_BASE_URL = re.compile(r"https?://[^/?#\s]+(/[^?#\s]*)?")
# Where a client's webhooks go: an http(s) URL with a host (a query may carry a token).
_WEBHOOK_URL = re.compile(r"https?://[^/?#\s@]+([/?][^#\s]*)?")
_RESULTS_URL = re.compile(r"file:///[^?#]*|s3://[a-z0-9][a-z0-9._-]*[a-z0-9](/[^?#]*)?")


# What a caller whose key is in no [clients.<name>] is counted as.
UNNAMED = "unnamed"

# Every number in the config has a range, checked as the file is decoded, so the error names the
# key (msgspec's path). Counts whose 0 means "no cap" or "off" are `Count`s.
Count = Annotated[int, msgspec.Meta(ge=0)]
AtLeastOne = Annotated[int, msgspec.Meta(ge=1)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]
Share = Annotated[float, msgspec.Meta(ge=0, le=1)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
# Linux's limits for the keep-alive socket options (larger values fail setsockopt at start).
_KeepaliveSeconds = Annotated[int, msgspec.Meta(ge=1, le=32767)]


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file and the key."""


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class ServerConfig(_Section, frozen=True):
    host: str = "0.0.0.0"
    port: Port = 8080
    # Nano Banana accepts 100 MB uploads; leave room for multipart framing and base64 JSON.
    max_body_bytes: AtLeastOne = 140 * 2**20
    # Request bodies up to this size are held in memory; larger ones wait in a temporary file
    # until they have fully arrived (no upstream connection is taken before that).
    body_memory_bytes: Count = 2**20
    # A caller whose body stops arriving for this long gets 408 (nginx's client_body_timeout).
    body_read_timeout_s: Seconds = 60.0
    # How long SIGTERM waits for in-flight calls before cutting them.
    drain_timeout_s: Seconds = 30.0
    # Idle caller connections are closed after this long without a request.
    idle_timeout_s: Seconds = 75.0
    access_log: bool = True
    # Access log lines as JSON objects instead of text.
    access_log_json: bool = False
    # Serve /metrics (with /healthz and /readyz) on this port instead of the main one, so
    # tenants cannot read it (0: on the main port, except in key-injection mode, where /metrics
    # is served on this port only). `gateway worker` serves only this.
    metrics_port: Port = 0
    # Connections held open while nothing goes upstream (task event streams, `Prefer: wait`)
    # per caller and in total on this replica; past either, 429 too_many_connections at once
    # (nginx's limit_conn; 0: no cap). Unset total: half the open-file limit, so the cap is met
    # before accept() runs out of file descriptors and resets everyone's connections.
    held_per_caller: Count = 256
    held_total: Count | None = None
    # Task answers too large to send at once (over tasks.result_inline_bytes) that one caller
    # may be reading at once on this replica; past it, 429 too_many_connections.
    result_readers_per_caller: Count = 8
    # Request bytes of calls run as tasks (async, keyed, SDK calls) that this replica holds in
    # memory at once, per API key and in all, until each is stored or answered; past either,
    # 429 too_many_bytes_in_flight (0: no cap).
    task_body_bytes_per_caller: Count = 256 * 2**20
    task_body_bytes_total: Count = 2**30


class UpstreamConfig(_Section, frozen=True):
    url: str = "https://api.apiyi.com/v1"
    connect_timeout_s: Seconds = 10.0
    # A failed connect sent nothing, so it is safe to try again.
    connect_retries: Count = 1
    # Most upstream connections open at once (0: no limit).
    pool_size: Count = 1000
    # Idle pooled connections are closed before the upstream's own idle timer can race us.
    idle_timeout_s: Seconds = 30.0
    # Share of `pool_size` one caller credential may hold at once; a call over it gets 429
    # (0: no cap). Keeps one tenant from taking every connection the others need.
    credential_share: Share = 0.25

    @property
    def per_credential(self) -> int:
        """Upstream calls one credential may have in flight on this replica (0: no cap)."""
        if self.pool_size <= 0 or self.credential_share <= 0:
            return 0
        return max(1, int(self.pool_size * self.credential_share))


class TcpKeepaliveConfig(_Section, frozen=True):
    # Far below NAT and load-balancer idle timers (AWS NAT 350 s, ALB 60 s) so a silent
    # multi-minute generation keeps its connections alive on both sides.
    idle_s: _KeepaliveSeconds = 30
    interval_s: _KeepaliveSeconds = 10
    count: Annotated[int, msgspec.Meta(ge=1, le=127)] = 5


def _default_model_timeouts() -> dict[str, float]:
    # APIYI's published generation times, with headroom: they have jumped several-fold on bad days.
    return {
        "gpt-image-1": 300.0,
        "gpt-image-1-mini": 180.0,
        "gpt-image-1.5": 300.0,
        "gpt-image-2": 480.0,
        "gpt-image-2-all": 300.0,
        "gpt-image-2-vip": 480.0,
        "dall-e-3": 180.0,
        "gemini-2.5-flash-image": 90.0,
        "gemini-2.5-flash-image-preview": 90.0,
        "gemini-3-pro-image-preview": 600.0,
        "seedream-4-0-250828": 180.0,
        "seedream-4-5-251128": 180.0,
        "flux-kontext-pro": 180.0,
        "flux-kontext-max": 180.0,
    }


class TimeoutsConfig(_Section, frozen=True):
    default_s: Seconds = 300.0
    models: dict[str, float] = msgspec.field(default_factory=_default_model_timeouts)

    def for_model(self, model: str | None) -> float:
        if model is None:
            return self.default_s
        return self.models.get(model, self.default_s)


class TasksConfig(_Section, frozen=True):
    # Redis for tasks (GATEWAY_REDIS_URL); unset: the embedded store (one replica, lost on restart).
    redis_url: str | None = None
    # Prefix of every Redis key, so several gateways can share one Redis.
    key_prefix: str = "gw"
    # A running task whose worker stops renewing its lease this long is run by another worker.
    lease_s: Seconds = 30.0
    # After this many lost workers a task fails with `worker_lost` instead of running again.
    max_deliveries: AtLeastOne = 3
    # Async tasks run by this replica at once.
    workers: Count = 16
    # Tasks running at once over all replicas, per model and per upstream credential (0: no
    # limit). APIYI limits concurrency per model and key; excess tasks wait queued instead of
    # collecting 429s.
    model_concurrency: dict[str, int] = msgspec.field(default_factory=dict)
    default_model_concurrency: Count = 0
    credential_concurrency: Count = 0
    # Tasks one caller may have queued (not yet running), and their request bytes; past either
    # a submit gets 429 with Retry-After. Queued tasks are served in turn across callers, so
    # these bound memory, not fairness.
    max_queued_per_caller: Count = 1000
    max_queued_bytes_per_caller: Count = 256 * 2**20
    # The same for all callers together: in pass-through every bearer a caller makes up is a
    # caller of its own, so only these bound what a flood of them may queue.
    max_queued_total: Count = 10_000
    max_queued_bytes_total: Count = 2**30
    # How long a task, its events and its result are kept after it was created.
    retention_s: Seconds = 86400.0
    # Largest upstream answer kept as a task result; a larger one fails the task clearly.
    result_max_bytes: AtLeastOne = 32 * 2**20
    # Where results larger than result_inline_bytes live (GATEWAY_RESULTS_URL): unset keeps them
    # in the task store; file:///dir a directory shared by the replicas; s3://bucket/prefix
    # S3-compatible storage, endpoint and credentials from the AWS_* environment.
    results_url: str | None = None
    result_inline_bytes: Count = 64 * 1024
    # The most one result's write to the results store may take, retries included: a store that
    # hangs fails the task (result_store_unavailable) this soon, instead of holding a worker.
    result_store_timeout_s: Seconds = 10.0
    # With replicas, a task's creation and its end wait (WAIT) up to this long for one of them
    # to have the write, so a failover does not lose an accepted task or a paid answer. 0: off.
    replica_ack_timeout_ms: Count = 100
    # The most a caller waits for the task store (Redis) on its request's path: a hung Redis
    # is then an outage, not a 15 s stall (an SDK call goes upstream plainly, a keyed or async
    # one gets a retryable 503), and a task whose caller was answered so never runs.
    store_timeout_s: Seconds = 2.0
    # Image addresses in kept answers (tasks, run-once calls) that expire upstream (Flux's in
    # 10 min) are copied into the results store when the task ends and served by the gateway
    # until retention (tasks/images.py). Hosts fetched from ("*.example.com": its subdomains);
    # empty: nothing is fetched. No results store: nothing is either.
    image_fetch_hosts: frozenset[str] = frozenset()
    # The most copying one answer's images may take, and one image's largest size.
    image_fetch_timeout_s: Seconds = 30.0
    image_fetch_max_bytes: AtLeastOne = 32 * 2**20
    # Fetch from private, loopback and link-local addresses too (a stand-in on localhost).
    image_fetch_private: bool = False
    # The gateway's address as callers reach it ("https://gw.example.com"), which the copies'
    # URLs start with; empty: they are paths (/v1/files/...) on the gateway's address.
    image_base_url: str = ""

    def queue_caps(self) -> QueueCaps:
        return QueueCaps(
            per_caller=self.max_queued_per_caller,
            bytes_per_caller=self.max_queued_bytes_per_caller,
            total=self.max_queued_total,
            bytes_total=self.max_queued_bytes_total,
        )

    def limits(
        self, model: str | None, credential: str, caller: str, per_caller: int
    ) -> list[tuple[str, int]]:
        """The concurrency slots a task of `model` needs: its model's, its upstream
        `credential`'s and its `caller`'s (keyed hashes; `per_caller` is the caller's share of
        the upstream pool, so tasks cannot take what its sync calls may not)."""
        per_model = self.model_concurrency.get(model or "", self.default_model_concurrency)
        slots = [
            (f"model:{model}", per_model),
            (f"credential:{credential}", self.credential_concurrency),
            (f"caller:{caller}", per_caller),
        ]
        return [(slot, limit) for slot, limit in slots if limit > 0]


class IdempotencyConfig(_Section, frozen=True):
    # How long an Idempotency-Key finds its call (and its stored answer) again.
    retention_s: Seconds = 86400.0
    # How long an OpenAI SDK retry (x-stainless-retry-count >= 1) finds the call it retries, and
    # how long the answer of a sync SDK call is kept after its caller dropped.
    sdk_window_s: Seconds = 900.0
    # Run sync OpenAI SDK calls (bodies up to 64 KiB, not streamed) as tasks, so that a caller
    # that drops does not cancel a generation it paid for and its retry attaches to it.
    sdk_calls_as_tasks: bool = True


class AdmissionConfig(_Section, frozen=True):
    # Sync upstream calls at once per model on this replica (0: no limit); split APIYI's
    # per-model concurrency among the replicas. Callers over it wait, credentials in turn, until
    # their deadline, then get 429 with Retry-After. (Async tasks: tasks.model_concurrency.)
    model_concurrency: dict[str, int] = msgspec.field(default_factory=dict)
    default_concurrency: Count = 0
    # Most sync callers waiting at once on this replica; more get 429 at once.
    max_waiting: Count = 1000


class AuthConfig(_Section, frozen=True):
    # SHA-256 hex digests of the client keys accepted when the gateway injects its own key,
    # besides those of the named clients (`[clients.<name>]`); these are counted as "unnamed".
    client_key_sha256: frozenset[str] = frozenset()
    # Prefer GATEWAY_UPSTREAM_API_KEY: a key in a file ends up in backups and diffs.
    upstream_api_key: str | None = None


# A client's name: a Prometheus label value and a word in log lines and webhook payloads.
ClientName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
Dollars = Annotated[float, msgspec.Meta(ge=0)]


class ClientConfig(_Section, frozen=True):
    """One named client: its keys, what it may spend, and where its tasks announce their end."""

    # SHA-256 hex digests of this client's keys (`gateway hash-key`); in key-injection mode
    # they are accepted as auth.client_key_sha256's are.
    key_sha256: frozenset[str] = frozenset()
    # Estimated spend (from [prices]) allowed per UTC day and per UTC month, in USD (0: none).
    daily_budget_usd: Dollars = 0.0
    monthly_budget_usd: Dollars = 0.0
    # Where this client's async tasks announce their end (a Standard Webhooks POST), and the
    # secret they are signed with ("whsec_" and base64). Empty: no webhooks.
    webhook_url: str = ""
    webhook_secret: str = ""


def _default_prices() -> dict[str, dict[str, float]]:
    # The vendors' list prices per image in USD (OpenAI, Google, ByteDance, Black Forest Labs,
    # late 2025): estimates, not APIYI's bill, which is its own and usually lower. Keys:
    # "size/quality", "size", "/quality", "default", tried in that order.
    gpt_image = {
        "default": 0.042,
        "/low": 0.011,
        "/medium": 0.042,
        "/high": 0.167,
        "1024x1024/low": 0.011,
        "1024x1024/medium": 0.042,
        "1024x1024/high": 0.167,
        "1536x1024/low": 0.016,
        "1536x1024/medium": 0.063,
        "1536x1024/high": 0.25,
        "1024x1536/low": 0.016,
        "1024x1536/medium": 0.063,
        "1024x1536/high": 0.25,
        "1536x1024": 0.063,
        "1024x1536": 0.063,
    }
    return {
        "gpt-image-1": gpt_image,
        # Newer gpt-image models priced as gpt-image-1 until their own prices are set.
        "gpt-image-1.5": gpt_image,
        "gpt-image-2": gpt_image,
        "gpt-image-2-all": gpt_image,
        "gpt-image-2-vip": gpt_image,
        "gpt-image-1-mini": {
            "default": 0.011,
            "/low": 0.005,
            "/medium": 0.011,
            "/high": 0.036,
            "1536x1024/low": 0.006,
            "1536x1024/medium": 0.015,
            "1536x1024/high": 0.052,
            "1024x1536/low": 0.006,
            "1024x1536/medium": 0.015,
            "1024x1536/high": 0.052,
        },
        "dall-e-3": {
            "default": 0.04,
            "/hd": 0.08,
            "1024x1792": 0.08,
            "1792x1024": 0.08,
            "1024x1792/hd": 0.12,
            "1792x1024/hd": 0.12,
        },
        "gemini-2.5-flash-image": {"default": 0.039},
        "gemini-2.5-flash-image-preview": {"default": 0.039},
        "gemini-3-pro-image-preview": {"default": 0.134, "4K": 0.24},
        "seedream-4-0-250828": {"default": 0.03},
        "seedream-4-5-251128": {"default": 0.04},
        "flux-kontext-pro": {"default": 0.04},
        "flux-kontext-max": {"default": 0.08},
    }


class UsageConfig(_Section, frozen=True):
    # What one image of a model missing from [prices] is estimated at: high, so that an unpriced
    # model spends a budget rather than slipping past it at $0 (each such model is logged once
    # and counted in gateway_unpriced_images_total).
    unpriced_image_usd: Dollars = 0.2
    # A budgeted client's call when the task store (Redis) cannot be asked within
    # tasks.store_timeout_s: "open" lets it through uncounted against the budget (counted in
    # gateway_budget_unchecked_total), "closed" refuses it with a retryable 503.
    budget_store_down: Literal["open", "closed"] = "open"


# An origin as browsers send it: no path, no trailing slash, no wildcard.
_Origin = Annotated[str, msgspec.Meta(pattern=r"^https?://[^/?#\s*]+$")]


class CorsConfig(_Section, frozen=True):
    # Origins (scheme://host[:port]) whose pages may call the gateway from a browser; none by
    # default. The gateway answers their preflights itself, never the upstream.
    allowed_origins: frozenset[_Origin] = frozenset()
    # How long a browser may cache a preflight's answer.
    preflight_max_age_s: Annotated[int, msgspec.Meta(ge=0)] = 600
    # How long the signed events/result links in a task object work (0: none are given).
    signed_link_ttl_s: Annotated[float, msgspec.Meta(ge=0)] = 600.0


def _default_retry_delays() -> tuple[float, ...]:
    # Standard Webhooks' (Svix's) schedule: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h; a receiver
    # down for most of a day still gets the event.
    return (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)


class WebhooksConfig(_Section, frozen=True):
    # After a failed delivery (no 2xx answer within timeout_s; a redirect is not followed), the
    # next one waits these seconds in turn; after the last the event is given up (logged and
    # counted). Every try carries the same webhook-id, so a receiver can drop repeats.
    retry_delays_s: tuple[Seconds, ...] = msgspec.field(default_factory=_default_retry_delays)
    timeout_s: Seconds = 10.0
    # Deliveries one replica makes at once, and to one client's receiver: a receiver that hangs
    # until timeout_s holds no more than this many, and other clients' events go meanwhile.
    concurrency: AtLeastOne = 16
    concurrency_per_client: AtLeastOne = 4


class Config(_Section, frozen=True):
    server: ServerConfig = ServerConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    tcp_keepalive: TcpKeepaliveConfig = TcpKeepaliveConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()
    tasks: TasksConfig = TasksConfig()
    idempotency: IdempotencyConfig = IdempotencyConfig()
    admission: AdmissionConfig = AdmissionConfig()
    auth: AuthConfig = AuthConfig()
    cors: CorsConfig = CorsConfig()
    webhooks: WebhooksConfig = WebhooksConfig()
    clients: dict[ClientName, ClientConfig] = {}
    usage: UsageConfig = UsageConfig()
    # Estimated USD per image, by model (UsageConfig, _default_prices).
    prices: dict[str, dict[str, float]] = msgspec.field(default_factory=_default_prices)

    @property
    def client_digests(self) -> dict[str, str]:
        """Every client key's SHA-256 digest, and the name its calls are counted under."""
        named = {d: name for name, client in self.clients.items() for d in client.key_sha256}
        return {d: UNNAMED for d in self.auth.client_key_sha256} | named

    @property
    def metrics_on_main_port(self) -> bool:
        """Whether the callers' port serves /metrics: not when an operators' port is set, and
        never in key-injection mode, where callers are tenants of the organisation's key and
        the metrics tell each the others' traffic."""
        return not self.server.metrics_port and self.auth.upstream_api_key is None


CONFIG = web.AppKey("config", Config)

# (environment variable, section, key): the contract fixes these names.
_ENV_OVERRIDES = (
    ("GATEWAY_UPSTREAM_URL", "upstream", "url"),
    ("GATEWAY_UPSTREAM_API_KEY", "auth", "upstream_api_key"),
    ("GATEWAY_REDIS_URL", "tasks", "redis_url"),
    ("GATEWAY_RESULTS_URL", "tasks", "results_url"),
)


def load_config(path: Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read `path` (or GATEWAY_CONFIG, or the default file when present) and apply the env."""
    env = os.environ if env is None else env
    explicit = path or (Path(env["GATEWAY_CONFIG"]) if env.get("GATEWAY_CONFIG") else None)
    file = explicit or DEFAULT_CONFIG_PATH
    raw: dict[str, Any] = {}
    if explicit is not None or file.exists():
        try:
            raw = msgspec.toml.decode(file.read_bytes())
        except OSError as exc:
            raise ConfigError(f"{file}: {exc.strerror}") from exc
        except msgspec.DecodeError as exc:
            raise ConfigError(f"{file}: {exc}") from exc
    for var, section, key in _ENV_OVERRIDES:
        if env.get(var):
            table = raw.setdefault(section, {})
            if isinstance(table, dict):
                table[key] = env[var]
    try:
        _convert_clients(raw)
        config = msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{file}: {_named(exc)}") from exc
    except ConfigError as exc:
        raise ConfigError(f"{file}: {exc}") from exc
    _check(config, file, env)
    return config


def _convert_clients(raw: dict[str, Any]) -> None:
    """Each [clients.<name>] table checked on its own first, so an error names the client
    (msgspec's path for a table's value is `[...]`)."""
    clients = raw.get("clients")
    if not isinstance(clients, dict):
        return
    for name, table in clients.items():
        try:
            msgspec.convert(table, ClientConfig)
        except msgspec.ValidationError as exc:
            what, at, path = str(exc).rpartition(" - at `$.")
            key = f"clients.{name}.{path.rstrip('`')}" if at else f"clients.{name}"
            message = what if at else str(exc)
            raise ConfigError(f"{key}: {message[:1].lower()}{message[1:]}") from exc


def _named(exc: msgspec.ValidationError) -> str:
    """msgspec's "Expected `int` >= 0 - at `$.tasks.workers`" as "tasks.workers: expected
    `int` >= 0": the key first, as the file spells it."""
    what, at, path = str(exc).rpartition(" - at `$.")
    if not at:
        return str(exc)
    return f"{path.rstrip('`')}: {what[:1].lower()}{what[1:]}"


def _is_redis_url(url: str) -> bool:
    """What redis-py's `from_url` takes: its schemes, and a port it can read."""
    if not url.lower().startswith(("redis://", "rediss://", "unix://")):
        return False
    try:
        urllib.parse.urlsplit(url).port  # noqa: B018 (raises on a port that is not one)
    except ValueError:
        return False
    return True


def _check_per_model(config: Config, file: Path) -> None:
    """The per-model tables, checked here rather than by type so the error names the model
    (msgspec's path for a table's value is `[...]`)."""
    tables = (
        ("timeouts.models", config.timeouts.models, "> 0"),
        ("tasks.model_concurrency", config.tasks.model_concurrency, ">= 0"),
        ("admission.model_concurrency", config.admission.model_concurrency, ">= 0"),
    )
    for key, table, rule in tables:
        for model, value in table.items():
            if not (value > 0 if rule == "> 0" else value >= 0):  # NaN fails both
                raise ConfigError(f'{file}: {key}."{model}" must be {rule}')
    for model, prices in config.prices.items():
        for which, usd in prices.items():
            if not usd >= 0:  # NaN fails too
                raise ConfigError(f'{file}: prices."{model}"."{which}" must be >= 0')


def _check(config: Config, file: Path, env: Mapping[str, str]) -> None:
    def where(key: str) -> str:
        """Where a value came from: its environment variable, or the file's key."""
        var = next((v for v, section, k in _ENV_OVERRIDES if f"{section}.{k}" == key), None)
        return var if var is not None and env.get(var) else f"{file}: {key}"

    if config.tasks.redis_url is None and config.tasks.workers < 1:
        raise ConfigError(
            f"{file}: tasks.workers = 0 needs Redis: nothing else would run the embedded "
            "store's tasks"
        )
    _check_per_model(config, file)
    if not config.upstream.url.startswith(("http://", "https://")):
        raise ConfigError(f"{where('upstream.url')} must be an http(s) URL")
    if config.tasks.redis_url is not None and not _is_redis_url(config.tasks.redis_url):
        # The value is not echoed: it may hold a password.
        raise ConfigError(
            f"{where('tasks.redis_url')} must be a redis://, rediss:// or unix:// URL "
            "(redis://[user:password@]host[:port][/db])"
        )
    results = config.tasks.results_url
    if results is not None and not _RESULTS_URL.fullmatch(results):
        # The value is not echoed: a mistaken URL may carry a credential.
        raise ConfigError(
            f"{where('tasks.results_url')} must be file:///absolute/dir or s3://bucket[/prefix]"
        )
    if config.tasks.image_base_url and not _IMAGE_BASE_URL.fullmatch(config.tasks.image_base_url):
        raise ConfigError(f"{file}: tasks.image_base_url must be an http(s) URL")
    if config.auth.client_key_sha256 and not config.auth.upstream_api_key:
        raise ConfigError(
            f"{file}: auth.client_key_sha256 is set but no upstream key "
            "(GATEWAY_UPSTREAM_API_KEY) to inject"
        )
    if config.auth.upstream_api_key and not config.client_digests:
        raise ConfigError(
            f"{where('auth.upstream_api_key')} is set but {file}: neither auth.client_key_sha256 "
            "nor [clients.<name>] key_sha256 names a client key, so every caller would get 401: "
            "add their digests (`gateway hash-key`)"
        )
    _check_digests("auth.client_key_sha256", config.auth.client_key_sha256, file)
    owners: dict[str, str] = {}
    for name, client in config.clients.items():
        _check_digests(f"clients.{name}.key_sha256", client.key_sha256, file)
        _check_webhook(f"clients.{name}", client, file)
        for digest in client.key_sha256:
            if owners.setdefault(digest, name) != name:
                raise ConfigError(
                    f"{file}: clients.{name}.key_sha256 holds a key of clients.{owners[digest]} too"
                )


def _check_digests(key: str, digests: frozenset[str], file: Path) -> None:
    for digest in digests:
        if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            raise ConfigError(f"{file}: {key} holds a non-SHA-256 value")


def _check_webhook(key: str, client: ClientConfig, file: Path) -> None:
    """A client's webhook: both its URL and its secret, or neither. Values are not echoed: a
    URL may carry a token, and a secret is one."""
    url, secret = client.webhook_url, client.webhook_secret
    if bool(url) != bool(secret):
        missing = "webhook_secret" if url else "webhook_url"
        raise ConfigError(f"{file}: {key}.{missing} is missing: a webhook needs both, or neither")
    if url and not _WEBHOOK_URL.fullmatch(url):
        raise ConfigError(f"{file}: {key}.webhook_url must be an http(s) URL")
    if secret and not is_webhook_secret(secret):
        raise ConfigError(
            f'{file}: {key}.webhook_secret must be "whsec_" followed by base64 (of 24 to 64 '
            'random bytes: `python -c \'import base64,os; print("whsec_" + '
            "base64.b64encode(os.urandom(32)).decode())'`)"
        )


def is_webhook_secret(secret: str) -> bool:
    """Standard Webhooks' secret form, as openai-python's `webhooks.unwrap` reads it."""
    if not secret.startswith("whsec_"):
        return False
    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except binascii.Error:
        return False
    return 24 <= len(key) <= 64
