"""Maintenance windows: parsing, openings, and an install deferred until a window opens."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from connhex_maintenance_window import MaintenanceWindow, WindowError, load_schedule, parse_window
from hypothesis import given
from hypothesis import strategies as st

from connhex_edge_ota.config import ConfigError
from connhex_edge_ota.server import ReleaseServer
from connhex_edge_ota.testing import OtaAgent, StatusWatcher

ROME = ZoneInfo("Europe/Rome")


def schedule(*windows: str) -> MaintenanceWindow:
    plugin = MaintenanceWindow()
    plugin.schedule, _ = load_schedule({"windows": list(windows), "timezone": "Europe/Rome"})
    return plugin


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=ROME)


def test_weekday_window() -> None:
    plugin = schedule("Mon-Fri 02:00-04:00")
    assert plugin.veto(at("2026-11-30T03:00")) is None  # a Monday
    veto = plugin.veto(at("2026-11-28T03:00"))  # a Saturday
    assert veto == "outside the maintenance window; the next one opens Mon 2026-11-30 02:00:00 CET"


def test_window_past_midnight_and_wrapping_day_range() -> None:
    plugin = schedule("Fri-Mon 23:30-00:30")
    assert plugin.veto(at("2026-11-28T00:10")) is None  # Saturday, from Friday's window
    assert plugin.veto(at("2026-12-01T00:10")) is None  # Tuesday, from Monday's window
    assert plugin.veto(at("2026-12-02T00:10")) is not None  # Wednesday


def test_no_windows_never_vetoes() -> None:
    assert MaintenanceWindow().veto() is None


@pytest.mark.parametrize(
    "bad", ["Mon 02:00", "Someday 02:00-03:00", "Mon 25:00-26:00", "Mon 02:00-02:00"]
)
def test_bad_windows_are_refused(bad: str) -> None:
    with pytest.raises(WindowError):
        parse_window(bad)
    with pytest.raises(ConfigError, match=r"\[maintenance_window\] windows"):
        load_schedule({"windows": [bad]})


@given(
    st.datetimes(min_value=datetime(2025, 1, 1), max_value=datetime(2030, 1, 1)),
    st.sampled_from(["Mon-Fri 02:00-04:00", "daily 23:00-01:00", "Sun 12:00-12:00:01"]),
)
def test_next_opening_is_in_the_future_and_open(now: datetime, window: str) -> None:
    plugin = schedule(window)
    aware = now.replace(tzinfo=ROME)
    opening = plugin.schedule.next_opening(aware)
    assert opening is not None and opening > aware
    assert plugin.schedule.is_open(opening)


def test_install_deferred_outside_the_window_then_done_inside(
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
    statuses: StatusWatcher,
) -> None:
    opens = (datetime.now(ROME) + timedelta(seconds=3)).replace(microsecond=0)
    closes = opens + timedelta(hours=1)
    day = opens.strftime("%a")
    window = f"{day} {opens:%H:%M:%S}-{closes:%H:%M:%S}"
    release_server.releases.publish(make_release("2.0.0"))
    ota_agent(
        auto_install=True,
        plugins=["maintenance-window"],
        check_interval="1s",
        extra_tables={"maintenance_window": {"windows": [window], "timezone": "Europe/Rome"}},
    )
    vetoed = statuses.wait_for(lambda s: s.status == "update_ready" and s.error != "")
    assert vetoed.error.startswith(
        "install vetoed by maintenance-window: outside the maintenance window; the next one opens"
    )
    done = statuses.wait_updated("2.0.0")
    assert datetime.now(ROME) >= opens and done.error == ""


def test_daylight_saving_days() -> None:
    plugin = schedule("daily 02:00-04:00")
    # 2026-03-29: clocks jump from 02:00 to 03:00 in Rome; the window still opens at 03:xx.
    assert plugin.veto(datetime(2026, 3, 29, 3, 30, tzinfo=ROME)) is None
    assert plugin.veto(datetime(2026, 3, 29, 4, 30, tzinfo=ROME)) is not None
    # 2026-10-25: 02:00-03:00 happens twice; both are inside.
    assert plugin.veto(datetime(2026, 10, 25, 2, 30, fold=0, tzinfo=ROME)) is None
    assert plugin.veto(datetime(2026, 10, 25, 2, 30, fold=1, tzinfo=ROME)) is None
