"""The shipped systemd unit: it verifies, and its stop matches what the install journal recovers."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from connhex_edge_ota.cli import EXIT_USAGE
from connhex_edge_ota.duration import parse_duration
from connhex_edge_ota.server import ReleaseServer
from connhex_edge_ota.testing import OtaAgent, StatusWatcher
from tests.conftest import wait_until

UNIT = Path(__file__).resolve().parent.parent / "contrib/systemd/connhex-edge-ota.service"


def unit_settings() -> dict[str, str]:
    settings: dict[str, str] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    return settings


def test_the_unit_says_what_the_readme_promises() -> None:
    unit = unit_settings()
    assert unit["Restart"] == "on-failure"
    assert unit["RestartPreventExitStatus"] == str(EXIT_USAGE)
    assert unit["KillMode"] == "mixed"
    assert unit["EnvironmentFile"].startswith("/etc/")  # the secret, root-only
    assert " run --config " in unit["ExecStart"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd is not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart exists: point it at this environment's program.
    program = Path(sys.executable).parent / "connhex-edge-ota"
    assert program.exists()
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/connhex-edge-ota", str(program)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert UNIT.name not in result.stderr, result.stderr  # no warning about our unit


def test_a_bad_config_exits_with_the_status_that_prevents_restarts(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text("[ota]\ncheck_interval = 'soon'\n")
    result = subprocess.run(
        [sys.executable, "-m", "connhex_edge_ota", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert str(result.returncode) == unit_settings()["RestartPreventExitStatus"]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_stop_as_killmode_mixed_does_leaves_an_install_the_next_start_rolls_back(
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
    statuses: StatusWatcher,
    tmp_path: Path,
) -> None:
    pid_file, rolled = tmp_path / "update.pid", tmp_path / "rolled"
    release_server.releases.publish(
        make_release(
            "5.0.0",
            update_sh=f'sleep 300 &\necho $! > "{pid_file}.child"\necho $$ > "{pid_file}"\nwait\n',
            rollback_sh=f'touch "{rolled}"\n',
        )
    )
    agent = ota_agent(auto_install=True)
    wait_until(lambda: pid_file.exists() and pid_file.read_text().strip() != "")
    script = int(pid_file.read_text())
    child = int(Path(f"{pid_file}.child").read_text())
    assert agent.process is not None
    started = time.monotonic()
    os.kill(agent.process.pid, signal.SIGTERM)  # KillMode=mixed: the main process only
    assert agent.process.wait(30) == 0
    # The agent stopped the script's whole group itself, well within TimeoutStopSec
    # (systemd's SIGKILL to the cgroup would only sweep what escaped the group).
    assert time.monotonic() - started < parse_duration(unit_settings()["TimeoutStopSec"])
    wait_until(lambda: not alive(script) and not alive(child), timeout=5)
    mark = statuses.mark()
    ota_agent()
    failed = statuses.wait_status("update_failed", after=mark)
    assert failed.error == "interrupted; rolled back"
    assert failed.current_version == "1.0.0" and rolled.exists()
