"""Runs one release script on the agent's behalf, so that the script never depends on the agent.

Executed as a file (``python -I -S script_wrapper.py SCRIPT EXIT_FILE LOG_FILE LIMIT``),
standard library only, as the leader of the script's own process group:

- it waits for ``go`` on its stdin, which the agent sends only once the start is
  recorded in the install journal: an agent killed before that closes the pipe,
  and the script never runs (``skipped`` in the exit file);
- it copies the script's output to the log file, at most LIMIT bytes per run
  (the rest is drained and dropped, with a note), so the script never meets a
  broken pipe when the agent dies, and a flood never fills the disk;
- it records the script's exit status in the exit file when the script ends,
  even when the agent died meanwhile, and exits with it (128 + n for signal n);
- it waits at most a second for the output to end: a daemon the script
  started may hold it open for ever.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import BinaryIO

SKIPPED = "skipped"
DRAIN_WAIT = 1.0


def record(exit_file: str, text: str) -> None:
    """Replace ``exit_file`` with ``text`` atomically (a reader sees all or nothing)."""
    tmp = Path(exit_file + ".tmp")
    with tmp.open("w") as file:
        file.write(text + "\n")
        file.flush()
        os.fsync(file.fileno())
    tmp.replace(exit_file)


def copy(source: BinaryIO, log: BinaryIO, limit: int) -> None:
    """Copy ``source`` to ``log``: whole lines up to ``limit`` bytes in all, and the last ones.

    Past the limit, the lines are counted and dropped, except the last
    ``limit // 4`` bytes (at most 16 KiB), where failures are told: the log then
    reads ``[output truncated: N lines left out]`` followed by those last lines.
    """
    keep_last = min(16 * 1024, limit // 4)
    room = limit - keep_last
    dropping = False
    dropped_lines = 0
    dropped_bytes = 0
    ends_line = True
    """The kept part ends with a whole line."""
    last = bytearray()
    while chunk := source.read1(64 * 1024):  # type: ignore[attr-defined]
        if not dropping:
            if len(chunk) <= room:
                log.write(chunk)
                room -= len(chunk)
                ends_line = chunk.endswith(b"\n")
                continue
            cut = chunk.rfind(b"\n", 0, room) + 1  # whole lines only
            if cut:
                log.write(chunk[:cut])
                ends_line = True
            chunk = chunk[cut:]
            dropping = True
        dropped_lines += chunk.count(b"\n")
        dropped_bytes += len(chunk)
        last += chunk
        del last[: max(0, len(last) - keep_last)]
    if dropping:
        cut_line = not ends_line  # a line begun in the kept part ends in the dropped one
        ended = dropped_lines > 0  # some dropped line ended (else all is one line)
        newline = last.find(b"\n")
        if cut_line or len(last) >= keep_last:  # start the shown part at a whole line
            start = newline + 1 if newline >= 0 else len(last)
        else:
            start = 0
        shown = bytes(last[start:])
        dropped_lines = max(0, dropped_lines - shown.count(b"\n") - cut_line)
        remainder_only = cut_line and newline < 0 and (dropped_bytes == len(last) or not ended)
        if not shown and last and not last.endswith(b"\n") and not remainder_only:
            dropped_lines += 1  # an unfinished last line, dropped whole
        note = b"[output truncated: %d lines left out]\n" % dropped_lines
        log.write((b"\n" if cut_line else b"") + note + shown)


def main(argv: list[str]) -> int:
    script, exit_file, log_file, limit = argv[1], argv[2], argv[3], int(argv[4])
    if sys.stdin.readline().strip() != "go":
        record(exit_file, SKIPPED)
        return 125
    with open(os.devnull, "rb") as devnull, open(log_file, "ab", buffering=0) as log:
        process = subprocess.Popen(
            ["sh", f"./{script}"], stdin=devnull, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        assert process.stdout is not None
        copier = threading.Thread(target=copy, args=(process.stdout, log, limit), daemon=True)
        copier.start()
        code = process.wait()
        if code < 0:  # as a shell reports it
            code = 128 - code
        record(exit_file, str(code))
        copier.join(DRAIN_WAIT)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
