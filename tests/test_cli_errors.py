"""A person's mistakes end in one line and the documented exit code, never a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from connhex_edge_ota.config import DEFAULT_CONFIG_PATH, ConfigError, load_settings


def cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "CONNHEX_AGENT_CONFIG"}
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "connhex_edge_ota", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment,
        cwd=cwd,
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def config(tmp_path: Path, body: str, name: str = "agent.toml") -> Path:
    path = tmp_path / name
    path.write_text("[ota]\nserver_url = 'http://127.0.0.1:9'\ninit_id = 'dev'\n" + body)
    return path


def test_keygen_into_a_missing_folder(tmp_path: Path) -> None:
    result = cli("keygen", "keys/signing", cwd=tmp_path)
    assert result.returncode == 1
    assert one_line(result) == "keygen: cannot write keys/signing: No such file or directory"


def test_serve_on_a_busy_port(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = cli("serve", str(tmp_path), "--port", str(port))
    assert result.returncode == 1
    assert "is already in use; choose another --port" in one_line(result)


@pytest.mark.parametrize("command", ["run", "check", "install"])
def test_install_dir_that_cannot_be_made(tmp_path: Path, command: str) -> None:
    result = cli(command, "--config", str(config(tmp_path, "install_dir = '/proc/nope'\n")))
    assert result.returncode == 2
    assert one_line(result).startswith(
        "config error: [ota] install_dir = '/proc/nope': cannot create /proc/nope/.store/ota"
    )


def test_status_into_a_closed_pipe(tmp_path: Path) -> None:
    path = config(tmp_path, f"install_dir = '{tmp_path}'\n")
    reader, writer = os.pipe()
    os.close(reader)  # like `| head` that has already left
    try:
        result = subprocess.run(
            [sys.executable, "-m", "connhex_edge_ota", "status", "--config", str(path)],
            stdout=writer,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(writer)
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr
    assert result.returncode == 1


@pytest.mark.parametrize("how", ["option", "environment"])
def test_a_named_config_file_that_does_not_exist(tmp_path: Path, how: str) -> None:
    missing = tmp_path / "nope.toml"
    for command in ("run", "status", "check", "plugins"):
        if how == "option":
            result = cli(command, "--config", str(missing))
        else:
            result = cli(command, env={"CONNHEX_AGENT_CONFIG": str(missing)})
        assert result.returncode == 2, command
        assert one_line(result) == (
            f"config error: {missing} (from "
            f"{'--config' if how == 'option' else 'CONNHEX_AGENT_CONFIG'}): no such file"
        )


@pytest.mark.skipif(DEFAULT_CONFIG_PATH.exists(), reason="this machine has the default file")
@pytest.mark.parametrize("command", ["run", "check", "download", "status"])
def test_no_config_at_all_names_the_file_looked_for(command: str) -> None:
    result = cli(command)
    assert result.returncode == 2
    assert f"no config file at {DEFAULT_CONFIG_PATH}" in one_line(result)


def test_a_typo_in_an_environment_variable(tmp_path: Path) -> None:
    result = cli(
        "run",
        "--config",
        str(config(tmp_path, f"install_dir = '{tmp_path}'\n")),
        env={"CONNHEX_OTA_CHECK_INTERVL": "1h"},
    )
    assert result.returncode == 2
    assert one_line(result) == (
        "config error: environment CONNHEX_OTA_CHECK_INTERVL is not a known variable "
        "(did you mean CONNHEX_OTA_CHECK_INTERVAL?)"
    )


def test_environment_typos_in_load_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONNHEX_OTA_INIT_KY", "x")
    with pytest.raises(ConfigError, match=r"did you mean CONNHEX_OTA_INIT_KEY\?"):
        load_settings(None)
    monkeypatch.delenv("CONNHEX_OTA_INIT_KY")
    monkeypatch.setenv("CONNHEX_OTA_LOG_LEVEL", "INFO")  # the command line's, not a key
    assert load_settings(None).init_id == ""


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    files = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key", "other_key")}
    ca.cert_pem.write_to_path(str(files["ca"]))
    mine, other = ca.issue_cert("device-1"), ca.issue_cert("device-2")
    mine.cert_chain_pems[0].write_to_path(str(files["cert"]))
    mine.private_key_pem.write_to_path(str(files["key"]))
    other.private_key_pem.write_to_path(str(files["other_key"]))
    return files


def test_files_are_checked_at_start(tmp_path: Path, pki: dict[str, Path]) -> None:
    def error(**keys: str) -> str:
        with pytest.raises(ConfigError) as raised:
            load_settings(None, install_dir=str(tmp_path), **keys)
        return str(raised.value)

    assert "public_key = '/nope.pub'" in error(public_key="/nope.pub")
    assert "No such file" in error(public_key="/nope.pub")
    bad = tmp_path / "bad.pub"
    bad.write_text("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    assert f"[ota] public_key = '{bad}'" in error(public_key=str(bad))
    assert "[ota] ca_file" in error(ca_file=str(pki["key"]))  # a key is not a CA bundle
    mismatch = error(cert_file=str(pki["cert"]), key_file=str(pki["other_key"]))
    assert f"[ota] key_file = '{pki['other_key']}': does not belong to cert_file" in mismatch
    assert "[ota] cert_file" in error(cert_file=str(pki["key"]), key_file=str(pki["key"]))
    good = load_settings(
        None,
        install_dir=str(tmp_path),
        ca_file=str(pki["ca"]),
        cert_file=str(pki["cert"]),
        key_file=str(pki["key"]),
    )
    assert good.cert_file == pki["cert"]


def test_unreadable_key_file_exits_2_before_anything_runs(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    path = config(
        tmp_path,
        f"install_dir = '{tmp_path}'\ncert_file = '{pki['cert']}'\n"
        f"key_file = '{pki['other_key']}'\n",
    )
    result = cli("run", "--config", str(path))
    assert result.returncode == 2
    assert "key_file" in one_line(result) and "does not belong to cert_file" in result.stderr
    assert not (tmp_path / ".store").exists()
