"""Where log lines go and how they look: syslog priorities under systemd, time and level elsewhere.

Under systemd (``$JOURNAL_STREAM`` names the stream stderr is connected to) each
line starts with a ``<N>`` syslog priority, which journald turns into the
entry's priority (so ``journalctl -p err`` finds failures), and carries no
timestamp of its own: journald stamps it. Elsewhere a line reads
``2026-11-27 08:00:00,123 WARNING connhex_edge_ota.service: ...``.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LEVEL_ENV = "CONNHEX_OTA_LOG_LEVEL"
"""Environment variable giving the log level when ``--log-level`` is not given."""

_PRIORITIES = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}
READABLE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JournalFormatter(logging.Formatter):
    """``<priority>name: message``; every line of a multi-line record keeps the priority."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        priority = _priority(record.levelno)
        text = super().format(record)
        return "\n".join(f"<{priority}>{line}" for line in text.splitlines() or [""])


def _priority(levelno: int) -> int:
    for level in sorted(_PRIORITIES, reverse=True):
        if levelno >= level:
            return _PRIORITIES[level]
    return 7


def under_journal(stream: TextIO) -> bool:
    """Whether ``stream`` is the journal stream systemd announced in ``$JOURNAL_STREAM``.

    systemd sets ``JOURNAL_STREAM=<device>:<inode>`` for a service whose output
    goes to the journal; a child whose stderr was redirected elsewhere inherits
    the variable but not the stream, so both numbers are compared.
    """
    announced = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = announced.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        found = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (found.st_dev, found.st_ino) == (int(device), int(inode))


def resolve_level(given: str | None, default: str) -> str:
    """``--log-level`` when given, else ``$CONNHEX_OTA_LOG_LEVEL``, else ``default``.

    Raises ValueError naming the variable when it holds an unknown level.
    """
    if given:
        return given.upper()
    env = os.environ.get(LEVEL_ENV, "").strip().upper()
    if not env:
        return default
    if env not in LEVELS:
        raise ValueError(f"{LEVEL_ENV}={env!r}: expected one of {', '.join(LEVELS)}")
    return env


def setup_logging(level: str, stream: TextIO | None = None) -> None:
    """Send the program's log lines to ``stream`` (stderr) at ``level``, journal-aware."""
    out = stream if stream is not None else sys.stderr
    handler = _ProgramHandler(out)
    if under_journal(out):
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter(READABLE_FORMAT))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _ProgramHandler)]:
        root.removeHandler(old)  # called twice: replace ours, keep anyone else's
    root.addHandler(handler)
    root.setLevel(level)


class _ProgramHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler :func:`setup_logging` installs (and replaces when called again)."""


class WithoutStatuses(logging.Filter):
    """Drops the service's status lines where a console shows each status already."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not hasattr(record, "ota_status")


def hide_status_lines() -> None:
    """Keep the service's status lines out of the program's own log output."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, _ProgramHandler):
            handler.addFilter(WithoutStatuses())
