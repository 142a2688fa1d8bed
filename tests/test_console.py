"""The command line for people: human lines on a terminal, JSON for scripts, Ctrl-C, up to date."""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from connhex_edge_ota.console import Console, status_line
from connhex_edge_ota.server import ReleaseServer
from connhex_edge_ota.status import Status
from tests.conftest import wait_until

CLI = [sys.executable, "-m", "connhex_edge_ota"]


def agent_toml(tmp_path: Path, server: ReleaseServer) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        f"[ota]\ninstall_dir = '{tmp_path}'\nserver_url = '{server.url}'\ninit_id = 'x'\n"
        "initial_version = '1.0.0'\nfree_space_margin = 0\n"
    )
    return path


class Terminal:
    """A command whose stdout and/or stderr is a pseudo-terminal, read in the background."""

    def __init__(self, args: list[str], stdout_tty: bool = True) -> None:
        controller, terminal = pty.openpty()
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=terminal if stdout_tty else subprocess.PIPE,
            stderr=terminal,
        )
        os.close(terminal)
        self.controller = controller
        self.seen = b""
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.controller, 4096)
            except OSError:  # the terminal closed with the process
                chunk = b""
            with self.changed:
                self.seen += chunk
                self.changed.notify_all()
            if not chunk:
                return

    def wait_for(self, text: bytes, timeout: float = 30.0) -> None:
        with self.changed:
            if not self.changed.wait_for(lambda: text in self.seen, timeout):
                raise AssertionError(f"{text!r} not shown; saw {self.seen[-500:]!r}")

    def finish(self, timeout: float = 30.0) -> tuple[int, str]:
        code = self.process.wait(timeout)
        self.reader.join(10)
        os.close(self.controller)
        return code, self.seen.decode(errors="replace").replace("\r\n", "\n")


def test_status_lines_are_short_and_human() -> None:
    assert status_line(Status("1.0.0", "2.0.0", "update_available")) == (
        "update available: 2.0.0 (running 1.0.0)"
    )
    assert status_line(Status("1.0.0", "1.0.0", "updated")) == "up to date: running 1.0.0"
    assert status_line(Status("1.0.0", "", "check_failed", "boom")) == "check failed: boom"


def test_progress_bar_has_rate_and_eta(tmp_path: Path) -> None:
    class Tty:
        def __init__(self) -> None:
            self.text = ""

        def isatty(self) -> bool:
            return True

        def write(self, text: str) -> int:
            self.text += text
            return len(text)

        def flush(self) -> None:
            return None

    out = Tty()
    console = Console(err=out)  # type: ignore[arg-type]
    console._started = (time.monotonic() - 2.0, 0)  # two seconds in: 1 MiB/s
    console.progress(2 * 2**20, 8 * 2**20)
    assert "25.0%" in out.text and "2.0/8.0 MiB" in out.text
    assert re.search(r" (10\d\d KiB|1\.0 MiB)/s ETA 0:06 ", out.text), out.text
    console.say("stopped")
    assert out.text.endswith("\nstopped\n")  # the bar's line is ended first


def test_on_a_terminal_a_check_reads_as_sentences(
    tmp_path: Path, make_release: Callable[..., Path]
) -> None:
    with ReleaseServer(_folder(tmp_path)) as server:
        server.releases.publish(make_release("2.0.0"))
        term = Terminal([*CLI, "check", "--config", str(agent_toml(tmp_path, server))])
        code, shown = term.finish()
    assert code == 0
    assert "checking for a new release (running 1.0.0)\n" in shown
    assert "update available: 2.0.0 (running 1.0.0)\n" in shown
    assert "{" not in shown and "plugin ota loaded" not in shown


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "releases"
    folder.mkdir(exist_ok=True)
    return folder


def test_json_for_scripts(tmp_path: Path, make_release: Callable[..., Path]) -> None:
    with ReleaseServer(_folder(tmp_path)) as server:
        server.releases.publish(make_release("2.0.0"))
        config = str(agent_toml(tmp_path, server))
        piped = subprocess.run(
            [*CLI, "check", "--config", config], capture_output=True, text=True, timeout=60
        )
        asked = subprocess.run(
            [*CLI, "check", "--json", "--config", config],
            capture_output=True,
            text=True,
            timeout=60,
        )
    # stdout not a terminal: the reply as JSON; statuses for people on stderr.
    assert json.loads(piped.stdout)["status"]["latest_version"] == "2.0.0"
    assert "update available: 2.0.0" in piped.stderr
    # --json: statuses as JSON lines too.
    assert json.loads(asked.stdout)["ok"] is True
    lines = [json.loads(line) for line in asked.stderr.splitlines() if line.startswith("{")]
    assert [line["status"] for line in lines] == ["checking", "update_available"]


@pytest.mark.parametrize("verb", ["install", "download"])
def test_nothing_to_do_is_success(tmp_path: Path, verb: str) -> None:
    with ReleaseServer(_folder(tmp_path)) as server:
        config = str(agent_toml(tmp_path, server))
        piped = subprocess.run(
            [*CLI, verb, "--config", config], capture_output=True, text=True, timeout=60
        )
        term = Terminal([*CLI, verb, "--config", config])
        code, shown = term.finish()
    assert piped.returncode == 0, piped.stderr
    assert json.loads(piped.stdout)["note"] == "already up to date: 1.0.0"
    assert code == 0 and shown.endswith("already up to date: 1.0.0\n")


def test_download_checks_first_and_fetches_the_newest(
    tmp_path: Path, make_release: Callable[..., Path]
) -> None:
    with ReleaseServer(_folder(tmp_path)) as server:
        config = str(agent_toml(tmp_path, server))
        server.releases.publish(make_release("2.0.0"))
        first = subprocess.run(
            [*CLI, "download", "--config", config], capture_output=True, text=True, timeout=60
        )
        assert json.loads(first.stdout)["status"]["latest_version"] == "2.0.0"
        server.releases.publish(make_release("3.0.0"))
        second = subprocess.run(
            [*CLI, "download", "--config", config], capture_output=True, text=True, timeout=60
        )
    reply = json.loads(second.stdout)
    assert reply["ok"] is True
    assert (reply["status"]["status"], reply["status"]["latest_version"]) == (
        "update_ready",
        "3.0.0",
    )


def test_ctrl_c_during_download_stops_cleanly_and_resumes(
    tmp_path: Path, make_release: Callable[..., Path]
) -> None:
    with ReleaseServer(_folder(tmp_path)) as server:
        release = make_release("2.0.0", files={"p.bin": os.urandom(3_000_000)})
        server.releases.publish(release)
        server.faults.rate = 1_000_000
        config = str(agent_toml(tmp_path, server))
        term = Terminal([*CLI, "download", "--config", config])
        term.wait_for(b"iB/s ETA")  # the bar runs, with a rate
        term.process.send_signal(signal.SIGINT)
        code, shown = term.finish()
        assert code == 1
        assert "Traceback" not in shown and "KeyboardInterrupt" not in shown
        stopped = shown[shown.index("stopped") :]
        assert shown[shown.index("stopped") - 1] == "\n"  # the bar's line was ended
        assert "the partial download is kept" in stopped and "resumes it" in stopped
        state = json.loads((tmp_path / ".store/ota/state.json").read_text())
        assert state["status"] == "download_failed"  # the truth, not "downloading"
        assert state["partial"] is not None
        kept = (tmp_path / ".store/ota/downloads/2.0.0.zip.part").stat().st_size
        assert 0 < kept < release.stat().st_size
        server.faults.rate = None
        again = subprocess.run(
            [*CLI, "download", "--config", config], capture_output=True, text=True, timeout=60
        )
        assert again.returncode == 0, again.stderr
        resumed = [r for r in server.releases.requests if r.method == "GET"][-1]
    assert resumed.headers["Range"] == f"bytes={kept}-"
    assert json.loads(again.stdout)["status"]["status"] == "update_ready"


def pack_dir(tmp_path: Path) -> Path:
    source = tmp_path / "src"
    source.mkdir()
    (source / "update.sh").write_text("true\n")
    return source


def test_pack_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    source, out = pack_dir(tmp_path), tmp_path / "fw.zip"
    out.write_bytes(b"a signed release")
    refused = subprocess.run(
        [*CLI, "pack", str(source), "-o", str(out)], capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 1
    assert refused.stderr.strip() == f"pack: {out} exists; not overwritten (use --force)"
    assert out.read_bytes() == b"a signed release"
    forced = subprocess.run(
        [*CLI, "pack", str(source), "-o", str(out), "--force"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert forced.returncode == 0 and out.read_bytes().startswith(b"PK")


def test_pack_leaves_nothing_behind_when_it_fails(tmp_path: Path) -> None:
    source, out = pack_dir(tmp_path), tmp_path / "out" / "fw.zip"
    out.parent.mkdir()
    bad_key = tmp_path / "bad.key"
    bad_key.write_text("not a key")
    failed = subprocess.run(
        [*CLI, "pack", str(source), "-o", str(out), "--key", str(bad_key), "--version", "1.0.0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert failed.returncode == 1 and "not a readable private key" in failed.stderr
    assert list(out.parent.iterdir()) == []


def test_ctrl_c_during_update_sh_is_rolled_back_at_the_next_step(
    tmp_path: Path, make_release: Callable[..., Path]
) -> None:
    running, rolled = tmp_path / "running", tmp_path / "rolled"
    with ReleaseServer(_folder(tmp_path)) as server:
        server.releases.publish(
            make_release(
                "2.0.0",
                update_sh=f'touch "{running}"\nsleep 300\n',
                rollback_sh=f'touch "{rolled}"\n',
            )
        )
        config = str(agent_toml(tmp_path, server))
        term = Terminal([*CLI, "install", "--config", config])
        term.wait_for(b"installing 2.0.0")
        wait_until(running.exists)
        term.process.send_signal(signal.SIGINT)
        code, shown = term.finish()
        assert code == 1 and "Traceback" not in shown
        assert "interrupted" in shown
        after = subprocess.run(
            [*CLI, "check", "--config", config], capture_output=True, text=True, timeout=60
        )
    assert rolled.exists()
    assert "update failed: interrupted; rolled back" in after.stderr


def test_status_on_a_terminal_reads_as_sentences(tmp_path: Path) -> None:
    with ReleaseServer(_folder(tmp_path)) as server:
        config = str(agent_toml(tmp_path, server))
        subprocess.run([*CLI, "check", "--config", config], capture_output=True, timeout=60)
    term = Terminal([*CLI, "status", "--config", config])
    code, shown = term.finish()
    assert code == 0
    assert shown.startswith("up to date: running 1.0.0\nlast checked: 20")
