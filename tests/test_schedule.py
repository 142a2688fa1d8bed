"""Check scheduling: a stable phase per device, capped full-jitter backoff after failures."""

from __future__ import annotations

import itertools
import math
import random
import time
from collections.abc import Callable

from hypothesis import given
from hypothesis import strategies as st

from connhex_edge_ota.config import load_settings
from connhex_edge_ota.schedule import Schedule, phase_of
from connhex_edge_ota.testing import OtaAgent, StatusWatcher

durations = st.floats(min_value=0.1, max_value=7 * 86400)
phases = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)
wall_clocks = st.floats(min_value=0.0, max_value=4e9)


def offset_from_phase(moment: float, schedule: Schedule) -> float:
    """How far ``moment`` is from the device's phase, in seconds (0 when on it)."""
    off = (moment - schedule.phase * schedule.interval) % schedule.interval
    return min(off, schedule.interval - off)


@given(init_id=st.text(min_size=1))
def test_the_phase_is_a_stable_fraction_of_the_init_id(init_id: str) -> None:
    assert 0.0 <= phase_of(init_id) < 1.0
    assert phase_of(init_id) == phase_of(init_id)


def test_phases_spread_a_fleet_evenly() -> None:
    counts = [0] * 10
    for n in range(2000):
        counts[int(phase_of(f"device-{n:04d}") * 10)] += 1
    # Each tenth expects 200; a uniform draw stays within +-25 % with overwhelming odds.
    assert all(150 <= count <= 250 for count in counts), counts


def test_the_phase_comes_from_the_settings_init_id() -> None:
    settings = load_settings(
        None, init_id="a1b2c3", check_interval="1h", retry_floor="30s", startup_delay="7s"
    )
    schedule = Schedule.for_device(settings)
    assert schedule.phase == phase_of("a1b2c3")
    assert (schedule.interval, schedule.floor, schedule.startup_delay) == (3600.0, 30.0, 7.0)


@given(phase=phases, startup=st.floats(0, 3600), interval=durations)
def test_the_first_check_comes_at_the_phase_of_the_startup_delay(
    phase: float, startup: float, interval: float
) -> None:
    schedule = Schedule(interval, 0.0, 30.0, phase=phase, startup_delay=startup)
    assert schedule.first() == min(phase * startup, interval)
    assert 0.0 <= schedule.first() <= min(startup, interval)


@given(interval=durations, floor=st.floats(0.01, 600), phase=phases, now=wall_clocks)
def test_success_returns_to_the_device_phase(
    interval: float, floor: float, phase: float, now: float
) -> None:
    schedule = Schedule(interval, 0.0, floor, phase=phase, clock=lambda: now)
    delay = schedule.after_success()
    gap = min(floor, interval / 2)
    tolerance = 1e-4
    assert gap - tolerance <= delay <= interval + gap + tolerance
    assert offset_from_phase(now + delay, schedule) <= tolerance


@given(
    interval=durations,
    jitter=st.floats(0, 3600),
    phase=phases,
    now=wall_clocks,
    seed=st.integers(),
)
def test_success_jitter_is_at_most_ten_percent_after_the_phase(
    interval: float, jitter: float, phase: float, now: float, seed: int
) -> None:
    schedule = Schedule(interval, jitter, 30.0, phase=phase, clock=lambda: now)
    schedule.rng = random.Random(seed)
    plain = Schedule(interval, 0.0, 30.0, phase=phase, clock=lambda: now).after_success()
    delay = schedule.after_success()
    tolerance = 1e-4
    assert plain - tolerance <= delay <= plain + min(jitter, interval * 0.1) + tolerance


def test_a_steady_device_checks_every_interval_on_its_phase() -> None:
    now = [1_800_000_123.0]
    schedule = Schedule(3600.0, 0.0, 30.0, phase=0.25, clock=lambda: now[0])
    now[0] += schedule.after_success()
    moments = []
    for _ in range(5):
        moments.append(now[0])
        now[0] += 2.0  # the check itself takes a moment
        now[0] += schedule.after_success()
    assert [b - a for a, b in itertools.pairwise(moments)] == [3600.0] * 4
    assert all(offset_from_phase(m, schedule) < 1e-6 for m in moments)


@given(
    phase=phases,
    failures=st.integers(1, 20),
    start=st.floats(0, 86400),
    seed=st.integers(),
)
def test_after_an_outage_a_device_is_back_on_its_phase(
    phase: float, failures: int, start: float, seed: int
) -> None:
    now = [1_800_000_000.0 + start]
    schedule = Schedule(3600.0, 0.0, 30.0, phase=phase, clock=lambda: now[0])
    schedule.rng = random.Random(seed)
    for _ in range(failures):
        now[0] += schedule.after_failure()
    now[0] += schedule.after_success()
    assert offset_from_phase(now[0], schedule) < 1e-5


@given(
    interval=durations,
    floor=st.floats(0.01, 600),
    failures=st.integers(1, 80),
    retry_after=st.none() | st.floats(0, 10 * 86400),
    seed=st.integers(),
)
def test_failures_back_off_between_floor_and_interval(
    interval: float, floor: float, failures: int, retry_after: float | None, seed: int
) -> None:
    schedule = Schedule(interval, 0.0, floor, rng=random.Random(seed))
    for _ in range(failures):
        delay = schedule.after_failure(retry_after)
        assert min(floor, interval) - 1e-9 <= delay <= interval + 1e-9
        if retry_after is not None:
            assert delay >= min(retry_after, interval) - 1e-9


def test_backoff_grows_then_resets_after_success() -> None:
    schedule = Schedule(3600.0, 0.0, 30.0, rng=random.Random(1))
    ceilings = []
    delays = []
    for _ in range(10):
        delays.append(schedule.after_failure())
        ceilings.append(min(3600.0, 30.0 * 2**schedule.failures))
    assert ceilings[0] == 60.0 and ceilings[-1] == 3600.0
    assert all(30.0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert max(delays[5:]) > 60.0  # it does grow past the first ceiling
    schedule.after_success()
    assert schedule.failures == 0


def test_permanent_failures_wait_the_whole_interval() -> None:
    schedule = Schedule(3600.0, 0.0, 30.0)
    assert schedule.after_failure(permanent=True) == 3600.0


@given(now=st.floats(0, 4e9), interval=durations, phase=phases)
def test_the_next_moment_is_strictly_later_and_at_most_an_interval_away(
    now: float, interval: float, phase: float
) -> None:
    schedule = Schedule(interval, 0.0, 1.0, phase=phase)
    moment = schedule.next_moment(now)
    assert now < moment <= now + interval * (1 + 1e-9) + 1e-6
    assert not math.isnan(moment)


def test_the_agent_waits_its_phase_of_the_startup_delay_before_the_first_check(
    ota_agent: Callable[..., OtaAgent], statuses: StatusWatcher
) -> None:
    delay = phase_of("test-device") * 2.0  # the fixture's init_id: about 1.1 s
    assert delay > 0.5
    started = time.monotonic()
    ota_agent(startup_delay="2s")
    statuses.wait_status("checking")
    assert time.monotonic() - started >= delay - 0.05
