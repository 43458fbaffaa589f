"""Configuration: the shipped file, strict decoding, and the fixed environment overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_file_states_the_built_in_defaults() -> None:
    # The gateway runs without a file, so the commented file must say exactly what it gets.
    assert load_config(ROOT / "config" / "gateway.toml", env={}) == Config()


def test_defaults_cover_apiyis_slowest_models() -> None:
    timeouts = Config().timeouts
    assert timeouts.for_model("gemini-3-pro-image-preview") == 600  # Nano Banana Pro 4K
    assert timeouts.for_model("gpt-image-2") >= 235 * 1.5  # high quality takes ~235 s
    assert timeouts.for_model("gemini-2.5-flash-image") < 120  # ~10 s
    assert timeouts.for_model("never-heard-of-it") == timeouts.default_s


def test_unknown_key_is_named(tmp_path: Path) -> None:
    file = tmp_path / "gw.toml"
    file.write_text("[upstream]\nurl = 'http://x/v1'\nconect_timeout_s = 3\n")
    with pytest.raises(ConfigError, match="conect_timeout_s") as caught:
        load_config(file, env={})
    assert "upstream" in str(caught.value)


def test_wrong_type_is_named(tmp_path: Path) -> None:
    file = tmp_path / "gw.toml"
    file.write_text("[timeouts.models]\n'gpt-image-1' = 'slow'\n")
    with pytest.raises(ConfigError, match=r"timeouts\.models"):
        load_config(file, env={})


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    file = tmp_path / "gw.toml"
    file.write_text(
        f"[upstream]\nurl = 'http://file/v1'\n[auth]\nclient_key_sha256 = ['{'a' * 64}']\n"
    )
    env = {
        "GATEWAY_CONFIG": str(file),
        "GATEWAY_UPSTREAM_URL": "http://env/v1",
        "GATEWAY_UPSTREAM_API_KEY": "sk-env",
    }
    config = load_config(env=env)
    assert config.upstream.url == "http://env/v1"
    assert config.auth.upstream_api_key == "sk-env"


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml"):
        load_config(tmp_path / "nope.toml", env={})


def test_client_keys_must_be_digests(tmp_path: Path) -> None:
    file = tmp_path / "gw.toml"
    file.write_text("[auth]\nclient_key_sha256 = ['sk-plain-key']\n")
    with pytest.raises(ConfigError, match="SHA-256"):
        load_config(file, env={"GATEWAY_UPSTREAM_API_KEY": "sk-up"})


def test_a_bad_environment_value_is_blamed_on_its_variable(tmp_path: Path) -> None:
    file = tmp_path / "gw.toml"
    file.write_text("")
    with pytest.raises(ConfigError, match=r"^GATEWAY_UPSTREAM_URL must be an http\(s\) URL"):
        load_config(file, env={"GATEWAY_UPSTREAM_URL": "api.apiyi.com/v1"})


def test_key_injection_without_client_keys_refuses_to_start(tmp_path: Path) -> None:
    file = tmp_path / "gw.toml"
    file.write_text("")
    with pytest.raises(ConfigError, match="every caller would get 401"):
        load_config(file, env={"GATEWAY_UPSTREAM_API_KEY": "sk-up"})


@pytest.mark.parametrize(
    ("toml", "named"),
    [
        ("[tasks]\nworkers = -3", "tasks.workers: expected `int` >= 0"),
        ("[timeouts]\ndefault_s = 0", "timeouts.default_s: expected `float` > 0.0"),
        ("[timeouts]\ndefault_s = nan", "timeouts.default_s: expected `float` > 0.0"),
        ("[server]\nmax_body_bytes = -1", "server.max_body_bytes: expected `int` >= 1"),
        ("[server]\nport = 99999", "server.port: expected `int` <= 65535"),
        ("[server]\nmetrics_port = -1", "server.metrics_port: expected `int` >= 0"),
        ("[server]\nheld_total = -1", "server.held_total: expected `int` >= 0"),
        ("[upstream]\ncredential_share = 1.5", "upstream.credential_share: expected `float` <= 1"),
        ("[upstream]\nconnect_timeout_s = -1", "upstream.connect_timeout_s: expected `float` > 0"),
        ("[tcp_keepalive]\ncount = 0", "tcp_keepalive.count: expected `int` >= 1"),
        ("[tasks]\nmax_deliveries = 0", "tasks.max_deliveries: expected `int` >= 1"),
        ("[tasks]\nlease_s = 0", "tasks.lease_s: expected `float` > 0"),
        ("[idempotency]\nsdk_window_s = -5", "idempotency.sdk_window_s: expected `float` > 0"),
        ("[tasks]\nimage_fetch_timeout_s = 0", "tasks.image_fetch_timeout_s: expected `float` > 0"),
        ("[admission]\nmax_waiting = -1", "admission.max_waiting: expected `int` >= 0"),
        ("[timeouts.models]\n'gpt-image-1' = 0", 'timeouts.models."gpt-image-1" must be > 0'),
        ("[tasks.model_concurrency]\n'dall-e-3' = -2", 'model_concurrency."dall-e-3" must be >= 0'),
    ],
)
def test_a_number_out_of_its_range_is_refused_naming_its_key(
    tmp_path: Path, toml: str, named: str
) -> None:
    file = tmp_path / "gw.toml"
    file.write_text(toml + "\n")
    with pytest.raises(ConfigError) as caught:
        load_config(file, env={})
    assert str(caught.value).startswith(f"{file}: ")
    assert named in str(caught.value)


def test_zero_stays_allowed_where_it_means_off(tmp_path: Path) -> None:
    file = tmp_path / "gw.toml"
    file.write_text(
        "[upstream]\npool_size = 0\ncredential_share = 0\n"
        "[tasks]\nreplica_ack_timeout_ms = 0\nredis_url = 'redis://127.0.0.1:1'\nworkers = 0\n"
    )
    config = load_config(file, env={})
    assert config.upstream.per_credential == 0
    assert config.tasks.workers == 0


@pytest.mark.parametrize("url", ["notaurl", "http://x", "redis://:hunter2", "redis://h:99999"])
def test_a_bogus_redis_url_is_refused_without_echoing_it(tmp_path: Path, url: str) -> None:
    file = tmp_path / "gw.toml"
    file.write_text("")
    with pytest.raises(ConfigError, match=r"^GATEWAY_REDIS_URL must be a redis://") as caught:
        load_config(file, env={"GATEWAY_REDIS_URL": url})
    assert "hunter2" not in str(caught.value)


def test_a_key_in_two_named_clients_is_refused_naming_both(tmp_path: Path) -> None:
    # Its calls could be counted under either: the budgets and webhooks would be a guess.
    file = tmp_path / "gw.toml"
    digest = "b" * 64
    file.write_text(
        f"[clients.design]\nkey_sha256 = ['{digest}']\n[clients.ads]\nkey_sha256 = ['{digest}']\n"
    )
    with pytest.raises(ConfigError, match=r"clients\.(ads|design) too"):
        load_config(file, env={})


@pytest.mark.parametrize(
    ("toml", "named"),
    [
        ("[clients.'bad name']\n", "clients"),
        ("[clients.design]\nkey_sha256 = ['not-a-digest']\n", "clients.design.key_sha256"),
        ("[clients.design]\ndaily_budget_usd = -1\n", "clients.design.daily_budget_usd"),
    ],
)
def test_a_bad_client_is_refused_naming_the_key(tmp_path: Path, toml: str, named: str) -> None:
    file = tmp_path / "gw.toml"
    file.write_text(toml)
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(file, env={})
