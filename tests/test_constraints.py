"""Min-Version / Max-Version: parsing, ordering, and the service refusing what they exclude."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connhex_edge_ota import constraints
from connhex_edge_ota.constraints import SemVer, refusal
from connhex_edge_ota.server import ReleaseServer
from connhex_edge_ota.testing import OtaAgent, StatusWatcher


def test_semver_precedence_follows_semver_org() -> None:
    order = [
        "1.0.0-alpha",
        "1.0.0-alpha.1",
        "1.0.0-alpha.beta",
        "1.0.0-beta",
        "1.0.0-beta.2",
        "1.0.0-beta.11",
        "1.0.0-rc.1",
        "1.0.0",
        "1.0.1",
        "1.2.0",
        "1.10.0",
        "2.0.0",
    ]
    parsed = [SemVer.parse(v) for v in order]
    assert all(p is not None for p in parsed)
    assert parsed == sorted(parsed)  # type: ignore[type-var]
    assert SemVer.parse("1.0.0+build.7") == SemVer.parse("1.0.0")
    for bad in ("1.0", "01.0.0", "1.0.0-", "latest", ""):
        assert SemVer.parse(bad) is None


@given(
    st.tuples(st.integers(0, 999), st.integers(0, 999), st.integers(0, 999)),
    st.tuples(st.integers(0, 999), st.integers(0, 999), st.integers(0, 999)),
)
def test_semver_cores_order_as_numbers(a: tuple[int, int, int], b: tuple[int, int, int]) -> None:
    left, right = SemVer.parse(".".join(map(str, a))), SemVer.parse(".".join(map(str, b)))
    assert left is not None and right is not None
    assert (left < right) == (a < b)


def test_minimum_is_inclusive_and_maximum_exclusive() -> None:
    assert refusal("1.4.0", "1.0.3", "1.2.0", "") == (
        "1.4.0 requires an installed version >= 1.2.0; this device runs 1.0.3"
    )
    assert refusal("1.4.0", "1.2.0", "1.2.0", "") == ""
    assert refusal("1.4.0", "2.0.0", "", "2.0.0") == (
        "1.4.0 requires an installed version < 2.0.0; this device runs 2.0.0"
    )
    assert refusal("1.4.0", "1.9.9", "1.2.0", "2.0.0") == ""
    assert refusal("1.4.0", "1.2.0-rc.1", "1.2.0", "") != ""  # a prerelease is below
    assert refusal("1.4.0", "1.0.3", "", "") == ""


def test_pep440_versions_are_compared_when_not_all_are_semver() -> None:
    assert refusal("2024.5", "2024.1.post1", "2024.2", "") == (
        "2024.5 requires an installed version >= 2024.2; this device runs 2024.1.post1"
    )
    assert refusal("2.0", "1.10", "1.9", "") == ""  # 1.10 > 1.9: numbers, not text
    assert refusal("2.0", "1.0rc1", "1.0", "") != ""


def test_versions_that_do_not_parse_leave_the_constraint_unenforced_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    constraints._reported.clear()
    with caplog.at_level(logging.WARNING, logger="connhex_edge_ota.constraints"):
        for _ in range(3):
            assert refusal("1.4.0", "1.0.3", "banana", "") == ""
            assert refusal("1.4.0", "build-77", "1.2.0", "") == ""
            assert refusal("1.4.0", "", "1.2.0", "") == ""
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert "not enforced" in lines[0] and "'banana'" in lines[0]


def test_the_service_neither_downloads_nor_installs_an_excluded_release(
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
    statuses: StatusWatcher,
    tmp_path: Path,
) -> None:
    runs = tmp_path / "update-runs"
    release_server.releases.publish(make_release("1.4.0", update_sh=f"echo run >> {runs}\n"))
    release_server.releases.headers["Min-Version"] = "1.2.0"
    ota_agent(initial_version="1.0.3", auto_install=True)
    expected = "1.4.0 requires an installed version >= 1.2.0; this device runs 1.0.3"
    blocked = statuses.wait_status("update_available")
    assert blocked.error == expected and blocked.latest_version == "1.4.0"
    reply = statuses.request("install")
    assert reply["ok"] is False and reply["error"] == expected
    assert reply["status"]["status"] == "update_available"
    reply = statuses.request("download")
    assert reply["ok"] is False and reply["error"] == expected
    assert [r.method for r in release_server.releases.requests if r.method == "GET"] == []
    assert not runs.exists()
    # The same release with a range this device is in installs.
    release_server.releases.headers.update({"Min-Version": "1.0.0", "Max-Version": "1.4.0"})
    mark = statuses.mark()
    assert statuses.request("check")["status"]["error"] == ""  # the offer is as last checked
    assert statuses.request("install")["ok"] is True
    statuses.wait_updated("1.4.0", after=mark)
    assert runs.read_text() == "run\n"


def test_an_unparseable_constraint_is_not_enforced_and_logged(
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
    statuses: StatusWatcher,
) -> None:
    release_server.releases.publish(make_release("1.4.0"))
    release_server.releases.headers["Max-Version"] = "the next big one"
    agent = ota_agent(initial_version="1.0.3", auto_install=True)
    statuses.wait_updated("1.4.0")
    agent.stop()
    assert agent.output().count("not enforced") == 1
