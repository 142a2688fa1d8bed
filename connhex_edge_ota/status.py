"""The status the addon reports on ``heartbeat.ota.service``: names and the five-key payload."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

HEARTBEAT_SUBJECT = "heartbeat.ota.service"
ERROR_LIMIT = 500
"""Longest ``error`` text: enough for a reason and the last lines of a script."""


class StatusName(StrEnum):
    CHECKING = "checking"
    CHECK_FAILED = "check_failed"
    DOWNLOADING = "downloading"
    DOWNLOAD_FAILED = "download_failed"
    UPDATE_AVAILABLE = "update_available"
    UPDATE_READY = "update_ready"
    UPDATING = "updating"
    UPDATE_FAILED = "update_failed"
    UPDATED = "updated"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Status:
    """One status message; the attributes are the payload keys, exactly."""

    current_version: str = ""
    latest_version: str = ""
    status: str = ""
    error: str = ""
    last_checked: str = ""
    at: float = field(default_factory=time.time, compare=False, repr=False, kw_only=True)
    """When this status was reported (Unix time); not a payload key."""

    def payload(self) -> dict[str, str]:
        return {key: getattr(self, key) for key in PAYLOAD_KEYS}

    def to_json(self) -> bytes:
        return json.dumps(self.payload()).encode()

    @classmethod
    def from_payload(cls, data: dict[str, Any]) -> Status:
        current, latest, status, error, checked = (str(data.get(k, "")) for k in PAYLOAD_KEYS)
        return cls(current, latest, status, error, checked)


PAYLOAD_KEYS = ("current_version", "latest_version", "status", "error", "last_checked")


def rfc3339_now() -> str:
    """The current UTC time as RFC 3339, to the second: ``2026-11-27T01:02:03Z``."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def short_error(text: str) -> str:
    """``text`` on one line, cut to ERROR_LIMIT characters (keeping its end, where causes are)."""
    flat = " | ".join(line.strip() for line in text.strip().splitlines() if line.strip())
    return flat if len(flat) <= ERROR_LIMIT else "…" + flat[-(ERROR_LIMIT - 1) :]
