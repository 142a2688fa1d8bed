"""Runs one release script on the agent's behalf, so that the script never depends on the agent.

Executed as a file (``python -I -S script_wrapper.py SCRIPT EXIT_FILE LOG_FILE LIMIT``),
standard library only, as the leader of the script's own process group:

- it waits for ``go`` on its stdin, which the agent sends only once the start is
  recorded in the install journal: an agent killed before that closes the pipe,
  and the script never runs (``skipped`` in the exit file);
- a copier process of its own reads the script's output and writes it to the log
  file: whole lines up to LIMIT bytes, then a count of the lines left out and the
  last lines. The script never meets a broken pipe: not when the agent dies, not
  when the wrapper ends while a daemon the script started still writes;
- it records the script's exit status in the exit file when the script ends,
  even when the agent died meanwhile, and exits with it (128 + n for signal n);
- SIGTERM sent to the group (a timeout, the agent stopping) is for the script:
  the wrapper and the copier stay, so that the script's clean-up output is kept
  and its exit recorded; SIGKILL ends everything.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType
from typing import BinaryIO

SKIPPED = "skipped"
DRAIN_WAIT = 1.0
"""Seconds the output may go on after the script ended (its last lines in the pipe)."""
KEEP_LAST = 16 * 1024
"""Bytes of the end of a long output kept after the count of lines left out."""


def record(exit_file: str, text: str) -> None:
    """Replace ``exit_file`` with ``text`` atomically (a reader sees all or nothing)."""
    tmp = Path(exit_file + ".tmp")
    with tmp.open("w") as file:
        file.write(text + "\n")
        file.flush()
        os.fsync(file.fileno())
    tmp.replace(exit_file)


class Copier:
    """Writes output to the log: whole lines up to ``limit`` bytes in all, and the last ones.

    Past the limit, the lines are counted and dropped, except the last
    ``limit // 4`` bytes (at most KEEP_LAST), where failures are told: the log
    then reads ``[output truncated: N lines left out]`` followed by those lines.
    """

    def __init__(self, log: BinaryIO, limit: int) -> None:
        self.log = log
        self.keep_last = min(KEEP_LAST, limit // 4)
        self.room = limit - self.keep_last
        self.dropping = False
        self.dropped_lines = 0
        self.dropped_bytes = 0
        self.ends_line = True
        """The kept part ends with a whole line."""
        self.last = bytearray()
        self.closed = False

    def feed(self, chunk: bytes) -> None:
        if self.closed:
            return  # told already: what a daemon writes later is drained, not kept
        if not self.dropping:
            if len(chunk) <= self.room:
                self.log.write(chunk)
                self.room -= len(chunk)
                self.ends_line = chunk.endswith(b"\n") if chunk else self.ends_line
                return
            cut = chunk.rfind(b"\n", 0, self.room) + 1  # whole lines only
            if cut:
                self.log.write(chunk[:cut])
                self.ends_line = True
            chunk = chunk[cut:]
            self.dropping = True
        self.dropped_lines += chunk.count(b"\n")
        self.dropped_bytes += len(chunk)
        self.last += chunk
        del self.last[: max(0, len(self.last) - self.keep_last)]

    def close(self) -> None:
        """Write the count of lines left out and the last lines (once)."""
        if self.closed:
            return
        self.closed = True
        if not self.dropping:
            return
        last = self.last
        cut_line = not self.ends_line  # a line begun in the kept part ends in the dropped one
        ended = self.dropped_lines > 0  # some dropped line ended (else all is one line)
        newline = last.find(b"\n")
        if cut_line or len(last) >= self.keep_last:  # start the shown part at a whole line
            start = newline + 1 if newline >= 0 else len(last)
        else:
            start = 0
        shown = bytes(last[start:])
        dropped = max(0, self.dropped_lines - shown.count(b"\n") - cut_line)
        remainder_only = cut_line and newline < 0 and (self.dropped_bytes == len(last) or not ended)
        if not shown and last and not last.endswith(b"\n") and not remainder_only:
            dropped += 1  # an unfinished last line, dropped whole
        note = b"[output truncated: %d lines left out]\n" % dropped
        self.log.write((b"\n" if cut_line else b"") + note + shown)


def copy(source: BinaryIO, log: BinaryIO, limit: int) -> None:
    """Copy ``source`` to ``log`` through a :class:`Copier` until the end of ``source``."""
    copier = Copier(log, limit)
    while chunk := source.read1(64 * 1024):  # type: ignore[attr-defined]
        copier.feed(chunk)
    copier.close()


def _keep_going(_signum: int, _frame: FrameType | None) -> None:
    """SIGTERM to the group is for the script (a Python handler, reset by exec)."""


def _copier_process(output: int, told: int, log_file: str, limit: int) -> None:
    """The copier: reads ``output`` until its end; on SIGUSR1, tells the log now (ack on
    ``told``) and drains the rest (a daemon the script left holds the output open)."""
    tell_now = [False]

    def on_usr1(_signum: int, _frame: FrameType | None) -> None:
        tell_now[0] = True

    signal.signal(signal.SIGUSR1, on_usr1)
    with open(log_file, "ab", buffering=0) as log:
        copier = Copier(log, limit)
        while True:
            if tell_now[0] and not copier.closed:
                with contextlib.suppress(OSError):
                    copier.close()
                os.write(told, b"!")
            ready, _, _ = select.select([output], [], [], 0.1)
            if not ready:
                continue
            chunk = os.read(output, 64 * 1024)
            if not chunk:
                break
            try:
                copier.feed(chunk)
            except OSError:  # the log cannot grow (a full disk): drain, never break the pipe
                copier.closed = True
        with contextlib.suppress(OSError):
            copier.close()
        with contextlib.suppress(OSError):
            os.write(told, b"!")


def _ended(pid: int, within: float) -> bool:
    """Whether child ``pid`` ended within ``within`` seconds (reaped if so)."""
    steps = max(1, int(within / 0.02))
    for _ in range(steps):
        done, _status = os.waitpid(pid, os.WNOHANG)
        if done:
            return True
        select.select([], [], [], 0.02)
    return False


def main(argv: list[str]) -> int:
    script, exit_file, log_file, limit = argv[1], argv[2], argv[3], int(argv[4])
    signal.signal(signal.SIGTERM, _keep_going)
    if sys.stdin.readline().strip() != "go":
        record(exit_file, SKIPPED)
        return 125
    output_read, output_write = os.pipe()
    told_read, told_write = os.pipe()
    copier = os.fork()
    if copier == 0:  # the copier process
        os.close(output_write)
        os.close(told_read)
        try:
            _copier_process(output_read, told_write, log_file, limit)
        finally:
            os._exit(0)
    os.close(output_read)
    os.close(told_write)
    with open(os.devnull, "rb") as devnull:
        process = subprocess.Popen(
            ["sh", f"./{script}"], stdin=devnull, stdout=output_write, stderr=output_write
        )
    os.close(output_write)
    code = process.wait()
    if code < 0:  # as a shell reports it
        code = 128 - code
    record(exit_file, str(code))
    if not _ended(copier, DRAIN_WAIT):
        os.kill(copier, signal.SIGUSR1)  # the output is still open: tell what we have now
        select.select([told_read], [], [], DRAIN_WAIT)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
