"""What the command line shows: status lines, the progress bar, results, and JSON for scripts.

Rules: ``--json`` prints JSON (the reply on stdout, each status as a JSON line on
stderr). Without it, stdout gets JSON when it is not a terminal (``| jq``
works) and one human line when it is; stderr, where people watch, gets one
human line per status, and a progress bar redrawn in place when it is a terminal
(plain lines every 10% otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from connhex_edge_ota.status import Status

_MIB = 1024 * 1024
BAR_WIDTH = 24


def wants_json(flag: bool, stream: TextIO | None = None) -> bool:
    """JSON on ``stream`` (stdout) for ``--json``, or when it is not a terminal."""
    return flag or not (stream or sys.stdout).isatty()


def status_line(status: Status) -> str:
    """One short line for a person: what the device is doing, and why it failed."""
    name, error = status.status, status.error
    current = status.current_version or "no release yet"
    latest = status.latest_version or "?"
    lines = {
        "checking": f"checking for a new release (running {current})",
        "check_failed": f"check failed: {error}",
        "update_available": f"update available: {latest} (running {current})",
        "downloading": f"downloading {latest}",
        "download_failed": f"download failed: {error}",
        "update_ready": f"ready to install: {latest}",
        "updating": f"installing {latest} (running update.sh)",
        "update_failed": f"update failed: {error}",
        "updated": f"up to date: running {current}",
    }
    line = lines.get(name, f"{name or 'no status yet'} (running {current})")
    if error and name in ("checking", "update_available", "update_ready", "updated"):
        line += f" ({error})"
    return line


def size(count: int) -> str:
    return f"{count / _MIB:.1f} MiB"


def duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Console:
    """Status lines and download progress on stderr, for one command."""

    def __init__(self, json_lines: bool = False, err: TextIO | None = None) -> None:
        self.err = err or sys.stderr
        self.json_lines = json_lines
        self.tty = self.err.isatty() and not json_lines
        self.bar_open = False
        """A progress bar is drawn without its newline yet."""
        self.done = 0
        self.total = 0
        self._started: tuple[float, int] | None = None
        self._last_tenth = -1
        self.interrupted = False

    def _end_bar(self) -> None:
        if self.bar_open:
            print(file=self.err, flush=True)
            self.bar_open = False

    def say(self, text: str) -> None:
        """A line of its own, after any progress bar."""
        self._end_bar()
        print(text, file=self.err, flush=True)

    async def show_status(self, status: Status) -> None:
        """A reporter for the service: one line per status."""
        if self.json_lines:
            print(json.dumps(status.payload()), file=self.err, flush=True)
            return
        if status.status != "downloading":
            self._started = None
        if status.status == "download_failed" and self.interrupted:
            return  # the command says where it stopped, once it has
        self.say(status_line(status))

    def progress(self, done: int, total: int) -> None:
        """A progress printer for the service: bar with rate and ETA, or 10% lines."""
        self.done, self.total = done, total
        if self.json_lines:
            return
        now = time.monotonic()
        if self._started is None:
            self._started = (now, done)  # bytes from an earlier run do not count in the rate
        began, base = self._started
        elapsed = now - began
        rate = (done - base) / elapsed if elapsed > 0.2 else 0.0
        share = done / total if total else 1.0
        if not self.tty:
            if int(share * 10) != self._last_tenth:
                self._last_tenth = int(share * 10)
                print(f"downloaded {done} of {total} bytes ({share:.0%})", file=self.err)
            return
        filled = int(share * BAR_WIDTH)
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        speed = f"{rate / 1024:.0f} KiB/s" if rate < _MIB else f"{rate / _MIB:.1f} MiB/s"
        if not rate:
            speed = "-- KiB/s"
        eta = f"ETA {duration((total - done) / rate)}" if rate and done < total else ""
        if done >= total:
            eta = f"in {duration(elapsed)}"
        line = f"\r[{bar}] {share:6.1%} {done / _MIB:.1f}/{size(total)} {speed} {eta}"
        print(f"{line:<79}", end="", file=self.err, flush=True)
        self.bar_open = True
        if done >= total:
            self._end_bar()


@contextlib.contextmanager
def interruptible(
    console: Console, downloading: Callable[[], bool], cancel_transfer: Callable[[], None]
) -> Iterator[None]:
    """Ctrl-C (or SIGTERM) during a step: a download stops cleanly, anything else is cancelled.

    The first press during a download asks it to stop at its next chunk, so the
    partial file and a true status (``download_failed``) are saved and the next
    ``download`` resumes; a second press, or one at another time, cancels the step.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    presses = [0]

    def on_signal() -> None:
        presses[0] += 1
        console.interrupted = True
        if presses[0] == 1 and downloading():
            cancel_transfer()
        elif task is not None:
            task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        yield
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def print_result(result: dict[str, Any], as_json: bool, note: str = "", told: bool = True) -> None:
    """The outcome of a step on stdout: the JSON reply, or for a person what is left to say.

    ``told``: the status lines were shown already, so a person needs only a note.
    """
    if as_json:
        print(json.dumps(result), flush=True)
        return
    if note:
        print(note, flush=True)
    elif not told:
        line = status_line(Status.from_payload(result.get("status", {})))
        error = result.get("error") or ""
        print(line if result.get("ok") or error in line else f"{line}: {error}", flush=True)
