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
