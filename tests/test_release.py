"""Versions from the network never become paths unchecked."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connhex_edge_ota.release import UnsafeVersionError, check_version


@pytest.mark.parametrize("good", ["1.2.3", "v2", "2026.11.27-rc1", "1.0.0+build.5", "a b"])
def test_ordinary_versions_pass(good: str) -> None:
    assert check_version(good) == good


@pytest.mark.parametrize(
    "bad", ["", "../../x", "1/2", "..", "a\\b", "1\x00", "1.0\n", "x" * 129, "\x7f"]
)
def test_unsafe_versions_are_refused(bad: str) -> None:
    with pytest.raises(UnsafeVersionError):
        check_version(bad)


@given(st.text(min_size=1, max_size=128))
def test_an_accepted_version_is_one_plain_file_name(text: str) -> None:
    try:
        check_version(text)
    except UnsafeVersionError:
        return
    assert "/" not in text and ".." not in text and all(ord(c) >= 32 for c in text)
