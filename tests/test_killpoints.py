"""The kill-point matrix: ``kill -9`` of the real service at every named point, then a restart.

Each row starts the service with ``CONNHEX_OTA_TEST_KILL_POINT`` naming the
point where it kills itself (see :mod:`connhex_edge_ota.killpoints`), waits for
it to die, starts it again without the hook, and checks what followed against
the table: the final status and version, which scripts ran and how often,
``state.json`` readable with no install left open, ``current/`` whole, and the
daemon of the running release (1.0.0) alive and its ``rollback.sh`` never run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from connhex_edge_ota import killpoints
from connhex_edge_ota.server import ReleaseServer
from connhex_edge_ota.state import load_state
from connhex_edge_ota.store import Store
from connhex_edge_ota.testing import OtaAgent, StatusWatcher
from tests.conftest import read_calls

pytestmark = pytest.mark.reliability

MIB = 1024 * 1024


@dataclass(frozen=True)
class Row:
    point: str
    """Where the first run kills itself (``name`` or ``name@n``)."""
    final: str
    """``updated`` (to 2.0.0) or ``update_failed`` (still 1.0.0)."""
    updates: int
    """Runs of the new update.sh, both processes together."""
    rollbacks: int = 0
    """Runs of the new rollback.sh (started, even if killed)."""
    error: str = ""
    """Text the final error holds."""
    failing: bool = False
    """update.sh exits 3, so that rollback.sh runs."""
    slow: str = ""
    """The script (update/rollback) that sleeps on its first run, to be found running."""
    health_asks: int | None = None
    """Calls of ota_post_install, both processes together (None: not checked)."""
    fetched: float | None = None
    """Bytes of GET bodies, in releases, both processes together (None: not checked)."""

    @property
    def expected(self) -> str:
        version = "2.0.0" if self.final == "updated" else "1.0.0"
        parts = [f"{self.final} on {version}", f"update.sh x{self.updates}"]
        parts.append(f"rollback.sh x{self.rollbacks}")
        if self.health_asks is not None:
            parts.append(f"health asked x{self.health_asks}")
        if self.fetched is not None:
            parts.append(f"release fetched x{self.fetched:g}")
        if self.error:
            parts.append(f"error has {self.error!r}")
        return ", ".join(parts)


OK = "updated"
FAILED = "update_failed"
ROWS = [
    Row("download_started", OK, 1, health_asks=1),
    Row("download_checkpoint@1", OK, 1),
    Row("download_checkpoint@2", OK, 1),
    Row("download_verified", OK, 1, fetched=1),
    Row("download_renamed", OK, 1, fetched=1),
    Row("install_recorded", OK, 1),
    Row("unpack_member@2", OK, 1),
    Row("unpack_staged", OK, 1),
    Row("unpack_swapped", OK, 1),
    Row("install_unpacked", OK, 1),
    Row("script_recorded", OK, 1, health_asks=1),
    Row("script_running", FAILED, 1, 1, "interrupted; rolled back", slow="update"),
    Row("script_output", FAILED, 1, 1, "interrupted; rolled back", slow="update"),
    Row("script_exited", OK, 1, health_asks=1),
    Row("script_exit_recorded", OK, 1, health_asks=1),
    Row("health_checking", OK, 1, health_asks=1),
    Row("health_asked", OK, 1, health_asks=2),
    Row("health_recorded", OK, 1, health_asks=1),
    Row("install_finishing", OK, 1, health_asks=1),
    Row("install_finished", OK, 1, health_asks=1),
    Row("rollback_recorded", FAILED, 1, 1, "exited with 3: half; rolled back", failing=True),
    Row(
        "rollback_running",
        FAILED,
        1,
        2,
        "rollback interrupted, run again; rolled back",
        failing=True,
        slow="rollback",
    ),
    Row(
        "rollback_output",
        FAILED,
        1,
        2,
        "rollback interrupted, run again; rolled back",
        failing=True,
        slow="rollback",
    ),
    Row("rollback_exited", FAILED, 1, 1, "exited with 3: half; rolled back", failing=True),
    Row("install_finishing", FAILED, 1, 1, "rolled back", failing=True),
    Row("install_finished", FAILED, 1, 1, "rolled back", failing=True),
]


def test_every_kill_point_is_in_the_matrix() -> None:
    """The matrix has a row for every kill point the service defines, and none for unknown ones."""
    covered = {row.point.partition("@")[0] for row in ROWS}
    assert covered == set(killpoints.POINTS)


@pytest.fixture
def old_release(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    """Release 1.0.0 as installed before the test: its folder and a daemon it started."""
    current = tmp_path / "opt-connhex" / ".store" / "ota" / "current"
    current.mkdir(parents=True)
    marks = tmp_path / "marks"
    (current / "update.sh").write_text("true\n")
    (current / "rollback.sh").write_text(f'echo old-rollback >> "{marks}"\n')
    daemon = subprocess.Popen(["sleep", "600"], start_new_session=True)
    yield current, daemon
    daemon.kill()
    daemon.wait()


def new_release(tmp_path: Path, row: Row, make_release: Callable[..., Path]) -> Path:
    marks, slow = tmp_path / "marks", tmp_path / "slow-once"
    big = row.point.startswith("download")
    if row.slow:
        slow.write_text("")
    nap = f'if [ -f "{slow}" ]; then rm -f "{slow}"; sleep 60; fi\n'
    update = f'echo update >> "{marks}"\necho half\n'
    update += nap if row.slow == "update" else ""
    update += "exit 3\n" if row.failing else "echo done\n"
    rollback = f'echo new-rollback >> "{marks}"\necho undoing\n'
    rollback += nap if row.slow == "rollback" else ""
    return make_release(
        "2.0.0",
        update_sh=update,
        rollback_sh=rollback,
        # Two download checkpoints (every 4 MiB) where the row is about the download.
        files={"payload.bin": os.urandom(9 * MIB if big else 64 * 1024), "etc/conf": b"x=1\n"},
    )


def runs(tmp_path: Path, what: str) -> int:
    marks = tmp_path / "marks"
    return marks.read_text().split().count(what) if marks.exists() else 0


@pytest.mark.parametrize("row", ROWS, ids=[f"{r.point}-{r.final}" for r in ROWS])
def test_kill_9_at_each_point_then_restart(
    row: Row,
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
    statuses: StatusWatcher,
    old_release: tuple[Path, subprocess.Popen[bytes]],
    dummy_log: Path,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    record_property("expected", row.expected)
    zip_path = new_release(tmp_path, row, make_release)
    release_server.releases.publish(zip_path)
    env = {"CONNHEX_DUMMY_LOG": str(dummy_log)}
    keys = {"checkpoint_bytes": 4 * MIB}  # two checkpoints in the download rows
    first = ota_agent(
        auto_install=True, plugins=["dummy-veto"], env={**env, killpoints.ENV: row.point}, **keys
    )
    assert first.process is not None
    assert first.process.wait(60) == -signal.SIGKILL, first.output()[-2000:]

    mark = statuses.mark()
    second = ota_agent(auto_install=True, plugins=["dummy-veto"], env=env, **keys)
    if row.final == OK:
        final = statuses.wait_updated("2.0.0", after=mark, timeout=60)
    else:
        final = statuses.wait_status(FAILED, after=mark, timeout=60)
    second.stop()

    health = sum(1 for call in read_calls(dummy_log) if call["hook"] == "ota_post_install")
    observed = (
        f"{final.status} on {final.current_version}, update.sh x{runs(tmp_path, 'update')}, "
        f"rollback.sh x{runs(tmp_path, 'new-rollback')}"
    )
    if row.health_asks is not None:
        observed += f", health asked x{health}"
    fetched = sum(r.sent for r in release_server.releases.requests if r.method == "GET")
    fetched_share = round(fetched / zip_path.stat().st_size, 2)
    if row.fetched is not None:
        observed += f", release fetched x{fetched_share:g}"
    if row.error:
        observed += f", error {final.error!r}"
    record_property("observed", observed)

    assert final.status == row.final
    assert final.current_version == ("2.0.0" if row.final == OK else "1.0.0")
    assert row.error in final.error
    assert runs(tmp_path, "update") == row.updates
    assert runs(tmp_path, "new-rollback") == row.rollbacks
    if row.health_asks is not None:
        assert health == row.health_asks
    if row.fetched is not None:
        assert fetched_share == row.fetched
    # The running release is untouched: its rollback.sh never ran, its daemon lives.
    current, daemon = old_release
    assert runs(tmp_path, "old-rollback") == 0
    assert daemon.poll() is None
    # state.json readable, no install left open; current/ whole (the new release's files).
    state, warning = load_state(Store(current.parent))
    assert warning == "" and state.install is None
    assert state.current_version == final.current_version
    with zipfile.ZipFile(zip_path) as archive:
        names = {n.rstrip("/") for n in archive.namelist()}
    on_disk = {str(p.relative_to(current)) for p in current.rglob("*")}
    assert names <= on_disk
    assert not (current.parent / ".current.new").exists()
    assert not (current.parent / ".current.old").exists()
