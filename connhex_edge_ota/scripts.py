"""Running a release's ``update.sh`` and ``rollback.sh``: process group, timeout, bounded log."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from connhex_edge_ota.duration import format_duration

log = logging.getLogger(__name__)

EXIT_RESTART = 10
"""``update.sh`` exit code meaning: success, and restart the agent."""
KILL_GRACE = 10.0
"""Seconds between SIGTERM and SIGKILL to a script's process group on timeout."""
LOG_LIMIT = 1024 * 1024
TAIL_LINES = 5
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# The wrapper records its process group before the script starts and the
# script's exit status when it ends, so that a restarted agent can kill what a
# dead agent left running, or finish an install whose script completed.
_WRAPPER = (
    'if [ -n "$3" ]; then echo $$ > "$3"; fi; '
    'sh "./$1"; code=$?; '
    'if [ -n "$2" ]; then printf "%s\\n" "$code" > "$2.tmp" && mv -f "$2.tmp" "$2"; fi; '
    "exit $code"
)


@dataclass
class ScriptResult:
    script: str
    code: int | None = None
    signal: int | None = None
    timed_out: bool = False
    timeout: float = 0.0
    tail: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.code in (0, EXIT_RESTART) and not self.timed_out

    @property
    def restart(self) -> bool:
        return self.ok and self.code == EXIT_RESTART

    def describe(self) -> str:
        if self.timed_out:
            what = f"{self.script} timed out after {format_duration(self.timeout)}"
        elif self.signal is not None:
            what = f"{self.script} killed by signal {signal.Signals(self.signal).name}"
        else:
            what = f"{self.script} exited with {self.code}"
        return f"{what}: {' | '.join(self.tail)}" if self.tail else what


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
    exit_file: Path | None = None,
    on_start: Callable[[int], None] | None = None,
    group_file: Path | None = None,
) -> ScriptResult:
    """Run ``sh <script>`` in ``workdir`` in its own process group, under ``timeout``.

    Output goes to ``log_path`` (appended, at most LOG_LIMIT bytes per run) and
    to the log; the last lines come back in the result. On timeout the whole
    group gets SIGTERM, then SIGKILL after KILL_GRACE seconds. ``exit_file``
    receives the exit status and ``group_file`` the process group id (written
    before the script starts).
    """
    result = ScriptResult(script=script, timeout=timeout)
    process = await asyncio.create_subprocess_exec(
        "sh",
        "-c",
        _WRAPPER,
        "connhex-ota",
        script,
        str(exit_file) if exit_file else "",
        str(group_file) if group_file else "",
        cwd=workdir,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    if on_start is not None:
        on_start(process.pid)
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    assert process.stdout is not None
    reader = asyncio.create_task(_copy_output(process.stdout, log_path, script, tail))
    try:
        await asyncio.wait_for(process.wait(), timeout)
    except TimeoutError:
        result.timed_out = True
        await _kill_group(process)
    except asyncio.CancelledError:
        await _kill_group(process, grace=0.5)  # the agent is stopping: be quick
        raise
    finally:
        # Children left in the background may hold the pipe open: stop reading soon.
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(reader), 1.0)
        reader.cancel()
    code = process.returncode
    if code is not None and code < 0:
        result.signal = -code
    else:
        result.code = code
    result.tail = list(tail)
    return result


async def _kill_group(process: asyncio.subprocess.Process, grace: float = KILL_GRACE) -> None:
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            await asyncio.wait_for(process.wait(), wait)
            return
        except TimeoutError:
            continue


def kill_group(pgid: int) -> None:
    """SIGKILL a process group left over from a previous run (no error if it is gone)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


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


async def _copy_output(
    stream: asyncio.StreamReader, log_path: Path, script: str, tail: deque[str]
) -> None:
    """Copy the output to ``log_path`` (at most LOG_LIMIT bytes) and, bounded, to the log."""
    echo = _Echo(script, log_path, tail)
    written = 0
    pending = b""
    try:
        with log_path.open("ab") as out:
            out.write(f"--- {script}\n".encode())
            while chunk := await stream.read(_READ_SIZE):
                if written < LOG_LIMIT:
                    kept = chunk[: LOG_LIMIT - written]
                    out.write(kept)
                    written += len(kept)
                    if written >= LOG_LIMIT:
                        out.write(b"\n[output truncated]\n")
                    out.flush()
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                if len(pending) > _LINE_LIMIT:
                    lines.append(pending)
                    pending = b""
                echo.lines(lines)
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
