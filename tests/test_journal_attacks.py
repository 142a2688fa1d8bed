"""Attacks on the install journal (the review of issue 8), each against the real service.

A clean stop while recovery runs a script or asks the health check, scripts that kill
their wrapper or the agent itself, timeouts with and without clean-up, a daemon that
``update.sh`` leaves running, hand-edited journals, a chatty failure, an unexpected
error after ``update.sh`` ran. Release 1.0.0 is installed before each test; 2.0.0 is
offered. Every script leaves a word in ``marks`` when it starts, so the tests count
which scripts ran, and how often.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from connhex_edge_ota import killpoints
from connhex_edge_ota.server import ReleaseServer
from connhex_edge_ota.service import MAX_RECOVERIES
from connhex_edge_ota.state import Phase, load_state
from connhex_edge_ota.status import ERROR_LIMIT
from connhex_edge_ota.store import Store
from connhex_edge_ota.testing import OtaAgent, StatusWatcher
from tests.conftest import read_calls, wait_until

pytestmark = pytest.mark.reliability

StartAgent = Callable[..., OtaAgent]
MakeRelease = Callable[..., Path]

FAILED = "update_failed"


# The device before the test, the release offered, and what the scripts left behind.


def store_root(tmp_path: Path) -> Path:
    return tmp_path / "opt-connhex" / ".store" / "ota"


def running_release(tmp_path: Path, version_file: str | None = "1.0.0") -> Path:
    """Release 1.0.0 as installed before the test: ``current/`` and ``current.version``.

    Its ``rollback.sh`` leaves ``old-rollback``: it must never run on behalf of 2.0.0.
    """
    current = store_root(tmp_path) / "current"
    current.mkdir(parents=True)
    (current / "update.sh").write_text("true\n")
    (current / "rollback.sh").write_text(f'echo old-rollback >> "{tmp_path / "marks"}"\n')
    if version_file is not None:
        (current.parent / "current.version").write_text(version_file)
    return current


def mark(tmp_path: Path, word: str) -> str:
    """A shell line that appends ``word`` to the marks file."""
    return f'echo {word} >> "{tmp_path / "marks"}"\n'


def marks(tmp_path: Path) -> list[str]:
    path = tmp_path / "marks"
    return path.read_text().split() if path.exists() else []


def new_release(
    tmp_path: Path, make_release: MakeRelease, update: str, rollback: str | None = "echo undo\n"
) -> Path:
    """Release 2.0.0: ``update.sh`` marks ``update`` then runs ``update``; ``rollback.sh``
    (none when ``rollback`` is None) marks ``new-rollback`` then runs ``rollback``."""
    scripts: dict[str, Any] = {"update_sh": mark(tmp_path, "update") + update}
    if rollback is not None:
        scripts["rollback_sh"] = mark(tmp_path, "new-rollback") + rollback
    return make_release("2.0.0", files={"payload.bin": b"x" * 4096}, **scripts)


Offer = Callable[..., Path]


@pytest.fixture
def offer(tmp_path: Path, release_server: ReleaseServer, make_release: MakeRelease) -> Offer:
    """Release 1.0.0 running (``running_release``); ``offer(update, rollback=...)``
    publishes release 2.0.0 made by ``new_release``."""
    running_release(tmp_path)

    def publish(update: str, rollback: str | None = "echo undo\n") -> Path:
        path = new_release(tmp_path, make_release, update, rollback)
        release_server.releases.publish(path)
        return path

    return publish


def nap_once(tmp_path: Path, name: str) -> str:
    """Shell lines that sleep 60s the first time only, marking ``<name>-napping`` first."""
    flag = tmp_path / f"{name}-naps"
    flag.write_text("")
    napping = mark(tmp_path, name + "-napping").strip()
    return f'if [ -f "{flag}" ]; then rm -f "{flag}"; {napping}; sleep 60; fi\n'


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, which can run nothing more, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def start_ticks(pid: int) -> int:
    """Field 22 of ``/proc/<pid>/stat``: when the process started, in clock ticks since boot."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rfind(")") + 2 :].split()[19])


def this_boot() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def killed(agent: OtaAgent) -> None:
    """The agent killed itself (a kill point, a script): SIGKILL, nothing cleaned up."""
    assert agent.process is not None
    assert agent.process.wait(60) == -signal.SIGKILL, agent.output()[-2000:]


# 1-2. A clean stop (systemctl restart, reboot) or a kill -9 while a script or a recovery runs.


def test_a_stop_during_the_recovery_rollback_keeps_the_install_and_reruns_it(
    ota_agent: StartAgent,
    statuses: StatusWatcher,
    offer: Offer,
    tmp_path: Path,
) -> None:
    """A stop in recovery's rollback.sh: the next start reruns it to its end, update.sh never."""
    update_pid = tmp_path / "update.pid"
    offer(
        update=f'echo $$ > "{update_pid}"\nsleep 60\n',
        rollback=nap_once(tmp_path, "rollback") + mark(tmp_path, "rollback-done"),
    )
    killed(ota_agent(auto_install=True, env={killpoints.ENV: "script_running"}))

    recovering = ota_agent(auto_install=True)
    wait_until(lambda: "rollback-napping" in marks(tmp_path), 30)
    assert not alive(int(update_pid.read_text()))  # the update.sh left running was killed
    assert recovering.stop(timeout=20) == 0
    state, _ = load_state(Store(store_root(tmp_path)))
    assert state.install is not None and state.install.phase == Phase.ROLLING_BACK

    after = statuses.mark()
    ota_agent(auto_install=True)
    final = statuses.wait_status(FAILED, after=after, timeout=60)
    assert final.current_version == "1.0.0"
    assert final.error == "interrupted; rollback interrupted, run again; rolled back"
    assert marks(tmp_path).count("update") == 1
    assert marks(tmp_path).count("new-rollback") == 2
    assert marks(tmp_path).count("rollback-done") == 1
    assert "old-rollback" not in marks(tmp_path)
    state, _ = load_state(Store(store_root(tmp_path)))
    assert state.install is None and state.current_version == "1.0.0"


def test_a_stop_during_update_sh_ends_its_group_and_the_restart_rolls_back_once(
    ota_agent: StartAgent,
    statuses: StatusWatcher,
    offer: Offer,
    tmp_path: Path,
) -> None:
    """SIGTERM while update.sh runs: its group ends, the next start rolls back once, interrupted."""
    update_pid = tmp_path / "update.pid"
    offer(
        update=f'echo $$ > "{update_pid}"\n' + nap_once(tmp_path, "update") + "echo done\n",
    )
    first = ota_agent(auto_install=True)
    wait_until(lambda: "update-napping" in marks(tmp_path), 30)
    assert first.stop(timeout=20) == 0
    assert not alive(int(update_pid.read_text()))
    state, _ = load_state(Store(store_root(tmp_path)))
    assert state.install is not None and state.install.phase == Phase.SCRIPT_STARTED

    after = statuses.mark()
    ota_agent(auto_install=True)
    final = statuses.wait_status(FAILED, after=after, timeout=60)
    assert final.error == "interrupted; rolled back" and final.current_version == "1.0.0"
    assert marks(tmp_path) == ["update", "update-napping", "new-rollback"]


def test_kill_9_during_update_sh_then_during_its_recovery_rollback(
    ota_agent: StartAgent,
    statuses: StatusWatcher,
    offer: Offer,
    tmp_path: Path,
) -> None:
    """kill -9 in update.sh, then in recovery's rollback.sh: that rollback is killed and rerun."""
    rollback_pids = tmp_path / "rollback.pids"
    offer(
        update="sleep 60\n",
        rollback=f'echo $$ >> "{rollback_pids}"\n'
        + nap_once(tmp_path, "rollback")
        + mark(tmp_path, "rollback-done"),
    )
    killed(ota_agent(auto_install=True, env={killpoints.ENV: "script_running"}))
    killed(ota_agent(auto_install=True, env={killpoints.ENV: "rollback_running"}))
    wait_until(lambda: "rollback-napping" in marks(tmp_path), 30)  # left running, napping
    left_running = int(rollback_pids.read_text().split()[0])

    after = statuses.mark()
    ota_agent(auto_install=True)
    final = statuses.wait_status(FAILED, after=after, timeout=60)
    assert final.error == "interrupted; rollback interrupted, run again; rolled back"
    assert final.current_version == "1.0.0"
    assert not alive(left_running)  # its group was provably the rollback's: killed
    assert marks(tmp_path).count("update") == 1
    assert marks(tmp_path).count("new-rollback") == 2
    assert marks(tmp_path).count("rollback-done") == 1


def test_a_stop_during_the_recovery_health_check_asks_it_again(
    ota_agent: StartAgent,
    statuses: StatusWatcher,
    dummy_log: Path,
    offer: Offer,
    tmp_path: Path,
) -> None:
    """SIGTERM while recovery asks the health check: the next start asks again, updated on 2.0.0."""
    offer(update="echo done\n")
    env = {"CONNHEX_DUMMY_LOG": str(dummy_log)}
    first = ota_agent(
        auto_install=True,
        plugins=["dummy-veto"],
        env={**env, killpoints.ENV: "script_exit_recorded"},
    )
    killed(first)

    def health_asks() -> int:
        return sum(1 for call in read_calls(dummy_log) if call["hook"] == "ota_post_install")

    assert health_asks() == 0
    # A health check that hangs (far below hook_timeout): the stop finds it asking.
    hanging = {"CONNHEX_DUMMY_SLEEP": "600", "CONNHEX_DUMMY_SLEEP_HOOKS": "ota_post_install"}
    recovering = ota_agent(
        auto_install=True, plugins=["dummy-veto"], hook_timeout="1h", env={**env, **hanging}
    )
    wait_until(lambda: health_asks() == 1, 30)
    assert recovering.stop(timeout=20) == 0
    state, _ = load_state(Store(store_root(tmp_path)))
    assert state.install is not None and state.install.phase == Phase.SCRIPT_EXITED

    after = statuses.mark()
    ota_agent(auto_install=True, plugins=["dummy-veto"], env=env)
    statuses.wait_updated("2.0.0", after=after, timeout=60)
    assert health_asks() == 2
    assert marks(tmp_path) == ["update"]  # update.sh once, no rollback of any release
    state, _ = load_state(Store(store_root(tmp_path)))
    assert state.install is None and state.current_version == "2.0.0"


# 3. update.sh kills its wrapper.


@pytest.mark.parametrize(
    "sig", [signal.SIGKILL, 40], ids=["wrapper-killed-by-KILL", "wrapper-killed-by-signal-40"]
)
def test_update_sh_that_kills_its_wrapper_fails_and_its_group_dies(
    sig: int,
    ota_agent: StartAgent,
    statuses: StatusWatcher,
    offer: Offer,
    tmp_path: Path,
) -> None:
    """update.sh kills its wrapper: update_failed naming it, rollback.sh; the rest never runs."""
    update_pid = tmp_path / "update.pid"
    offer(
        update=(
            f'echo $$ > "{update_pid}"\nkill -{int(sig)} $PPID\nsleep 30\n'
            + mark(tmp_path, "update-late")
        ),
    )
    ota_agent(auto_install=True)
    failed = statuses.wait_status(FAILED, timeout=30)
    name = "KILL" if sig == signal.SIGKILL else "40"
    assert f"update.sh stopped: its wrapper was ended by signal {name}" in failed.error
    assert failed.error.endswith("; rolled back") and failed.current_version == "1.0.0"
    # Its group was killed when the wrapper died: the script cannot reach its last line.
    wait_until(lambda: not alive(int(update_pid.read_text())), 5)
    assert marks(tmp_path) == ["update", "new-rollback"]


# 4. A daemon that update.sh starts.


def test_a_daemon_started_by_update_sh_keeps_writing_after_the_install(
    ota_agent: StartAgent,
    statuses: StatusWatcher,
    offer: Offer,
    tmp_path: Path,
) -> None:
    """A daemon update.sh starts (stdout not redirected) lives on after updated: no SIGPIPE."""
    daemon_pid, ticks = tmp_path / "daemon.pid", tmp_path / "ticks"
    # Each round writes to its stdout (the wrapper's pipe) first: a broken pipe ends it.
    daemon = f'while :; do echo tick; echo t >> "{ticks}"; sleep 0.2; done'
    offer(
        update=f"sh -c '{daemon}' &\necho $! > \"{daemon_pid}\"\necho started\n",
    )

    def count() -> int:
        return len(ticks.read_text().splitlines()) if ticks.exists() else 0

    agent = ota_agent(auto_install=True)
    try:
        statuses.wait_updated("2.0.0", timeout=30)
        pid = int(daemon_pid.read_text())
        seen = count()
        wait_until(lambda: count() >= seen + 15, 30)  # 3 s of output after the install
        assert alive(pid)
        agent.stop()
        seen = count()
        wait_until(lambda: count() >= seen + 5, 30)  # and after the agent stopped
        assert alive(pid)
    finally:
        if daemon_pid.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(daemon_pid.read_text()), signal.SIGKILL)
            wait_until(lambda: not alive(int(daemon_pid.read_text())), 10)


# 5. Timeouts: SIGTERM and a grace for clean-up, then SIGKILL.


def test_a_timed_out_update_sh_may_clean_up_within_the_grace(
    ota_agent: StartAgent,
    statuses: StatusWatcher,
    offer: Offer,
    tmp_path: Path,
) -> None:
    """On timeout update.sh gets SIGTERM: its trap prints, sleeps, marks; then rollback.sh."""
    trap = f'echo "cleaning up"; sleep 1; {mark(tmp_path, "cleaned").strip()}; exit 1'
    offer(update=f"trap '{trap}' TERM\nsleep 100 &\nwait\n")
    ota_agent(auto_install=True, install_timeout="1s")
    failed = statuses.wait_status(FAILED, timeout=60)
    assert failed.error.startswith("update.sh timed out after 1s")
    assert "cleaning up" in failed.error  # the output of the clean-up is kept
    assert failed.error.endswith("; rolled back")
    assert marks(tmp_path) == ["update", "cleaned", "new-rollback"]


def test_a_timed_out_update_sh_that_ignores_sigterm_is_killed(
    ota_agent: StartAgent,
    statuses: StatusWatcher,
    offer: Offer,
    tmp_path: Path,
) -> None:
    """update.sh ignores SIGTERM past the grace: SIGKILL ends it, its last line never runs."""
    update_pid = tmp_path / "update.pid"
    # It would write "survived" well after the grace (script_stop_grace) if it were left alive.
    nap = 30
    offer(
        update=f"trap '' TERM\necho $$ > \"{update_pid}\"\nsleep {nap}\n"
        + mark(tmp_path, "survived"),
    )
    ota_agent(auto_install=True, install_timeout="1s", script_stop_grace="1s")
    failed = statuses.wait_status(FAILED, timeout=40)
    assert failed.error.startswith("update.sh timed out after 1s")
    assert failed.error.endswith("; rolled back")
    wait_until(lambda: not alive(int(update_pid.read_text())), 5)
    assert marks(tmp_path) == ["update", "new-rollback"]


# 6. A rollback.sh that ends the agent every time (as a reboot would).


def test_a_rollback_that_kills_the_agent_every_time_is_given_up(
    ota_agent: StartAgent,
    statuses: StatusWatcher,
    offer: Offer,
    tmp_path: Path,
) -> None:
    """rollback.sh kills the agent and its wrapper each run: given up after MAX_RECOVERIES."""
    reboot = (  # the agent (the wrapper's parent) and the wrapper: no exit recorded, as a reboot
        "agent=$(cut -d' ' -f4 /proc/$PPID/stat)\nkill -9 \"$agent\" $PPID\nsleep 1\n"
    )
    offer(update="exit 3\n", rollback=reboot)
    store = Store(store_root(tmp_path))
    errors: list[str] = []
    for start in range(1 + MAX_RECOVERIES):  # the install, then each recovery
        killed(ota_agent(auto_install=True))
        assert marks(tmp_path).count("new-rollback") == start + 1
        state, warning = load_state(store)
        assert warning == "" and state.install is not None
        assert state.install.phase == Phase.ROLLING_BACK and state.install.recoveries == start
        errors.append(state.install.error)

    after = statuses.mark()
    agent = ota_agent(auto_install=True)
    given_up = statuses.wait_for(
        lambda s: s.status == FAILED and "given up" in s.error, after=after, timeout=30
    )
    assert given_up.error == (
        f"recovery of 2.0.0 interrupted {MAX_RECOVERIES} times; given up, nothing more is run"
    )
    assert given_up.current_version == "1.0.0"
    # The next round sees 2.0.0 offered and does not try it again.
    statuses.wait_for(
        lambda s: s.status == FAILED and "failed 1 time(s)" in s.error,
        after=statuses.statuses.index(given_up) + 1,
        timeout=30,
    )
    assert agent.process is not None and agent.process.poll() is None
    agent.stop()
    assert marks(tmp_path).count("new-rollback") == 1 + MAX_RECOVERIES
    assert marks(tmp_path).count("update") == 1 and "old-rollback" not in marks(tmp_path)
    state, _ = load_state(store)
    assert state.install is None and state.failures["2.0.0"].attempts == 1
    # The error grew by one clause per recovery at most, and stays short.
    assert errors[0] == "update.sh exited with 3"
    for before, later in itertools.pairwise(errors):
        assert later == before + "; rollback interrupted, run again"
    assert len(errors[-1]) < ERROR_LIMIT and len(state.failures["2.0.0"].error) < ERROR_LIMIT


# 7. Hand-edited journals: nothing is killed or run unless provably its own.


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """An unrelated process, leader of its own group (a daemon of the running release)."""
    process = subprocess.Popen(["sleep", "600"], start_new_session=True)
    yield process
    process.kill()
    process.wait()


def write_journal(tmp_path: Path, install: dict[str, object]) -> None:
    state = {"current_version": "1.0.0", "install": {"version": "2.0.0", **install}}
    (store_root(tmp_path) / "state.json").write_text(json.dumps(state))


@pytest.mark.parametrize(
    "edit",
    ["wrong-ticks", "other-boot", "provably-its-group"],
    ids=["group-with-wrong-start-ticks", "group-of-another-boot", "group-provably-the-scripts"],
)
def test_a_recorded_group_is_killed_only_when_provably_the_scripts(
    edit: str,
    sleeper: subprocess.Popen[bytes],
    ota_agent: StartAgent,
    statuses: StatusWatcher,
    tmp_path: Path,
) -> None:
    """A journal naming an unrelated live group: killed only with this boot and its start ticks."""
    current = running_release(tmp_path, version_file="2.0.0")  # update.sh of 2.0.0 had started
    (current / "rollback.sh").write_text(mark(tmp_path, "new-rollback"))
    ticks, boot = start_ticks(sleeper.pid), this_boot()
    if edit == "wrong-ticks":
        ticks += 1
    elif edit == "other-boot":
        boot = "00000000-0000-4000-8000-000000000000"
    write_journal(
        tmp_path,
        {
            "previous_version": "1.0.0",
            "phase": "script_started",
            "pgid": sleeper.pid,
            "start_ticks": ticks,
            "boot_id": boot,
        },
    )
    ota_agent()
    failed = statuses.wait_status(FAILED, timeout=30)
    assert failed.error == "interrupted; rolled back" and failed.current_version == "1.0.0"
    assert marks(tmp_path) == ["new-rollback"]
    # The group was judged before rollback.sh ran: a kill would have happened by now.
    if edit == "provably-its-group":
        assert sleeper.wait(10) == -signal.SIGKILL  # the check is what spares the others
    else:
        assert sleeper.poll() is None


@pytest.mark.parametrize(
    "version_file", [None, "1.0.0"], ids=["no-current.version", "current.version-1.0.0"]
)
@pytest.mark.parametrize(
    "install",
    [
        {"phase": "script_started"},
        {"phase": "script_exited", "code": 3, "error": "update.sh exited with 3"},
        {"phase": "rolling_back", "error": "update.sh exited with 3"},
    ],
    ids=lambda install: f"journal-2.0.0-{install['phase']}",
)
def test_a_journal_naming_another_release_never_runs_the_running_ones_rollback(
    install: dict[str, object],
    version_file: str | None,
    ota_agent: StartAgent,
    statuses: StatusWatcher,
    tmp_path: Path,
) -> None:
    """A journal naming 2.0.0 while current/ holds 1.0.0: 1.0.0's rollback.sh never runs."""
    current = running_release(tmp_path, version_file=version_file)
    write_journal(tmp_path, {"previous_version": "1.0.0", **install})
    ota_agent()
    failed = statuses.wait_status(FAILED, timeout=30)
    assert failed.error.endswith("; rollback.sh not run: current/ is not 2.0.0")
    assert failed.current_version == "1.0.0"
    assert marks(tmp_path) == []
    assert (current / "update.sh").read_text() == "true\n"  # current/ untouched
    state, _ = load_state(Store(store_root(tmp_path)))
    assert state.install is None and state.failures["2.0.0"].attempts == 1


# 8-9. What the error says.


def test_the_error_of_a_chatty_failure_ends_with_its_real_last_line(
    ota_agent: StartAgent,
    statuses: StatusWatcher,
    offer: Offer,
    tmp_path: Path,
) -> None:
    """update.sh prints 2 MB, then its reason and exits 4: the error ends with that reason."""
    offer(
        update='yes | head -c 2000000\necho "FATAL: real reason"\nexit 4\n',
        rollback=None,
    )
    ota_agent(auto_install=True)
    failed = statuses.wait_status(FAILED, timeout=60)
    assert failed.error.startswith("update.sh exited with 4: ")
    assert failed.error.endswith("| FATAL: real reason")


def test_an_unexpected_error_after_update_sh_ran_is_finished_by_the_journal(
    ota_agent: StartAgent,
    statuses: StatusWatcher,
    offer: Offer,
    tmp_path: Path,
) -> None:
    """update.sh ran, then the install raises (rollback's exit file a folder): finished,
    counted, reported."""
    breaks_log = 'mkdir "$CHX_OTA_PAYLOAD_DIR/../rollback.sh.exit"\nexit 3\n'
    offer(update=breaks_log)
    agent = ota_agent(auto_install=True)
    failed = statuses.wait_status(FAILED, timeout=30)
    assert failed.error.startswith("install failed: IsADirectoryError")
    assert failed.current_version == "1.0.0"
    store = Store(store_root(tmp_path))
    state, _ = load_state(store)
    assert state.install is None and state.failures["2.0.0"].attempts == 1
    # Finished by its journal in the same process: the rollback was attempted.
    assert "finishing 2.0.0 by its journal failed" in agent.output()
    # Not retried: the loop goes on, and 2.0.0 is reported as failed, not installed again.
    after = statuses.mark()
    assert statuses.request("check")["ok"] is True
    statuses.wait_for(
        lambda s: s.status == FAILED and "failed 1 time(s)" in s.error, after=after, timeout=30
    )
    agent.stop()
    # A restart finds nothing left to recover.
    after = statuses.mark()
    again = ota_agent(auto_install=True)
    statuses.wait_for(lambda s: s.status == FAILED, after=after, timeout=30)
    again.stop()
    assert "found an interrupted install" not in again.output()
    assert marks(tmp_path).count("update") == 1 and "old-rollback" not in marks(tmp_path)


def test_rollback_sh_runs_or_is_reported_when_its_log_cannot_be_written(
    ota_agent: StartAgent,
    statuses: StatusWatcher,
    offer: Offer,
    tmp_path: Path,
) -> None:
    """update.sh fills its log (a full disk) and fails: rollback.sh runs, or the error says not."""
    limit = 256 * 1024  # RLIMIT_FSIZE of the agent and its scripts: past it, writes fail
    fills_log = (
        'LOG="$CHX_OTA_PAYLOAD_DIR/../logs/$CHX_OTA_VERSION_TARGET.log"\n'
        f'head -c {2 * limit} /dev/zero >> "$LOG" 2>/dev/null\nexit 3\n'
    )
    offer(update=fills_log)
    ota_agent(auto_install=True, file_size_limit=limit)
    failed = statuses.wait_status(FAILED, timeout=30)
    assert failed.current_version == "1.0.0"
    assert "new-rollback" in marks(tmp_path) or "rollback.sh not run" in failed.error
