"""Check scheduling: jitter after success, capped full-jitter backoff after failures."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from connhex_edge_ota.schedule import Schedule

durations = st.floats(min_value=0.1, max_value=7 * 86400)


@given(interval=durations, jitter=st.floats(0, 3600), seed=st.integers())
def test_success_waits_the_interval_plus_at_most_ten_percent(
    interval: float, jitter: float, seed: int
) -> None:
    schedule = Schedule(interval, jitter, 30.0, random.Random(seed))
    delay = schedule.after_success()
    assert interval <= delay <= interval + min(jitter, interval * 0.1) + 1e-9


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
    schedule = Schedule(interval, 0.0, floor, random.Random(seed))
    for _ in range(failures):
        delay = schedule.after_failure(retry_after)
        assert min(floor, interval) - 1e-9 <= delay <= interval + 1e-9
        if retry_after is not None:
            assert delay >= min(retry_after, interval) - 1e-9


def test_backoff_grows_then_resets_after_success() -> None:
    schedule = Schedule(3600.0, 0.0, 30.0, random.Random(1))
    ceilings = []
    for _ in range(10):
        schedule.after_failure()
        ceilings.append(min(3600.0, 30.0 * 2**schedule.failures))
    assert ceilings[0] == 60.0 and ceilings[-1] == 3600.0
    schedule.after_success()
    assert schedule.failures == 0


def test_permanent_failures_wait_the_whole_interval() -> None:
    schedule = Schedule(3600.0, 0.0, 30.0)
    assert schedule.after_failure(permanent=True) == 3600.0
