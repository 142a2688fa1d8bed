"""Installs only inside maintenance windows: a veto plugin for connhex-edge-ota.

Configured from the ``[maintenance_window]`` table of ``agent.toml``::

    [maintenance_window]
    windows = ["Mon-Fri 02:00-04:00", "Sat,Sun 01:00-06:00", "daily 23:30-00:30"]
    timezone = "Europe/Rome"   # default: the system's local time
    downloads = false          # true: gate downloads too

A window is ``DAYS START-END``: days are ``daily``, names (``Mon``) and ranges
(``Mon-Fri``, ``Fri-Mon``) separated by commas; times are ``HH:MM`` or
``HH:MM:SS``; an END before START runs past midnight. No windows: no veto.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from connhex_edge_ota import hookimpl
from connhex_edge_ota.config import ConfigError, plugin_table
from connhex_edge_ota.lifecycle import Agent
from connhex_edge_ota.release import Release

TABLE = "maintenance_window"
DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
_WINDOW = re.compile(
    r"^\s*(?P<days>[A-Za-z,\- ]+?)\s+(?P<start>\d{1,2}:\d{2}(?::\d{2})?)\s*-\s*"
    r"(?P<end>\d{1,2}:\d{2}(?::\d{2})?)\s*$"
)


class WindowError(ValueError):
    pass


@dataclass(frozen=True)
class Window:
    days: frozenset[int]
    """Weekdays the window starts on (Monday = 0)."""
    start: time
    end: time
    text: str

    def spans(self, day: date, zone: tzinfo) -> tuple[datetime, datetime] | None:
        """The window's opening on ``day`` as aware datetimes, if it opens that day."""
        if day.weekday() not in self.days:
            return None
        opens = datetime.combine(day, self.start, zone)
        closes = datetime.combine(day, self.end, zone)
        if closes <= opens:
            closes += timedelta(days=1)
        return opens, closes


def _day(token: str) -> int:
    key = token.strip().lower()[:3]
    if key not in DAYS:
        raise WindowError(f"unknown day {token.strip()!r}")
    return DAYS.index(key)


def _time(text: str) -> time:
    hour, minute, *rest = (int(p) for p in text.split(":"))
    try:
        return time(hour, minute, rest[0] if rest else 0)
    except ValueError:
        raise WindowError(f"invalid time {text!r}") from None


def parse_window(text: str) -> Window:
    match = _WINDOW.match(text)
    if not match:
        raise WindowError(f"{text!r} is not like 'Mon-Fri 02:00-04:00'")
    days: set[int] = set()
    for token in match.group("days").split(","):
        token = token.strip()
        if token.lower() in ("daily", "every day", "*"):
            days.update(range(7))
        elif "-" in token:
            first, last = (_day(t) for t in token.split("-", 1))
            span = (last - first) % 7
            days.update((first + i) % 7 for i in range(span + 1))
        else:
            days.add(_day(token))
    start, end = _time(match.group("start")), _time(match.group("end"))
    if start == end:
        raise WindowError(f"{text!r} is empty (start equals end)")
    return Window(frozenset(days), start, end, text.strip())


@dataclass(frozen=True)
class Schedule:
    windows: tuple[Window, ...]
    zone: tzinfo

    def is_open(self, now: datetime) -> bool:
        return any(o <= now < c for o, c in self._spans(now))

    def next_opening(self, now: datetime) -> datetime | None:
        upcoming = [o for o, _c in self._spans(now) if o > now]
        return min(upcoming) if upcoming else None

    def _spans(self, now: datetime) -> list[tuple[datetime, datetime]]:
        local = now.astimezone(self.zone).date()
        found = []
        for offset in range(-1, 8):
            for window in self.windows:
                span = window.spans(local + timedelta(days=offset), self.zone)
                if span:
                    found.append(span)
        return found


def load_schedule(table: dict[str, Any]) -> tuple[Schedule, bool]:
    unknown = set(table) - {"windows", "timezone", "downloads"}
    if unknown:
        raise ConfigError(f"config error: [{TABLE}] {sorted(unknown)[0]} is not a known key")
    windows = table.get("windows", [])
    if not isinstance(windows, list):
        raise ConfigError(f"config error: [{TABLE}] windows: expected a list of strings")
    try:
        parsed = tuple(parse_window(str(w)) for w in windows)
    except WindowError as exc:
        raise ConfigError(f"config error: [{TABLE}] windows: {exc}") from None
    zone_name = table.get("timezone")
    try:
        zone: tzinfo = ZoneInfo(zone_name) if zone_name else _local_zone()
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"config error: [{TABLE}] timezone = {zone_name!r}: unknown") from None
    return Schedule(parsed, zone), bool(table.get("downloads", False))


def _local_zone() -> tzinfo:
    zone = datetime.now().astimezone().tzinfo
    assert zone is not None
    return zone


class MaintenanceWindow:
    def __init__(self) -> None:
        self.schedule = Schedule((), _local_zone())
        self.gate_downloads = False

    @hookimpl
    def agent_configure(self, agent: Agent) -> None:
        self.schedule, self.gate_downloads = load_schedule(plugin_table(agent.config_path, TABLE))

    def veto(self, now: datetime | None = None) -> str | None:
        if not self.schedule.windows:
            return None
        now = now or datetime.now(self.schedule.zone)
        if self.schedule.is_open(now):
            return None
        opening = self.schedule.next_opening(now)
        when = opening.strftime("%a %Y-%m-%d %H:%M:%S %Z") if opening else "never"
        return f"outside the maintenance window; the next one opens {when}"

    @hookimpl
    def ota_pre_install(self, release: Release) -> str | None:
        return self.veto()

    @hookimpl
    def ota_pre_download(self, release: Release) -> str | None:
        return self.veto() if self.gate_downloads else None


plugin = MaintenanceWindow()
