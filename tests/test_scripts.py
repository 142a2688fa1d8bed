"""The script runner on its own: exit codes, signals, bounded logs, pruning."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connhex_edge_ota import script_wrapper, scripts
from connhex_edge_ota.scripts import prune_logs, run_script


async def _started(pgid: int, ticks: int) -> None:
    assert pgid > 1 and ticks > 0


def run(tmp_path: Path, body: str, timeout: float = 10) -> scripts.ScriptResult:
    (tmp_path / "update.sh").write_text(body)
    return asyncio.run(
        run_script(
            "update.sh",
            tmp_path,
            {"PATH": scripts.SAFE_PATH},
            timeout,
            tmp_path / "out.log",
            exit_file=tmp_path / "exit",
            on_start=_started,
        )
    )


def test_exit_codes_and_the_recorded_status(tmp_path: Path) -> None:
    assert run(tmp_path, "exit 0\n").ok
    result = run(tmp_path, "exit 10\n")
    assert result.ok and result.restart
    assert (tmp_path / "exit").read_text().strip() == "10"
    failed = run(tmp_path, "echo one\necho two\nexit 7\n")
    assert not failed.ok and failed.describe() == "update.sh exited with 7: one | two"


def test_a_signal_is_a_failure(tmp_path: Path) -> None:
    result = run(tmp_path, "kill -9 $$\n")
    assert not result.ok
    # The wrapper shell reports its child's death by signal as 128 + 9.
    assert result.code == 137 or result.signal == 9


def test_output_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scripts, "LOG_LIMIT", 10_000)
    run(tmp_path, "i=0; while [ $i -lt 2000 ]; do echo line-$i; i=$((i+1)); done\n")
    log = (tmp_path / "out.log").read_bytes()
    assert len(log) < 10_200 and log.endswith(b"line-1998\nline-1999\n")  # the end is kept
    kept = log.split(b"[output truncated: ")[0].count(b"\n")
    left_out = int(log.split(b"[output truncated: ")[1].split(b" lines")[0])
    last = log.split(b" lines left out]\n")[1].count(b"\n")
    assert kept - 1 + left_out + last == 2000  # "--- update.sh" heads the log


def test_old_logs_are_pruned(tmp_path: Path) -> None:
    for i in range(5):
        path = tmp_path / f"{i}.log"
        path.write_text("x")
        os.utime(path, (time.time() + i, time.time() + i))
    prune_logs(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.glob("*.log")) == ["3.log", "4.log"]


def test_the_agent_log_shows_the_first_and_last_lines_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="connhex_edge_ota.scripts")
    result = run(tmp_path, "i=0; while [ $i -lt 20000 ]; do echo line-$i; i=$((i+1)); done\n")
    shown = [r.getMessage() for r in caplog.records if r.name == "connhex_edge_ota.scripts"]
    first, last = scripts.ECHO_FIRST, scripts.ECHO_LAST
    assert shown[:first] == [f"update.sh: line-{i}" for i in range(first)]
    left_out = 20000 - first - last
    assert shown[first].startswith(f"update.sh: [{left_out} lines of output left out here; ")
    assert shown[first + 1 :] == [f"update.sh: line-{i}" for i in range(20000 - last, 20000)]
    assert result.tail == [f"line-{i}" for i in range(19995, 20000)]
    log = (tmp_path / "out.log").read_text()
    assert "line-0\n" in log and "line-19999\n" in log  # the script log keeps it all (< 1 MiB)


def test_a_short_output_is_shown_whole_and_a_line_without_newline_too(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="connhex_edge_ota.scripts")
    result = run(tmp_path, "echo one\necho\necho two\nprintf three\nexit 4\n")
    shown = [r.getMessage() for r in caplog.records if r.name == "connhex_edge_ota.scripts"]
    assert shown == ["update.sh: one", "update.sh: two", "update.sh: three"]
    assert result.describe() == "update.sh exited with 4: one | two | three"


class _Trickle:
    """A pipe that gives what a read asks for in pieces of the sizes a test chooses."""

    def __init__(self, data: bytes, pieces: list[int]) -> None:
        self.data, self.pos, self.pieces = data, 0, pieces or [1]

    def read1(self, size: int) -> bytes:
        take = min(size, self.pieces[self.pos % len(self.pieces)])
        out = self.data[self.pos : self.pos + take]
        self.pos += len(out)
        return out


@given(
    lines=st.lists(st.integers(0, 150), max_size=300),
    final_newline=st.booleans(),
    limit=st.integers(200, 6000),
    pieces=st.lists(st.integers(1, 5000), min_size=1, max_size=8),
)
@settings(max_examples=300, deadline=None)
def test_the_wrapper_keeps_whole_lines_and_counts_what_it_drops(
    lines: list[int], final_newline: bool, limit: int, pieces: list[int]
) -> None:
    """Whatever the reads: kept lines + counted lines + last lines == the output's lines."""
    data = b"\n".join(b"x" * n for n in lines) + (b"\n" if final_newline and lines else b"")
    out = io.BytesIO()
    script_wrapper.copy(_Trickle(data, pieces), out, limit)  # type: ignore[arg-type]
    log = out.getvalue()

    def count(text: bytes) -> int:
        return text.count(b"\n") + (1 if text and not text.endswith(b"\n") else 0)

    if b"[output truncated: " not in log:
        assert log == data
        return
    kept, rest = log.split(b"[output truncated: ", 1)
    left_out, last = rest.split(b" lines left out]\n", 1)
    assert (not kept or kept.endswith(b"\n")) and data.endswith(last)
    assert count(kept) + int(left_out) + count(last) == count(data)
    assert len(log) <= limit + 64
