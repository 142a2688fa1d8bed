"""Installs with real scripts and zips: failures, rollback, timeouts, restarts, power cuts."""

from __future__ import annotations

import json
import os
import subprocess
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from connhex_edge_ota.server import ReleaseServer
from connhex_edge_ota.signing import keygen
from connhex_edge_ota.testing import OtaAgent, StatusWatcher
from tests.conftest import read_calls, wait_until

pytestmark = pytest.mark.reliability


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers signal 0: look at its state.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ")[1][0] != "Z"


def test_failed_update_rolls_back_keeps_version_and_is_not_retried(
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
    statuses: StatusWatcher,
    tmp_path: Path,
) -> None:
    """update.sh exits 3: update_failed, rollback.sh run, still 1.0.0; rerun only when asked.

    The error names the exit code and stderr and ends "rolled back"; the release's log holds
    both scripts' output. A check then reports "failed 1 time(s)" without running update.sh;
    an install request runs it once more."""
    rolled = tmp_path / "rolled-back"
    release_server.releases.publish(
        make_release(
            "2.0.0",
            update_sh='echo "copying files"\necho "disk error" >&2\nexit 3\n',
            rollback_sh=f'echo "restoring"\ntouch "{rolled}"\n',
        )
    )
    agent = ota_agent(auto_install=True)
    failed = statuses.wait_status("update_failed")
    assert failed.current_version == "1.0.0" and failed.latest_version == "2.0.0"
    assert failed.error.startswith("update.sh exited with 3: ")
    assert "disk error" in failed.error and failed.error.endswith("rolled back")
    assert rolled.is_file()
    log = (agent.store / "logs" / "2.0.0.log").read_text()
    assert "--- update.sh" in log and "disk error" in log and "--- rollback.sh" in log

    # Checked again: the failed version is not installed again by itself...
    mark = statuses.mark()
    statuses.request("check")
    again = statuses.wait_status("update_failed", after=mark)
    assert "failed 1 time(s)" in again.error
    assert (agent.store / "logs" / "2.0.0.log").read_text().count("--- update.sh") == 1
    # ... but an operator may insist.
    mark = statuses.mark()
    statuses.request("install")
    statuses.wait_for(
        lambda s: s.status == "update_failed" and "exited with 3" in s.error, after=mark
    )
    assert (agent.store / "logs" / "2.0.0.log").read_text().count("--- update.sh") == 2


def test_timeout_kills_the_whole_process_group(
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
    statuses: StatusWatcher,
    tmp_path: Path,
) -> None:
    """update.sh past install_timeout: "timed out after 1s", still 1.0.0, its child killed too."""
    child = tmp_path / "child.pid"
    release_server.releases.publish(
        make_release("2.1.0", update_sh=f'sleep 300 &\necho $! > "{child}"\nsleep 300\n')
    )
    ota_agent(auto_install=True, install_timeout="1s")
    failed = statuses.wait_status("update_failed")
    assert failed.error.startswith("update.sh timed out after 1s")
    assert failed.current_version == "1.0.0"
    wait_until(lambda: not alive(int(child.read_text())), timeout=5)


def test_exit_10_updates_then_the_agent_restarts_itself(
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
    statuses: StatusWatcher,
) -> None:
    """update.sh exits 10: updated to 3.0.0, then the agent re-executes itself and reports 3.0.0."""
    release_server.releases.publish(make_release("3.0.0", update_sh="echo restart me\nexit 10\n"))
    agent = ota_agent(auto_install=True)
    updated = statuses.wait_updated("3.0.0")
    # The re-executed agent checks right after its start, from the persisted version.
    after = statuses.wait_status("checking", after=statuses.statuses.index(updated))
    assert after.current_version == "3.0.0"
    statuses.wait_status("updated", after=statuses.statuses.index(after))
    assert agent.process is not None and agent.process.poll() is None
    assert "restarting: update.sh of 3.0.0 asked for a restart" in agent.output()
    assert agent.output().count("running (config") == 2


def test_failing_health_gate_rolls_back_and_names_the_plugin(
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
    statuses: StatusWatcher,
    tmp_path: Path,
    dummy_log: Path,
) -> None:
    """A plugin's failed health check after install: rolled back, 1.0.0, the error names it."""
    rolled = tmp_path / "rolled-back"
    release_server.releases.publish(make_release("4.0.0", rollback_sh=f'touch "{rolled}"\n'))
    ota_agent(
        auto_install=True,
        plugins=["dummy-veto"],
        env={"CONNHEX_DUMMY_UNHEALTHY": "service x is down", "CONNHEX_DUMMY_LOG": str(dummy_log)},
    )
    failed = statuses.wait_status("update_failed")
    assert failed.error == "health check failed: dummy-veto: service x is down; rolled back"
    assert failed.current_version == "1.0.0" and rolled.is_file()
    post = [c for c in read_calls(dummy_log) if c["hook"] == "ota_post_install"]
    assert post and post[0]["workdir"].endswith("/.store/ota/current")


def hostile_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name), data)
    return path


def test_hostile_release_never_runs_and_never_writes_outside_the_store(
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    statuses: StatusWatcher,
    tmp_path: Path,
) -> None:
    """A member path with '..': release refused, update.sh never runs, nothing written outside.

    update_failed names the member; no current/ is made."""
    ran = tmp_path / "ran"
    zip_path = hostile_zip(
        tmp_path / "fw-5.0.0.zip",
        {
            "update.sh": f'touch "{ran}"\n'.encode(),
            "../../../../escaped.txt": b"x",
        },
    )
    release_server.releases.publish(zip_path)
    agent = ota_agent(auto_install=True)
    failed = statuses.wait_status("update_failed")
    assert failed.error == "release refused: ../../../../escaped.txt: '..' in member path"
    assert not ran.exists()
    assert not any(p.name == "escaped.txt" for p in tmp_path.rglob("escaped.txt"))
    assert not (agent.store / "current").exists()


def test_release_without_update_sh_fails_before_anything_runs(
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    statuses: StatusWatcher,
    tmp_path: Path,
) -> None:
    """No update.sh at the release's root: update_failed "release refused: no update.sh …"."""
    release_server.releases.publish(hostile_zip(tmp_path / "fw-5.1.zip", {"install.sh": b"x"}))
    ota_agent(auto_install=True)
    failed = statuses.wait_status("update_failed")
    assert failed.error == "release refused: no update.sh at the root of the release"


def test_kill_9_during_update_sh_is_rolled_back_at_the_next_start(
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
    statuses: StatusWatcher,
    tmp_path: Path,
) -> None:
    """kill -9 during update.sh: the next start rolls back ("interrupted"), 1.0.0, orphan killed.

    The install was recorded in state.json before the script ran."""
    started, pid_file, rolled = tmp_path / "started", tmp_path / "pid", tmp_path / "rolled"
    release_server.releases.publish(
        make_release(
            "6.0.0",
            update_sh=f'echo $$ > "{pid_file}"\ntouch "{started}"\nsleep 300\n',
            rollback_sh=f'touch "{rolled}"\n',
        )
    )
    agent = ota_agent(auto_install=True)
    wait_until(started.exists)
    agent.kill()
    state = json.loads((agent.store / "state.json").read_text())
    assert state["install"]["version"] == "6.0.0"  # recorded before the script ran

    mark = statuses.mark()
    ota_agent(auto_install=False)
    failed = statuses.wait_status("update_failed", after=mark)
    assert failed.error == "interrupted; rolled back"
    assert failed.current_version == "1.0.0" and rolled.is_file()
    wait_until(lambda: not alive(int(pid_file.read_text())), timeout=5)  # orphan killed


def test_kill_9_after_update_sh_recorded_success_is_finished(
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
    statuses: StatusWatcher,
    tmp_path: Path,
) -> None:
    """kill -9 after update.sh recorded exit 0: the next start finishes the update to 6.1.0."""
    started, finished = tmp_path / "started", tmp_path / "finished"
    release_server.releases.publish(
        make_release("6.1.0", update_sh=f'touch "{started}"\nsleep 1\ntouch "{finished}"\n')
    )
    agent = ota_agent(auto_install=True)
    wait_until(started.exists)
    agent.kill()  # the script outlives the agent and its wrapper records exit 0
    wait_until(lambda: (agent.store / "update.sh.exit").exists())
    assert finished.exists()

    mark = statuses.mark()
    ota_agent()
    done = statuses.wait_updated("6.1.0", after=mark)
    assert done.error == ""


def test_signed_releases_only_when_a_public_key_is_set(
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
    statuses: StatusWatcher,
    tmp_path: Path,
) -> None:
    """With a public key set, an unsigned release is refused "not signed"; a signed one installs."""
    keygen(tmp_path / "k")
    release_server.releases.publish(make_release("7.0.0"))
    agent = ota_agent(auto_install=True, public_key=str(tmp_path / "k.pub"))
    refused = statuses.wait_status("update_failed")
    assert "not signed" in refused.error
    agent.stop()
    release_server.releases.publish(make_release("7.0.1", key=tmp_path / "k"))
    mark = statuses.mark()
    ota_agent(auto_install=True, public_key=(tmp_path / "k.pub").read_text())
    statuses.wait_updated("7.0.1", after=mark)


def test_scripts_get_the_documented_environment_only(
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
    statuses: StatusWatcher,
    tmp_path: Path,
) -> None:
    """update.sh gets the documented CHX_OTA_* variables and PATH, not the agent's env or key."""
    env_file = tmp_path / "env.txt"
    release_server.releases.publish(make_release("8.0.0", update_sh=f'env > "{env_file}"\n'))
    agent = ota_agent(
        auto_install=True, install_timeout="2m", env={"LEAKY_SECRET": "should-not-pass"}
    )
    statuses.wait_updated("8.0.0")
    env = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
    assert env["CHX_OTA_PAYLOAD_DIR"] == str(agent.store / "current")
    assert env["CHX_OTA_VERSION_CURRENT"] == "1.0.0"
    assert env["CHX_OTA_VERSION_TARGET"] == "8.0.0"
    assert env["CHX_OTA_TIMEOUT_SEC"] == "120"
    assert "LEAKY_SECRET" not in env and "CONNHEX_OTA_INIT_KEY" not in env
    assert env["PATH"].startswith("/usr/local/sbin:")


def test_no_space_to_unpack_fails_without_running_and_is_retried(
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
    statuses: StatusWatcher,
    tmp_path: Path,
) -> None:
    """Too little disk to unpack: "no space", update.sh not run, retried, not counted a failure."""
    disk = tmp_path / "small-disk"
    disk.mkdir()
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=10m", "tmpfs", str(disk)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("needs a small filesystem: mounting a tmpfs is not allowed here")
    try:
        ran = tmp_path / "ran"
        # Hex text: about 2:1 in a zip, so the download fits and the unpacked tree does not.
        payload = os.urandom(4 * 1024 * 1024).hex().encode()
        release_server.releases.publish(
            make_release("10.0.0", update_sh=f'touch "{ran}"\n', files={"payload.txt": payload})
        )
        agent = ota_agent(auto_install=True, install_dir=str(disk), check_interval="1s")
        failed = statuses.wait_status("update_failed")
        assert failed.error.startswith("no space to unpack: ") and "will try again" in failed.error
        assert not ran.exists() and not (agent.store / "current").exists()
        # Not counted as a failed attempt: the next check tries again by itself.
        again = statuses.wait_status("updating", after=statuses.statuses.index(failed))
        assert again.latest_version == "10.0.0"
        state = json.loads((agent.store / "state.json").read_text())
        assert state["failures"] == {}
        agent.kill()
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_signed_release_installs_only_under_the_version_it_was_signed_for(
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
    statuses: StatusWatcher,
    tmp_path: Path,
) -> None:
    """A signed release replayed as another version is refused, never run; as itself it installs."""
    keygen(tmp_path / "k")
    ran = tmp_path / "ran"
    signed = make_release(
        "0.9.0", key=tmp_path / "k", update_sh=f'echo "$CHX_OTA_VERSION_TARGET" >> "{ran}"\n'
    )
    folder = release_server.releases.folder
    # The same signed bytes, published as 9.9.9: a replay of an old release.
    (folder / "replayed.zip.version").write_text("9.9.9\n")
    replayed = release_server.releases.publish(signed, name="replayed.zip")
    agent = ota_agent(auto_install=True, public_key=str(tmp_path / "k.pub"))
    refused = statuses.wait_status("update_failed")
    assert refused.error == (
        "release refused: manifest.json: signed for version 0.9.0, offered as 9.9.9"
    )
    assert refused.current_version == "1.0.0" and refused.latest_version == "9.9.9"
    assert not ran.exists()
    agent.stop()

    own = release_server.releases.publish(signed)  # fw-0.9.0.zip: offered as 0.9.0
    assert own.read_bytes() == replayed.read_bytes()
    mark = statuses.mark()
    ota_agent(auto_install=True, public_key=str(tmp_path / "k.pub"))
    statuses.wait_updated("0.9.0", after=mark)
    assert ran.read_text() == "0.9.0\n"


def test_a_device_with_a_model_installs_only_releases_signed_for_it(
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
    statuses: StatusWatcher,
    tmp_path: Path,
) -> None:
    """On model gw-a, releases signed for another model or none are refused; gw-a's installs."""
    keygen(tmp_path / "k")
    ran = tmp_path / "ran"
    update_sh = f'echo "$CHX_OTA_VERSION_TARGET" >> "{ran}"\n'
    for version, model in (("2.0.0", "gw-b"), ("2.0.1", "")):
        release_server.releases.publish(
            make_release(version, key=tmp_path / "k", model=model, update_sh=update_sh)
        )
        mark = statuses.mark()
        agent = ota_agent(auto_install=True, public_key=str(tmp_path / "k.pub"), model="gw-a")
        refused = statuses.wait_status("update_failed", after=mark)
        signed_for = f"model {model}" if model else "no model"
        assert refused.error == (
            f"release refused: manifest.json: signed for {signed_for}, this device is model gw-a"
        )
        agent.stop()
    release_server.releases.publish(
        make_release("2.0.2", key=tmp_path / "k", model="gw-a", update_sh=update_sh)
    )
    mark = statuses.mark()
    ota_agent(auto_install=True, public_key=str(tmp_path / "k.pub"), model="gw-a")
    statuses.wait_updated("2.0.2", after=mark)
    assert ran.read_text() == "2.0.2\n"


def test_a_flood_of_script_output_leaves_the_agent_log_bounded(
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
    statuses: StatusWatcher,
) -> None:
    """30 MB of script output: the agent log keeps the first and last 20 lines, under 256 KiB.

    The lines between are counted in one line; the release's script log stays about 1 MiB."""
    blocks = 1_304_348  # 30 MB of output
    flood = f'yes "firmware block written" | head -n {blocks}\necho "all done"\n'
    release_server.releases.publish(make_release("9.1.0", update_sh=flood))
    agent = ota_agent(auto_install=True)
    statuses.wait_updated("9.1.0")
    agent.stop()
    output = agent.output()
    echoed = output.count("update.sh: firmware block written")
    assert echoed == 20 + 19  # the first 20 lines, and the last 20 but "all done"
    assert f"update.sh: [{blocks + 1 - 40} lines of output left out here; " in output
    assert output.count("update.sh: all done") == 1
    assert len(output.encode()) < 256 * 1024, f"the agent log grew to {len(output)} bytes"
    script_log = agent.store / "logs" / "9.1.0.log"
    assert script_log.stat().st_size < 1024 * 1024 + 1024
