"""state.json written atomically; a corrupt one set aside; one process at a time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from connhex_edge_ota.state import Journal, Offer, State, load_state
from connhex_edge_ota.store import Busy, Store, start_writeback, write_atomic


def test_save_then_load_round_trips(tmp_path: Path) -> None:
    store = Store(tmp_path / "ota")
    journal = Journal(store)
    journal.open()
    state = State(current_version="1.0.0", offer=Offer(version="2", size=3, digest="d"))
    journal.state = state
    journal.save()
    loaded, warning = load_state(store)
    assert warning == "" and loaded == state
    assert not list(store.root.glob(".*.tmp"))  # no temp file left behind


def test_atomic_write_keeps_the_old_file_when_the_new_cannot_be_written(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_text("old")
    with pytest.raises(TypeError):
        write_atomic(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temp file left


@pytest.mark.parametrize("content", [b"", b"{", b'{"current_version": 5}', b"\x00\xff garbage"])
def test_corrupt_state_is_moved_aside_and_reported_once(tmp_path: Path, content: bytes) -> None:
    store = Store(tmp_path / "ota")
    store.create()
    store.state_file.write_bytes(content)
    state, warning = load_state(store)
    assert state == State()
    assert "corrupt" in warning
    aside = list(store.root.glob("state.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == content
    assert load_state(store) == (State(), "")  # the next start is clean: reported once


def test_second_process_gets_a_clear_busy(tmp_path: Path) -> None:
    store = Store(tmp_path / "ota")
    store.lock()
    code = (
        "import sys; from pathlib import Path; from connhex_edge_ota.store import Store, Busy\n"
        f"try:\n    Store(Path({str(store.root)!r})).lock()\n"
        "except Busy as e:\n    print(e); sys.exit(3)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 3
    assert result.stdout.startswith("busy: the store") and "pid" in result.stdout
    store.unlock()
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0


def test_busy_inside_one_process_too(tmp_path: Path) -> None:
    first, second = Store(tmp_path / "ota"), Store(tmp_path / "ota")
    first.lock()
    with pytest.raises(Busy):
        second.lock()
    first.unlock()


def test_paths_refuse_unsafe_versions(tmp_path: Path) -> None:
    store = Store(tmp_path / "ota")
    with pytest.raises(ValueError, match="separator"):
        store.zip_path("../../etc/passwd")
    assert store.zip_path("1.2.3") == store.downloads / "1.2.3.zip"
    assert json.loads(State().model_dump_json())["schema_version"] == 1


def test_concurrent_saves_never_corrupt_the_file(tmp_path: Path) -> None:
    import threading

    store = Store(tmp_path / "ota")
    store.create()

    def hammer(version: str) -> None:
        journal = Journal(store)  # one writer each, as separate processes would be
        journal.state = State(current_version=version, error="x" * 2000)
        for _ in range(200):
            journal.save()

    threads = [threading.Thread(target=hammer, args=(str(i),)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    state, warning = load_state(store)
    assert warning == "" and state.current_version in {"0", "1", "2", "3"}
    assert not list(store.root.glob(".*.tmp"))


def test_early_writeback_is_a_hint_that_never_fails(tmp_path: Path) -> None:
    """sync_file_range only starts writing: on a file it leaves the data as it was, and
    where it cannot work (a pipe, a closed descriptor) it is ignored, never raised."""
    path = tmp_path / "data"
    path.write_bytes(b"x" * 3_000_000)
    with path.open("r+b") as file:
        start_writeback(file.fileno(), 0, 3_000_000)
        start_writeback(file.fileno(), 2**62, 1)
    assert path.read_bytes() == b"x" * 3_000_000
    read, write = os.pipe()
    start_writeback(write, 0, 10)
    os.close(read)
    os.close(write)
    start_writeback(write, 0, 10)  # closed
