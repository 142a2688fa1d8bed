"""Gates that cannot be bypassed: the command line configures plugins as the service does,
and a hung plugin costs a bounded number of threads."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from connhex_edge_ota.server import ReleaseServer
from connhex_edge_ota.status import Status
from connhex_edge_ota.testing import OtaAgent, StatusWatcher, write_agent_toml

MIB = 2**20
LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ INFO ")


def closed_window() -> str:
    """A one-hour window two days from now (UTC): closed whenever the test runs."""
    day = (datetime.now(UTC) + timedelta(days=2)).strftime("%a")
    return f"{day} 03:00-04:00"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "connhex_edge_ota", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("CONNHEX_")},
    )


def config(tmp_path: Path, server: ReleaseServer, **tables: dict[str, object]) -> Path:
    return write_agent_toml(
        tmp_path / "agent.toml",
        {
            "ota": {
                "server_url": server.url,
                "init_id": "cli-device",
                "install_dir": str(tmp_path / "opt"),
                "initial_version": "1.0.0",
                "free_space_margin": 0,
                "nats_url": "nats://127.0.0.1:1",
            },
            "agent": {"blocked_plugins": ["dummy-broken"]},
            **tables,
        },
    )


def test_install_by_hand_outside_the_maintenance_window_is_vetoed(
    tmp_path: Path, release_server: ReleaseServer, make_release: Callable[..., Path]
) -> None:
    ran = tmp_path / "update-ran"
    release_server.releases.publish(make_release("2.0.0", update_sh=f'touch "{ran}"\n'))
    path = config(
        tmp_path,
        release_server,
        maintenance_window={"windows": [closed_window()], "timezone": "UTC"},
    )
    result = cli("install", "--config", str(path))
    assert result.returncode == 1, result.stderr
    reply = json.loads(result.stdout)
    assert reply["error"].startswith(
        "install vetoed by maintenance-window: outside the maintenance window; the next one opens "
    )
    assert closed_window().split()[0] in reply["error"]  # the day of the next opening
    assert reply["status"]["current_version"] == "1.0.0"
    assert not ran.exists() and not (tmp_path / "opt" / ".store" / "ota" / "current").exists()


def test_a_bad_plugin_table_stops_a_step_with_one_line_and_exit_2(
    tmp_path: Path, release_server: ReleaseServer
) -> None:
    path = config(tmp_path, release_server, maintenance_window={"windows": ["whenever"]})
    for verb in ("check", "download", "install"):
        result = cli(verb, "--config", str(path))
        assert result.returncode == 2, result.stderr
        # One line, besides the log's record of what was loaded.
        lines = [ln for ln in result.stderr.splitlines() if not LOG_RECORD.match(ln)]
        assert lines == [
            "config error: [maintenance_window] windows: 'whenever' is not like "
            "'Mon-Fri 02:00-04:00'"
        ]
    assert release_server.releases.requests == []  # nothing was asked of the server


def test_plugins_exits_1_naming_a_refused_plugin_and_a_bad_table(
    tmp_path: Path, release_server: ReleaseServer
) -> None:
    (tmp_path / "typo_gate.py").write_text(
        "from connhex_edge_ota import hookimpl\n\n"
        "@hookimpl\ndef ota_pre_instal(release):\n    return None\n"
    )
    path = config(tmp_path, release_server)
    ok = cli("plugins", "--config", str(path))
    assert ok.returncode == 0, ok.stdout
    path.write_text(path.read_text().replace("[agent]\n", "[agent]\nplugins = ['typo_gate']\n"))
    path.write_text(path.read_text() + "\n[healthcheck]\nretries = 0\n")
    result = subprocess.run(
        [sys.executable, "-m", "connhex_edge_ota", "plugins", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert result.returncode == 1
    rows = {line.split("\t")[0]: line.split("\t")[2] for line in result.stdout.splitlines()}
    assert rows["typo_gate"] == "unknown hook ota_pre_instal (did you mean ota_pre_install?)"
    assert rows["healthcheck"].startswith("config error: [healthcheck] retries = 0")
    assert rows["ota"] == "loaded" and rows["dummy-broken"] == "blocked"
    assert result.stderr == ""  # one line each, on stdout only


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


def test_hung_status_and_progress_hooks_keep_the_thread_count_flat(
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
    statuses: StatusWatcher,
) -> None:
    release = make_release("6.0.0", files={"p.bin": os.urandom(6 * MIB)})
    release_server.releases.publish(release)
    release_server.faults.rate = 1 * MIB  # a six-second download
    agent = ota_agent(
        auto_download=True,
        hook_timeout="1h",  # awaiting a notification would stall the download for good
        heartbeat_interval="100ms",
        progress_rate=50,
        plugins=["dummy-veto"],
        env={
            "CONNHEX_DUMMY_SLEEP": "3600",
            "CONNHEX_DUMMY_SLEEP_HOOKS": "ota_on_status,ota_on_progress",
        },
    )
    assert agent.process is not None
    downloading = statuses.wait_status("downloading")
    after = statuses.statuses.index(downloading)

    def beat(n: int) -> Status:  # the n-th heartbeat after the download started
        return statuses.wait_for(lambda s: True, after=after + n, timeout=10)

    beat(3)
    samples = []
    for n in range(5, 40, 5):
        if beat(n).status != "downloading":
            break
        samples.append(threads(agent.process.pid))
    assert len(samples) >= 3, samples
    assert max(samples) - min(samples) <= 1, samples  # grew by ~17 a second before
    statuses.wait_status("update_ready", after=after, timeout=30)
    assert agent.stop() == 0


def test_run_logs_a_refused_plugin_once_at_error_and_goes_on(
    ota_agent: Callable[..., OtaAgent], statuses: StatusWatcher, tmp_path: Path
) -> None:
    (tmp_path / "typo_gate.py").write_text(
        "from connhex_edge_ota import hookimpl\n\n"
        "@hookimpl\ndef ota_pre_instal(release):\n    return 'never asked'\n"
    )
    agent = ota_agent(plugins=["typo_gate"], env={"PYTHONPATH": str(tmp_path)})
    statuses.wait_status("updated")  # the agent runs without it
    assert agent.stop() == 0
    errors = [ln for ln in agent.output().splitlines() if " ERROR " in ln]
    assert errors == [
        errors[0].split(" ERROR ")[0] + " ERROR connhex_edge_ota.loading: plugin typo_gate "
        "(module) refused: unknown hook ota_pre_instal (did you mean ota_pre_install?)"
    ]


def test_a_plugin_that_cannot_be_configured_refuses_but_never_stops_the_agent(
    tmp_path: Path, release_server: ReleaseServer, make_release: Callable[..., Path]
) -> None:
    """agent_configure raising: logged once, its gates refuse (fail closed), the step runs."""
    (tmp_path / "crashing_gate.py").write_text(
        "from connhex_edge_ota import hookimpl\n\n"
        "@hookimpl\ndef agent_configure(agent):\n    raise KeyError('window')\n\n"
        "@hookimpl\ndef ota_pre_install(release):\n    return None\n"
    )
    ran = tmp_path / "ran"
    release_server.releases.publish(make_release("3.0.0", update_sh=f'touch "{ran}"\n'))
    path = config(tmp_path, release_server)
    path.write_text(path.read_text().replace("[agent]\n", "[agent]\nplugins = ['crashing_gate']\n"))
    result = subprocess.run(
        [sys.executable, "-m", "connhex_edge_ota", "install", "--config", str(path), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert result.returncode == 1  # vetoed, not a configuration error
    refusal = "crashing_gate: not configured (agent_configure raised KeyError: 'window')"
    assert f"install vetoed by {refusal}" in result.stdout
    assert result.stderr.count("plugin crashing_gate: agent_configure raised KeyError") == 1
    assert not ran.exists()


def test_the_service_goes_on_with_a_plugin_that_cannot_be_configured(
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
    statuses: StatusWatcher,
    tmp_path: Path,
) -> None:
    """`run` with a plugin whose agent_configure raises: running, and no install gets past it."""
    (tmp_path / "crashing_gate.py").write_text(
        "from connhex_edge_ota import hookimpl\n\n"
        "@hookimpl\ndef agent_configure(agent):\n    raise KeyError('window')\n\n"
        "@hookimpl\ndef ota_pre_install(release):\n    return None\n"
    )
    ran = tmp_path / "ran"
    release_server.releases.publish(make_release("3.1.0", update_sh=f'touch "{ran}"\n'))
    agent = ota_agent(
        auto_install=True, plugins=["crashing_gate"], env={"PYTHONPATH": str(tmp_path)}
    )
    vetoed = statuses.wait_for(lambda s: "not configured" in s.error)
    assert vetoed.status == "update_ready"
    assert vetoed.error.startswith("install vetoed by crashing_gate: not configured (")
    assert agent.process is not None and agent.process.poll() is None  # still running
    assert statuses.request("status")["ok"] is True
    assert not ran.exists()
