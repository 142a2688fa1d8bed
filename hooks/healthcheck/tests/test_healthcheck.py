"""The health gate against a running agent: a failing probe rolls back, a passing one updates."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from connhex_healthcheck import load_config

from connhex_edge_ota.config import ConfigError
from connhex_edge_ota.server import ReleaseServer
from connhex_edge_ota.testing import OtaAgent, StatusWatcher


class Health:
    """A local service whose health endpoint the test switches."""

    def __init__(self) -> None:
        self.status = 503
        health = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(health.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/health"
        # A short poll: shutdown() waits for the loop to notice (0.5 s by default).
        threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True).start()


@pytest.fixture
def health() -> Iterator[Health]:
    service = Health()
    yield service
    service.httpd.shutdown()


def test_failing_probe_rolls_back(
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
    statuses: StatusWatcher,
    health: Health,
    tmp_path: Path,
) -> None:
    rolled = tmp_path / "rolled"
    release_server.releases.publish(make_release("2.0.0", rollback_sh=f'touch "{rolled}"\n'))
    ota_agent(
        auto_install=True,
        plugins=["healthcheck"],
        extra_tables={
            "healthcheck": {
                "urls": [health.url],
                "retries": 2,
                "interval": "100ms",
                "commands": ["true"],
            }
        },
    )
    failed = statuses.wait_status("update_failed")
    assert failed.error == (
        f"health check failed: healthcheck: {health.url} answered 503; rolled back"
    )
    assert failed.current_version == "1.0.0" and rolled.exists()


def test_passing_checks_let_the_update_through(
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
    statuses: StatusWatcher,
    health: Health,
) -> None:
    health.status = 200
    release_server.releases.publish(make_release("2.0.1"))
    ota_agent(
        auto_install=True,
        plugins=["healthcheck"],
        extra_tables={
            "healthcheck": {
                "urls": [health.url],
                "commands": ['test "$CHX_OTA_VERSION_TARGET" = 2.0.1'],
            }
        },
    )
    statuses.wait_updated("2.0.1")


def test_failing_command_is_named_with_its_last_line(
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
    statuses: StatusWatcher,
) -> None:
    release_server.releases.publish(make_release("2.0.2"))
    ota_agent(
        auto_install=True,
        plugins=["healthcheck"],
        extra_tables={
            "healthcheck": {"commands": ["echo 'db not ready' >&2; exit 4"], "retries": 1}
        },
    )
    failed = statuses.wait_status("update_failed")
    assert "exited with 4: db not ready" in failed.error


def test_bad_config_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"\[healthcheck\] retries"):
        load_config({"retries": 0})
    assert load_config({"interval": "1m"}).interval == 60.0


def test_commands_see_a_minimal_environment_never_the_agents_secrets(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from connhex_healthcheck import run_command

    from connhex_edge_ota.release import Release

    monkeypatch.setenv("CONNHEX_OTA_INIT_KEY", "s3cret")
    monkeypatch.setenv("MY_APP_URL", "http://127.0.0.1:9/health")
    seen = tmp_path / "env.txt"
    release = Release(version="2.0.0", size=1, digest="")
    assert run_command(f"env > {seen}", 5.0, release, ["MY_APP_URL"]) == ""
    names = {line.split("=", 1)[0] for line in seen.read_text().splitlines()}
    assert "CONNHEX_OTA_INIT_KEY" not in names
    assert {"PATH", "HOME", "LANG", "MY_APP_URL", "CHX_OTA_VERSION_TARGET"} <= names
    assert names - {"PATH", "HOME", "LANG", "MY_APP_URL", "CHX_OTA_VERSION_TARGET"} <= {
        "PWD",  # set by sh itself
        "SHLVL",
        "_",
    }
    assert run_command('test -z "$CONNHEX_OTA_INIT_KEY"', 5.0, release) == ""
