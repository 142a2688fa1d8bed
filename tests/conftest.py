"""Shared test helpers; the fixtures themselves come from connhex_edge_ota.testing."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from connhex_edge_ota.release import Release
from connhex_edge_ota.state import Journal, Offer
from connhex_edge_ota.store import Store
from connhex_edge_ota.testing import StatusWatcher


@pytest.fixture
def dummy_log(tmp_path: Path) -> Path:
    """The file the dummy plugin (tests/plugins/dummy) writes its calls to."""
    return tmp_path / "dummy-calls.jsonl"


@pytest.fixture(autouse=True)
def _reliability_case(
    request: pytest.FixtureRequest, record_property: Callable[[str, object], None]
) -> Iterator[None]:
    """For ``make reliability-report``: a reliability case's docstring says what it expects;
    unless the test says what it saw (``record_property("observed", …)``), what the agent
    published on NATS is the observation."""
    case = request.node.get_closest_marker("reliability") is not None
    if case:
        function = getattr(request.node, "function", None)
        doc = ((function.__doc__ if function else None) or "").strip()
        if doc:  # the first paragraph, which may wrap over several lines
            record_property("doc", " ".join(doc.split("\n\n")[0].split()))
    yield
    if not case or any(name == "observed" for name, _ in request.node.user_properties):
        return
    watcher = getattr(request.node, "funcargs", {}).get("statuses")
    if isinstance(watcher, StatusWatcher):
        record_property("observed", watcher.summary())


def offered_release(store: Store, offer: Offer | None) -> Release:
    """The release a check offered, placed in ``store`` as the service would place it."""
    assert offer is not None
    journal = Journal(store)
    journal.take_offer(offer)
    release = journal.release()
    assert release is not None
    return release


def read_calls(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    """Poll ``condition`` (a file appearing, a process gone) until true or ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)
