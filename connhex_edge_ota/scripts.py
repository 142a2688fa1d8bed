"""Running a release's ``update.sh`` and ``rollback.sh``: process group, timeout, bounded log."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from connhex_edge_ota import killpoints
from connhex_edge_ota.duration import format_duration

log = logging.getLogger(__name__)

EXIT_RESTART = 10
"""``update.sh`` exit code meaning: success, and restart the agent."""
KILL_GRACE = 10.0
"""Seconds between SIGTERM and SIGKILL to a script's process group on timeout."""
LOG_LIMIT = 1024 * 1024
"""Bytes of a script's output kept in its log per run; the rest is drained and dropped."""
FOLLOW_PERIOD = 0.1
"""Seconds between looks at the script log for new lines to echo."""
TAIL_LINES = 5
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

WRAPPER = Path(__file__).with_name("script_wrapper.py")
"""Runs each script on the agent's behalf (see :mod:`connhex_edge_ota.script_wrapper`)."""
SKIPPED = "skipped"
"""What the exit file says when the wrapper ended without running the script."""


@dataclass
class ScriptResult:
    script: str
    code: int | None = None
    signal: int | None = None
    timed_out: bool = False
    timeout: float = 0.0
    tail: list[str] = field(default_factory=list)

    wrapper_died: bool = False
    """The wrapper ended before recording the script's end: a failure, its group killed."""

    @property
    def ok(self) -> bool:
        return self.code in (0, EXIT_RESTART) and not self.timed_out and not self.wrapper_died

    @property
    def restart(self) -> bool:
        return self.ok and self.code == EXIT_RESTART

    def describe(self) -> str:
        if self.timed_out:
            what = f"{self.script} timed out after {format_duration(self.timeout)}"
        elif self.wrapper_died:
            how = f"signal {signal_name(self.signal)}" if self.signal else f"code {self.code}"
            what = f"{self.script} stopped: its wrapper was ended by {how}"
        elif self.signal is not None:
            what = f"{self.script} killed by signal {signal_name(self.signal)}"
        else:
            what = f"{self.script} exited with {self.code}"
        return f"{what}: {' | '.join(self.tail)}" if self.tail else what


def signal_name(number: int) -> str:
    """``KILL`` for 9; the number itself for a signal without a name (real-time ones)."""
    try:
        return signal.Signals(number).name.removeprefix("SIG")
    except ValueError:
        return str(number)


def script_environment(
    payload_dir: Path, current: str, target: str, timeout: float
) -> dict[str, str]:
    """The documented environment of the scripts: a safe PATH, locale, HOME and CHX_OTA_*."""
    return {
        "PATH": SAFE_PATH,
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
        "CHX_OTA_PAYLOAD_DIR": str(payload_dir),
        "CHX_OTA_VERSION_CURRENT": current,
        "CHX_OTA_VERSION_TARGET": target,
        "CHX_OTA_TIMEOUT_SEC": str(int(timeout)),
    }


async def run_script(
    script: str,
    workdir: Path,
    env: dict[str, str],
    timeout: float,
    log_path: Path,
    exit_file: Path,
    on_start: Callable[[int, int], Awaitable[None]],
    stage: str = "script",
    grace: float = KILL_GRACE,
) -> ScriptResult:
    """Run ``sh <script>`` in ``workdir`` in its own process group, under ``timeout``.

    ``on_start(pgid, start_ticks)`` records the start before the script runs;
    when it raises, the script never runs and the error propagates. Output goes
    to ``log_path`` (appended, at most LOG_LIMIT bytes per run) and to the log;
    the last lines come back in the result. On timeout the whole group gets
    SIGTERM, then SIGKILL after ``grace`` seconds. ``exit_file`` receives the
    exit status, even if the agent dies meanwhile. ``stage`` names the kill
    points (``script_*`` or ``rollback_*``).
    """
    result = ScriptResult(script=script, timeout=timeout)
    exit_file.unlink(missing_ok=True)
    try:
        with log_path.open("ab") as log_file:
            log_file.write(f"--- {script}\n".encode())
            offset = log_file.tell()
    except OSError as exc:
        if stage != "rollback":
            raise  # update.sh does not start without its log
        # A rollback runs even where its log cannot be kept (a full disk): it is the safe side.
        log.warning("%s runs without a log: %s: %s", script, log_path, exc.strerror or exc)
        log_path, offset = Path(os.devnull), 0
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-I",  # isolated, no site: the agent's environment and packages stay out
        "-S",
        str(WRAPPER),
        script,
        str(exit_file),
        str(log_path),
        str(LOG_LIMIT),
        cwd=workdir,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    assert process.stdin is not None
    try:
        await on_start(process.pid, start_ticks(process.pid))
    except BaseException:
        process.stdin.close()  # EOF: the wrapper exits without running the script
        await process.wait()
        raise
    killpoints.reached(f"{stage}_recorded")
    process.stdin.write(b"go\n")
    with contextlib.suppress(ConnectionError):
        await process.stdin.drain()
    process.stdin.close()
    killpoints.reached(f"{stage}_running")
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    ended = asyncio.Event()
    reader = asyncio.create_task(
        _follow_output(
            log_path,
            offset,
            script,
            tail,
            ended,
            first_line=lambda: killpoints.reached(f"{stage}_output"),
        )
    )
    try:
        await asyncio.wait_for(process.wait(), timeout)
    except TimeoutError:
        result.timed_out = True
        await _kill_group(process, grace)
    except asyncio.CancelledError:
        await _kill_group(process, grace=0.5)  # the agent is stopping: be quick
        # Stopped by us, not ended by itself: its status is no result, and the next
        # start finds the script "interrupted", as after a kill -9.
        exit_file.unlink(missing_ok=True)
        raise
    finally:
        ended.set()
        # The log is bounded (LOG_LIMIT and a tail): read it to its end, so the echo and
        # the error's last lines are the script's own last lines.
        await reader
    code = process.returncode
    if code is not None and code < 0:
        result.signal = -code
    else:
        result.code = code
    if not result.timed_out and read_exit(exit_file) is None:
        # The wrapper died before the script ended (the script killed it ...): the
        # script may still run, so its group ends now, and this is a failure.
        result.wrapper_died = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
    result.tail = list(tail)
    killpoints.reached(f"{stage}_exited")
    return result


def read_exit(exit_file: Path) -> int | str | None:
    """What the wrapper recorded: the exit status, :data:`SKIPPED`, or None (nothing yet)."""
    try:
        text = exit_file.read_text().strip()
    except OSError:
        return None
    if text == SKIPPED:
        return SKIPPED
    try:
        return int(text)
    except ValueError:
        return None


def start_ticks(pid: int) -> int:
    """When process ``pid`` started (clock ticks since boot, ``/proc/<pid>/stat``); 0 if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = stat[stat.rfind(")") + 2 :].split()  # the name may hold spaces and ')'
    try:
        if fields[0] == "Z":  # a zombie has run its course
            return 0
        return int(fields[19])  # field 22 of the whole line
    except (IndexError, ValueError):
        return 0


def group_is_running(pgid: int, ticks: int) -> bool:
    """Whether ``pgid`` is provably the group a script was started as (same leader)."""
    return pgid > 1 and ticks > 0 and start_ticks(pgid) == ticks


def kill_recorded_group(pgid: int, ticks: int) -> bool:
    """SIGKILL the group of a script a dead agent left running, only if provably it.

    The leader (the wrapper, whose pid is the group id) must still exist with
    the recorded start time: a recycled pid, init's group or a negative id are
    never signalled. True when the group was killed.
    """
    if not group_is_running(pgid, ticks):
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    return True


async def _kill_group(process: asyncio.subprocess.Process, grace: float = KILL_GRACE) -> None:
    """SIGTERM to the script's group, ``grace`` seconds to end, then SIGKILL to the group.

    The wrapper stays through SIGTERM (to record the script's end); whatever
    ignored it, or outlived the script in its group, ends with the SIGKILL.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(process.wait(), grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(process.wait(), 5.0)


ECHO_FIRST = 20
"""Lines of a script's output the agent's own log shows from the start..."""
ECHO_LAST = 20
"""...and from the end; the lines between are counted, and kept only in the script log."""
_READ_SIZE = 64 * 1024
_LINE_LIMIT = 64 * 1024
"""An unfinished line longer than this is treated as a line of its own."""


class _Echo:
    """The agent's log of one script run: the first and last lines, and how many were left out."""

    def __init__(self, script: str, log_path: Path, tail: deque[str]) -> None:
        self.script = script
        self.log_path = log_path
        self.tail = tail
        self.shown = 0
        self.held: deque[bytes] = deque(maxlen=ECHO_LAST)
        self.after_first = 0
        self.done = False

    def lines(self, lines: list[bytes]) -> None:
        index = 0
        while self.shown < ECHO_FIRST and index < len(lines):
            self._show(lines[index])
            self.shown += 1
            index += 1
        rest = lines[index:]
        self.after_first += len(rest)
        self.held.extend(rest[-ECHO_LAST:])
        recent: list[str] = []
        for line in reversed(lines):  # only the last few lines matter for the error
            if len(recent) == self.tail.maxlen:
                break
            text = line.decode(errors="replace").rstrip()
            if text:
                recent.append(text[:200])
        self.tail.extend(reversed(recent))

    def skipped(self, count: int) -> None:
        """``count`` lines the wrapper left out of the script log: left out here too."""
        self.after_first += count

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        left_out = self.after_first - len(self.held)
        if left_out:
            log.info(
                "%s: [%d lines of output left out here; %s keeps the first %d bytes]",
                self.script,
                left_out,
                self.log_path,
                LOG_LIMIT,
            )
        for line in self.held:
            self._show(line)

    def _show(self, line: bytes) -> None:
        text = line.decode(errors="replace").rstrip()
        if text:
            log.info("%s: %s", self.script, text[:500])


_TRUNCATED = re.compile(rb"\[output truncated: (\d+) lines left out\]")


def _split_at_truncation(lines: list[bytes], echo: _Echo) -> Iterator[list[bytes]]:
    """``lines`` around the wrapper's truncation note, whose count goes to ``echo``."""
    start = 0
    for index, line in enumerate(lines):
        found = _TRUNCATED.fullmatch(line)
        if found:
            yield lines[start:index]
            echo.skipped(int(found.group(1)))
            start = index + 1
    yield lines[start:]


async def _follow_output(
    log_path: Path,
    offset: int,
    script: str,
    tail: deque[str],
    ended: asyncio.Event,
    first_line: Callable[[], None] | None = None,
) -> None:
    """Echo (bounded) the lines the wrapper appends to ``log_path`` from ``offset``."""
    echo = _Echo(script, log_path, tail)
    pending = b""
    try:
        with log_path.open("rb") as log_file:
            log_file.seek(offset)
            while True:
                finished = ended.is_set()  # read once more after the end: nothing is missed
                chunk = log_file.read(_READ_SIZE)
                if chunk:
                    lines = (pending + chunk).split(b"\n")
                    pending = lines.pop()
                    if len(pending) > _LINE_LIMIT:
                        lines.append(pending)
                        pending = b""
                    if lines and first_line is not None:
                        first_line()
                        first_line = None
                    for kept in _split_at_truncation(lines, echo):
                        echo.lines(kept)
                    continue
                if finished:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ended.wait(), FOLLOW_PERIOD)
        if pending:
            echo.lines([pending])
    finally:
        echo.finish()


def prune_logs(folder: Path, keep: int) -> None:
    """Keep the ``keep`` newest logs in ``folder``."""
    logs = sorted(folder.glob("*.log"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in logs[keep:]:
        with contextlib.suppress(OSError):
            old.unlink()
