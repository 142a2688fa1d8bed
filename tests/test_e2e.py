"""The real service (`connhex-edge-ota run`) against a real nats-server and release server."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from connhex_edge_ota.server import ReleaseServer
from connhex_edge_ota.testing import OtaAgent, StatusWatcher
from tests.conftest import read_calls, wait_until

MARKER_UPDATE = 'echo "$CHX_OTA_VERSION_CURRENT>$CHX_OTA_VERSION_TARGET" > "{out}"\n'


def test_full_cycle_installs_and_reports_every_step(
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
    statuses: StatusWatcher,
    tmp_path: Path,
    dummy_log: Path,
) -> None:
    out = tmp_path / "installed.txt"
    release = make_release("1.2.3", update_sh=MARKER_UPDATE.format(out=out))
    release_server.releases.publish(release)
    agent = ota_agent(
        auto_install=True, plugins=["dummy-veto"], env={"CONNHEX_DUMMY_LOG": str(dummy_log)}
    )

    done = statuses.wait_updated("1.2.3")

    assert done.latest_version == "1.2.3" and done.error == "" and done.last_checked.endswith("Z")
    assert statuses.names()[:6] == [
        "checking",
        "update_available",
        "downloading",
        "update_ready",
        "updating",
        "updated",
    ]
    assert out.read_text().strip() == "1.0.0>1.2.3"
    state = json.loads((agent.store / "state.json").read_text())
    assert state["current_version"] == "1.2.3"
    assert (agent.store / "current" / "update.sh").is_file()
    assert (agent.store / "logs" / "1.2.3.log").read_text().count("--- update.sh") == 1
    head = next(r for r in release_server.releases.requests if r.method == "HEAD")
    assert head.headers["Authorization"] == "Thing test-init-key"
    assert head.headers["Version"] == "1.0.0"
    hooks = {c["hook"] for c in read_calls(dummy_log)}
    assert {
        "ota_pre_download",
        "ota_pre_install",
        "ota_post_install",
        "ota_on_status",
        "ota_on_progress",
    } <= hooks
    # The device is now on the latest release: the next check finds nothing new.
    mark = statuses.mark()
    reply = statuses.request("check")
    assert reply["ok"] is True and reply["status"]["status"] == "updated"
    assert statuses.wait_status("updated", after=mark).latest_version == "1.2.3"
    assert [r.headers.get("Version") for r in release_server.releases.requests][-1] == "1.2.3"


def test_payload_has_exactly_the_five_keys_and_heartbeats_repeat(
    ota_agent: Callable[..., OtaAgent], statuses: StatusWatcher, nats_server: object
) -> None:
    ota_agent(heartbeat_interval="200ms")
    statuses.wait_status("updated")  # no release published: nothing newer
    mark = statuses.mark()
    statuses.wait_for(lambda s: True, after=mark + 2, timeout=5)  # heartbeats keep coming
    raw = statuses.statuses[-1].payload()
    assert list(raw) == ["current_version", "latest_version", "status", "error", "last_checked"]
    assert raw["current_version"] == raw["latest_version"] == "1.0.0"


def test_no_auto_download_stops_at_update_available_until_commanded(
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
    statuses: StatusWatcher,
) -> None:
    release_server.releases.publish(make_release("2.0.0"))
    ota_agent()
    assert statuses.wait_status("update_available").latest_version == "2.0.0"
    assert not any(r.method == "GET" for r in release_server.releases.requests)

    assert statuses.request("download")["ok"] is True
    statuses.wait_status("update_ready")
    reply = statuses.request("install")
    assert reply["ok"] is True
    statuses.wait_updated("2.0.0")
    assert statuses.request("status")["status"]["current_version"] == "2.0.0"


def test_installed_plugin_vetoes_install_and_is_named(
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
    statuses: StatusWatcher,
) -> None:
    release_server.releases.publish(make_release("3.0.0"))
    agent = ota_agent(
        auto_install=True,
        plugins=["dummy-veto"],
        env={"CONNHEX_DUMMY_VETO_INSTALL": "not during a shift"},
    )
    vetoed = statuses.wait_for(lambda s: s.status == "update_ready" and s.error != "")
    assert vetoed.error == "install vetoed by dummy-veto: not during a shift"
    assert vetoed.current_version == "1.0.0"
    assert not (agent.store / "current").exists()  # nothing unpacked, nothing ran


def test_blocked_plugin_cannot_veto(
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
    statuses: StatusWatcher,
) -> None:
    release_server.releases.publish(make_release("3.0.1"))
    ota_agent(
        auto_install=True,
        all_plugins=True,
        extra_tables={"agent": {"blocked_plugins": ["dummy-veto"]}},
        env={"CONNHEX_DUMMY_VETO_INSTALL": "no"},
    )
    statuses.wait_updated("3.0.1")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stops_within_two_seconds(
    ota_agent: Callable[..., OtaAgent], statuses: StatusWatcher, sig: signal.Signals
) -> None:
    agent = ota_agent()
    statuses.wait_status("updated")
    started = time.monotonic()
    code = agent.stop(sig)
    assert code == 0
    assert time.monotonic() - started < 2.0
    assert "Traceback" not in agent.output()


def test_unreachable_server_reports_check_failed_and_retries(
    ota_agent: Callable[..., OtaAgent], statuses: StatusWatcher
) -> None:
    ota_agent(server_url="http://127.0.0.1:9", retry_floor="100ms", check_interval="1s")
    first = statuses.wait_status("check_failed")
    assert first.error.startswith("cannot connect to http://127.0.0.1:9: connection refused")
    # It retries by itself (backoff, capped by the 1 s interval): a second round comes.
    mark = statuses.statuses.index(first) + 1
    statuses.wait_status("checking", after=mark, timeout=5)


def test_broken_and_slow_plugins_do_not_stop_an_update(
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
    statuses: StatusWatcher,
) -> None:
    release_server.releases.publish(make_release("5.0.0", files={"p.bin": os.urandom(300_000)}))
    release_server.faults.rate = 300_000  # a one-second download: progress hooks fire
    agent = ota_agent(
        auto_install=True,
        hook_timeout="500ms",
        heartbeat_interval="200ms",
        plugins=["dummy-veto"],
        env={
            "CONNHEX_DUMMY_SLEEP": "30",
            "CONNHEX_DUMMY_SLEEP_HOOKS": "ota_on_status,ota_on_progress",
            "CONNHEX_DUMMY_RAISE": "ota_post_install",
        },
    )
    failed = statuses.wait_status("update_failed")
    assert failed.error == (
        "health check failed: dummy-veto: raised RuntimeError: ota_post_install raised on purpose"
    )
    agent.stop()
    mark = statuses.mark()
    # Without the raising health check, the hanging status and progress hooks hold nothing up.
    started = time.monotonic()
    ota_agent(
        auto_install=True,
        hook_timeout="500ms",
        heartbeat_interval="200ms",
        plugins=["dummy-veto"],
        env={
            "CONNHEX_DUMMY_SLEEP": "30",
            "CONNHEX_DUMMY_SLEEP_HOOKS": "ota_on_status,ota_on_progress",
        },
    )
    # The version failed once: it waits for an operator, who asks for it.
    assert "failed 1 time(s)" in statuses.wait_status("update_failed", after=mark).error
    statuses.request("install")
    statuses.wait_updated("5.0.0", after=mark)
    assert time.monotonic() - started < 15
    beats = statuses.mark()
    statuses.wait_for(lambda s: True, after=beats + 2, timeout=5)  # heartbeats go on


def test_slow_pre_install_counts_as_a_veto(
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
    statuses: StatusWatcher,
) -> None:
    release_server.releases.publish(make_release("5.1.0"))
    ota_agent(
        auto_install=True,
        hook_timeout="300ms",
        plugins=["dummy-veto"],
        env={"CONNHEX_DUMMY_SLEEP": "30", "CONNHEX_DUMMY_SLEEP_HOOKS": "ota_pre_install"},
    )
    vetoed = statuses.wait_for(lambda s: s.status == "update_ready" and s.error != "")
    assert vetoed.error == "install vetoed by dummy-veto: no answer within 0.3s"


def test_download_veto_defers_to_the_next_check(
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
    statuses: StatusWatcher,
) -> None:
    release_server.releases.publish(make_release("5.2.0"))
    ota_agent(
        auto_download=True,
        plugins=["dummy-veto"],
        env={"CONNHEX_DUMMY_VETO_DOWNLOAD": "metered link"},
    )
    vetoed = statuses.wait_for(lambda s: s.status == "update_available" and s.error != "")
    assert vetoed.error == "download vetoed by dummy-veto: metered link"
    assert not any(r.method == "GET" for r in release_server.releases.requests)


def test_heartbeats_keep_coming_during_download_and_install(
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
    statuses: StatusWatcher,
) -> None:
    release_server.releases.publish(
        make_release("6.0.0", update_sh="sleep 2\n", files={"p.bin": os.urandom(600_000)})
    )
    release_server.faults.rate = 300_000  # a two-second download
    ota_agent(auto_install=True, heartbeat_interval="200ms")
    statuses.wait_updated("6.0.0")
    seen = [s.status for s in statuses.statuses]
    assert seen.count("downloading") >= 5  # one change + heartbeats every 200 ms
    assert seen.count("updating") >= 5


def test_stop_mid_download_is_quick_and_keeps_the_partial(
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
    statuses: StatusWatcher,
) -> None:
    release_server.releases.publish(make_release("7.0.0", files={"p.bin": os.urandom(4_000_000)}))
    release_server.faults.rate = 1_000_000
    agent = ota_agent(auto_download=True)
    statuses.wait_status("downloading")
    time.sleep(0.5)  # let some bytes arrive: what is measured is the stop, not this wait
    started = time.monotonic()
    assert agent.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 2.0
    parts = list((agent.store / "downloads").glob("*.part"))
    assert parts and parts[0].stat().st_size > 0


def test_stop_mid_install_is_quick_and_rolled_back_at_the_next_start(
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
    statuses: StatusWatcher,
    tmp_path: Path,
) -> None:
    rolled, running = tmp_path / "rolled", tmp_path / "running"
    release_server.releases.publish(
        make_release(
            "7.1.0", update_sh=f'touch "{running}"\nsleep 300\n', rollback_sh=f'touch "{rolled}"\n'
        )
    )
    agent = ota_agent(auto_install=True)
    wait_until(running.exists)
    started = time.monotonic()
    assert agent.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 2.0
    mark = statuses.mark()
    ota_agent()
    failed = statuses.wait_status("update_failed", after=mark)
    assert failed.error == "interrupted; rolled back"
    assert failed.current_version == "1.0.0" and rolled.exists()
