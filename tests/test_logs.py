"""Logs an operator can act on: priorities under systemd, each failure once, NATS lost and back."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from connhex_edge_ota.logs import JournalFormatter, resolve_level, under_journal
from connhex_edge_ota.natsserver import NatsServer, free_port
from connhex_edge_ota.server import ReleaseServer
from connhex_edge_ota.testing import OtaAgent, StatusWatcher
from tests.conftest import wait_until

TIMESTAMPED = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) ")


def record(level: int, message: str) -> logging.LogRecord:
    return logging.LogRecord("connhex_edge_ota.service", level, __file__, 1, message, None, None)


def test_journal_lines_carry_the_syslog_priority_and_no_time() -> None:
    formatter = JournalFormatter()
    assert formatter.format(record(logging.ERROR, "update_failed: x")) == (
        "<3>connhex_edge_ota.service: update_failed: x"
    )
    assert formatter.format(record(logging.WARNING, "w")).startswith("<4>")
    assert formatter.format(record(logging.INFO, "i")).startswith("<6>")
    assert formatter.format(record(logging.DEBUG, "d")).startswith("<7>")
    # journald splits lines: each keeps the priority, so a traceback stays an error.
    assert formatter.format(record(logging.ERROR, "a\nb")).splitlines() == [
        "<3>connhex_edge_ota.service: a",
        "<3>b",
    ]


def test_journal_stream_must_be_the_stream_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with (tmp_path / "a").open("w") as mine, (tmp_path / "b").open("w") as other:
        found = os.fstat(mine.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{found.st_dev}:{found.st_ino}")
        assert under_journal(mine)
        assert not under_journal(other)  # inherited variable, redirected stream
    monkeypatch.setenv("JOURNAL_STREAM", "garbage")
    with (tmp_path / "a").open("w") as mine:
        assert not under_journal(mine)


def test_level_from_option_then_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONNHEX_OTA_LOG_LEVEL", raising=False)
    assert resolve_level(None, "WARNING") == "WARNING"
    monkeypatch.setenv("CONNHEX_OTA_LOG_LEVEL", "debug")
    assert resolve_level(None, "WARNING") == "DEBUG"
    assert resolve_level("error", "WARNING") == "ERROR"
    monkeypatch.setenv("CONNHEX_OTA_LOG_LEVEL", "loud")
    with pytest.raises(ValueError, match="CONNHEX_OTA_LOG_LEVEL"):
        resolve_level(None, "WARNING")


def failing_check(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None, journal: bool = False
) -> tuple[int, str]:
    """``check`` against a refused port, stderr in a file; (exit code, stderr)."""
    config = tmp_path / "agent.toml"
    config.write_text(
        f"[ota]\ninstall_dir = '{tmp_path}'\nserver_url = 'http://127.0.0.1:9'\ninit_id = 'x'\n"
    )
    err_path = tmp_path / "stderr"
    with err_path.open("w") as err:
        extra = dict(env or {})
        if journal:
            found = os.fstat(err.fileno())
            extra["JOURNAL_STREAM"] = f"{found.st_dev}:{found.st_ino}"
        code = subprocess.run(
            [sys.executable, "-m", "connhex_edge_ota", *args, "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            timeout=60,
            env={**os.environ, **extra},
        ).returncode
    return code, err_path.read_text()


def test_under_systemd_a_failure_is_a_priority_line(tmp_path: Path) -> None:
    code, err = failing_check(tmp_path, "check", "--log-level", "INFO", journal=True)
    assert code == 1
    failed = [line for line in err.splitlines() if "check_failed" in line]
    assert len(failed) == 1
    assert failed[0].startswith(
        "<4>connhex_edge_ota.service: check_failed: cannot connect to http://127.0.0.1:9: "
        "connection refused"
    )


def test_elsewhere_lines_have_time_and_level(tmp_path: Path) -> None:
    _code, err = failing_check(tmp_path, "--log-level", "INFO", "check")
    failed = [line for line in err.splitlines() if "check_failed:" in line]
    assert len(failed) == 1 and TIMESTAMPED.match(failed[0])
    assert " WARNING connhex_edge_ota.service: check_failed: cannot connect to" in failed[0]


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (("check", "--log-level", "INFO"), {}),  # after the subcommand
        (("check",), {"CONNHEX_OTA_LOG_LEVEL": "INFO"}),
    ],
)
def test_log_level_after_the_subcommand_or_from_the_environment(
    tmp_path: Path, args: tuple[str, ...], env: dict[str, str]
) -> None:
    _code, err = failing_check(tmp_path, *args, env=env)
    assert "plugin ota loaded" in err


def test_plugin_load_lines_only_at_info(tmp_path: Path) -> None:
    _code, err = failing_check(tmp_path, "check", env={"CONNHEX_OTA_LOG_LEVEL": ""})
    assert "plugin ota loaded" not in err
    # ... but a plugin that failed to load is always said.
    assert "dummy-broken" in err and "not loaded" in err


def test_failures_are_logged_once_with_the_status_text(
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    statuses: StatusWatcher,
) -> None:
    release_server.releases.init_key = "right"
    agent = ota_agent(init_key="k3y-4711")
    failed = statuses.wait_status("check_failed")
    assert failed.error.endswith("check init_id and init_key")
    line = f"WARNING connhex_edge_ota.service: check_failed: {failed.error}"
    wait_until(lambda: line in agent.output())
    statuses.wait_status("check_failed", after=statuses.statuses.index(failed) + 1)  # heartbeat
    agent.stop()
    assert agent.output().count("check_failed:") == 1
    assert "k3y-4711" not in agent.output()


def test_failed_install_and_veto_are_logged(
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
    statuses: StatusWatcher,
) -> None:
    release_server.releases.publish(make_release("4.0.0", update_sh="echo broken\nexit 3\n"))
    agent = ota_agent(auto_install=True)
    failed = statuses.wait_status("update_failed")
    wait_until(
        lambda: f"ERROR connhex_edge_ota.service: update_failed: {failed.error}" in agent.output()
    )
    agent.stop()
    mark = statuses.mark()
    vetoing = ota_agent(
        auto_install=True, plugins=["dummy-veto"], env={"CONNHEX_DUMMY_VETO_INSTALL": "busy"}
    )
    statuses.wait_status("update_failed", after=mark)  # 4.0.0 is not retried by itself
    statuses.request("install")
    vetoed = statuses.wait_for(lambda s: "vetoed" in s.error, after=mark)
    line = f"INFO connhex_edge_ota.service: {vetoed.status}: {vetoed.error}"
    wait_until(lambda: line in vetoing.output())


def nats_lines(output: str, level: str = "") -> list[str]:
    return [ln for ln in output.splitlines() if f"{level} connhex_edge_ota.bus: " in ln]


def test_nats_lost_and_back_one_line_each(ota_agent: Callable[..., OtaAgent]) -> None:
    port = free_port()
    nats = NatsServer(port=port).start()
    try:
        agent = ota_agent(nats_url=nats.url)
        wait_until(lambda: "connected to NATS" in agent.output())
        nats.stop()
        wait_until(lambda: "lost; reconnecting" in agent.output())
        # nats-py retries every second: wait for a few quiet failures before it is back.
        wait_until(lambda: len(nats_lines(agent.output(), "DEBUG")) >= 2)
        nats = NatsServer(port=port).start()
        wait_until(lambda: f"NATS connection to {nats.url} back" in agent.output())
        agent.stop()
    finally:
        nats.stop()
    said = nats_lines(agent.output(), "WARNING")
    assert [ln.split("connhex_edge_ota.bus: ")[1] for ln in said] == [
        f"NATS connection to {nats.url} lost; reconnecting",
        f"NATS connection to {nats.url} back",
    ]


def test_nats_down_at_start_is_said_once_at_once(ota_agent: Callable[..., OtaAgent]) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    agent = ota_agent(nats_url=url)
    wait_until(lambda: len(nats_lines(agent.output())) >= 3, timeout=30)
    agent.stop()
    warned = nats_lines(agent.output(), "WARNING")
    assert len(warned) == 1 and f"NATS at {url} not reachable" in warned[0]
