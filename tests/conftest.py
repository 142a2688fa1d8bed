"""Shared test helpers; the fixtures themselves come from connhex_edge_ota.testing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def dummy_log(tmp_path: Path) -> Path:
    """The file the dummy plugin (tests/plugins/dummy) writes its calls to."""
    return tmp_path / "dummy-calls.jsonl"


def read_calls(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]
