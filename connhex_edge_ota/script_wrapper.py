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
    last = bytearray()
    while chunk := source.read1(64 * 1024):  # type: ignore[attr-defined]
        if not dropping:
            if len(chunk) <= room:
                log.write(chunk)
                room -= len(chunk)
                continue
            cut = chunk.rfind(b"\n", 0, room) + 1  # whole lines only
            log.write(chunk[:cut])
            chunk = chunk[cut:]
            dropping = True
        dropped_lines += chunk.count(b"\n")
        last += chunk
        del last[: max(0, len(last) - keep_last)]
    if dropping:
        start = last.find(b"\n") + 1 if len(last) >= keep_last else 0
        shown = bytes(last[start:])
        dropped_lines -= shown.count(b"\n")
        log.write(b"[output truncated: %d lines left out]\n" % dropped_lines + shown)


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
