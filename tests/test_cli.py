"""The command line as a user types it: serve, demo, plugins, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import requests

from connhex_edge_ota.natsserver import free_port


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "connhex_edge_ota", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_demo_runs_the_whole_cycle_and_exits_0() -> None:
    started = time.monotonic()
    result = cli("demo", timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert time.monotonic() - started < 10
    statuses = [
        json.loads(line.split(" heartbeat.ota.service ")[1])["status"]
        for line in result.stdout.splitlines()
        if " heartbeat.ota.service " in line
    ]
    assert statuses[0] == "checking" and statuses[-1] == "updated"
    assert {"downloading", "update_ready", "updating"} <= set(statuses)
    assert "the device runs 1.0.1" in result.stdout


def test_serve_speaks_the_api_from_a_folder(
    make_release: Callable[..., Path], tmp_path: Path
) -> None:
    folder = tmp_path / "releases"
    folder.mkdir()
    release = make_release("3.4.5")
    (folder / "firmware.zip").write_bytes(release.read_bytes())
    (folder / "firmware.zip.version").write_text("3.4.5-custom\n")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "connhex_edge_ota", "serve", str(folder), "--port", str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        assert "active release: 3.4.5-custom" in server.stdout.readline()
        url = f"http://127.0.0.1:{port}/iot/ota/device-1"
        head = requests.head(url, timeout=5)
        assert head.status_code == 200 and head.headers["Version"] == "3.4.5-custom"
        assert head.headers["Content-Digest"].startswith("sha-256=:")
        assert int(head.headers["Content-Length"]) == release.stat().st_size
        assert requests.head(url, headers={"Version": "3.4.5-custom"}, timeout=5).status_code == 304
        body = requests.get(url, headers={"Range": "bytes=10-"}, timeout=5)
        assert body.status_code == 206 and body.content == release.read_bytes()[10:]
    finally:
        server.terminate()
        server.wait(10)


def test_plugins_lists_distributions_and_errors(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        "[ota]\nserver_url = 'http://127.0.0.1:1'\ninit_id = 'x'\n"
        "[agent]\nblocked_plugins = ['status-forwarder']\n"
    )
    result = cli("plugins", "--config", str(config))
    assert result.returncode == 1  # dummy-broken failed to import
    rows = {line.split("\t")[0]: line.split("\t")[1:] for line in result.stdout.splitlines()}
    assert rows["ota"][1] == "loaded" and rows["ota"][0].startswith("connhex-edge-ota ")
    assert rows["dummy-broken"][1].startswith("ImportError")
    assert rows["status-forwarder"][1] == "blocked"


def test_usage_errors_exit_2() -> None:
    assert cli("no-such-command").returncode == 2
    assert cli("pack").returncode == 2


def test_status_of_a_fresh_device(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f"[ota]\ninstall_dir = '{tmp_path}'\ninitial_version = '1.0.0'\n")
    result = cli("status", "--config", str(config))
    assert result.returncode == 0
    assert json.loads(result.stdout)["status"] == ""


def test_check_by_hand_without_a_server_fails_with_1(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        f"[ota]\ninstall_dir = '{tmp_path}'\nserver_url = 'http://127.0.0.1:9'\ninit_id = 'x'\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "connhex_edge_ota", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "CONNHEX_OTA_CONNECT_TIMEOUT": "2s"},
    )
    assert result.returncode == 1
    reply = json.loads(result.stdout)
    error = "cannot connect to http://127.0.0.1:9: connection refused"
    assert reply == {"ok": False, "error": reply["error"], "status": reply["status"]}
    assert reply["error"].startswith(error)
    assert reply["status"]["status"] == "check_failed"


def test_download_shows_a_progress_bar_on_a_terminal(
    make_release: Callable[..., Path], tmp_path: Path
) -> None:
    import pty

    from connhex_edge_ota.server import ReleaseServer

    folder = tmp_path / "releases"
    folder.mkdir()
    with ReleaseServer(folder) as server:
        server.releases.publish(make_release("2.0.0", files={"p.bin": os.urandom(2_000_000)}))
        server.faults.rate = 2_000_000
        config = tmp_path / "agent.toml"
        config.write_text(
            f"[ota]\ninstall_dir = '{tmp_path}'\nserver_url = '{server.url}'\n"
            "init_id = 'x'\nfree_space_margin = 0\n"
        )
        controller, terminal = pty.openpty()
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "connhex_edge_ota",
                "--log-level",
                "ERROR",
                "download",
                "--config",
                str(config),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=terminal,
        )
        os.close(terminal)
        seen = b""
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # the terminal closed with the process
                break
            if not chunk:
                break
            seen += chunk
        process.wait(30)
        os.close(controller)
    assert process.returncode == 0
    assert b"\r[" in seen and b"100.0%" in seen  # redrawn in place, to the end
