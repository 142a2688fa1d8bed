"""Go-style durations: parse, format, and their round trip."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connhex_edge_ota.duration import format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("24h0m0s", 86400.0),
        ("1h30m", 5400.0),
        ("90s", 90.0),
        ("500ms", 0.5),
        ("1.5h", 5400.0),
        ("2m3.5s", 123.5),
        ("100us", 1e-4),
        ("0", 0.0),
        ("90", 90.0),
        (90, 90.0),
        (0.25, 0.25),
    ],
)
def test_parses_go_durations_and_numbers(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "bad", ["", "soon", "1d", "h", "10 s", "-5s", -1, True, None, "1h-30m", float("nan"), "inf"]
)
def test_refuses_what_is_not_a_duration(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


@given(hours=st.integers(0, 1000), minutes=st.integers(0, 59), millis=st.integers(0, 59_999))
def test_format_then_parse_round_trips(hours: int, minutes: int, millis: int) -> None:
    seconds = hours * 3600 + minutes * 60 + millis / 1000
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, abs=1e-6)


@given(
    st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from(["h", "m", "s", "ms"])), min_size=1)
)
def test_parts_add_up(parts: list[tuple[int, str]]) -> None:
    unit = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    text = "".join(f"{n}{u}" for n, u in parts)
    assert math.isclose(parse_duration(text), sum(n * unit[u] for n, u in parts), abs_tol=1e-9)
