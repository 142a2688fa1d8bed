"""The [ota] table: sources and their order, defaults, and one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from connhex_edge_ota.config import ConfigError, config_path, load_settings


def write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(body)
    return path


def test_reads_the_ota_table_and_keeps_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path, "[agent]\nname='x'\n[ota]\nauto_install = true\ncheck_interval = '24h0m0s'\n"
    )
    settings = load_settings(path)
    assert settings.auto_install and not settings.auto_download and settings.downloads_enabled
    assert settings.check_interval == 86400.0
    assert settings.heartbeat_interval == 10.0 and settings.install_timeout == 1800.0
    assert settings.store_dir == Path("/opt/connhex/.store/ota")


def test_environment_overrides_file_and_init_overrides_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "[ota]\ncheck_interval = '1h'\n")
    monkeypatch.setenv("CONNHEX_OTA_CHECK_INTERVAL", "90s")
    assert load_settings(path).check_interval == 90.0
    assert load_settings(path, check_interval="5s").check_interval == 5.0


def test_nats_url_defaults_to_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_URL", "nats://127.0.0.1:4999")
    assert load_settings(None).nats_url == "nats://127.0.0.1:4999"
    monkeypatch.delenv("NATS_URL")
    assert load_settings(None).nats_url == "nats://127.0.0.1:4222"


def test_config_path_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONNHEX_AGENT_CONFIG", raising=False)
    assert config_path(None) == Path("/opt/connhex/configs/agent.toml")
    monkeypatch.setenv("CONNHEX_AGENT_CONFIG", "/etc/a.toml")
    assert config_path(None) == Path("/etc/a.toml")
    assert config_path("/x.toml") == Path("/x.toml")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            "check_intervall = '1h'",
            "[ota] check_intervall is not a known key (did you mean check_interval?)",
        ),
        ("check_interval = 'soon'", "[ota] check_interval = 'soon'"),
        ("check_interval = 0", "greater than zero"),
        ("auto_install = 'maybe'", "[ota] auto_install = 'maybe'"),
        ("install_dir = 'relative'", "[ota] install_dir = 'relative': not absolute"),
        ("server_url = 'ftp://x'", "expected an http:// or https:// URL"),
        ("ca_file = '/nonexistent.pem'", "[ota] ca_file = '/nonexistent.pem': no such file"),
    ],
)
def test_bad_values_give_one_line_naming_key_and_expectation(
    tmp_path: Path, body: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, f"[ota]\n{body}\n"))
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message


def test_secret_value_is_never_echoed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, "[ota]\ninit_key = 12345678\n"))
    assert "12345678" not in str(caught.value) and "<secret>" in str(caught.value)


def test_environment_error_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONNHEX_OTA_HEARTBEAT_INTERVAL", "often")
    with pytest.raises(ConfigError, match="from environment CONNHEX_OTA_HEARTBEAT_INTERVAL"):
        load_settings(write(tmp_path, ""))


def test_broken_toml_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"agent\.toml"):
        load_settings(write(tmp_path, "[ota\n"))


@pytest.mark.parametrize(
    "body",
    ["[ota]\ncheck_interval = 'soon'\n", "[ota]\nbogus = 1\n", "[ota]\nauto_install = true\n"],
)
def test_cli_exits_2_with_one_line_and_no_traceback(tmp_path: Path, body: str) -> None:
    path = write(tmp_path, body)
    result = subprocess.run(
        [sys.executable, "-m", "connhex_edge_ota", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: [ota] ")
    assert "Traceback" not in result.stderr
