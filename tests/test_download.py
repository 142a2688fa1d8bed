"""Transfers against a real HTTP server that cuts, stalls, refuses and swaps releases."""

from __future__ import annotations

import os
import threading
import zipfile
from pathlib import Path

import pytest

from connhex_edge_ota.client import CHUNK, WRITEBACK_BYTES, ReleaseChanged, Server, ServerError
from connhex_edge_ota.config import load_settings
from connhex_edge_ota.release import Release
from connhex_edge_ota.server import ReleaseServer
from connhex_edge_ota.state import Partial
from connhex_edge_ota.store import Store
from tests.conftest import offered_release

pytestmark = pytest.mark.reliability

MIB = 1024 * 1024


def publish(server: ReleaseServer, version: str, size: int, seed: int = 0) -> Path:
    """A release zip of about ``size`` bytes of incompressible payload."""
    path = server.releases.folder / f"fw-{version}.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("update.sh", "true\n")
        archive.writestr("payload.bin", os.urandom(size) if seed == 0 else bytes([seed]) * size)
    os.utime(path, (1_000_000 + len(list(server.releases.folder.iterdir())),) * 2)
    return path


class Device:
    """The client side: settings, store and the HTTP client, as the service wires them."""

    def __init__(self, tmp_path: Path, server: ReleaseServer, **overrides: object) -> None:
        options: dict[str, object] = {
            "server_url": server.url,
            "init_id": "dev",
            "install_dir": str(tmp_path / "opt"),
            "stall_timeout": "1s",
            "free_space_margin": 0,
            "checkpoint_bytes": 4 * MIB,
        }
        options.update(overrides)
        self.settings = load_settings(None, **options)
        self.store = Store(self.settings.store_dir)
        self.store.create()
        self.server = Server(self.settings)
        self.partial: Partial | None = None
        self.progress: list[int] = []

    def offer(self) -> Release:
        return offered_release(self.store, self.server.check(""))

    def download(self, release: Release) -> int:
        partial = self.partial or Partial(
            version=release.version, etag=release.etag, digest=release.digest, size=release.size
        )

        def save(p: Partial) -> None:
            self.partial = p

        def progress(done: int, _total: int) -> None:
            self.progress.append(done)

        transfer = self.server.download(release, partial, save, progress, threading.Event())
        return transfer.fetched


def gets(server: ReleaseServer) -> list[tuple[int, str, int]]:
    return [
        (r.status, r.headers.get("Range", ""), r.sent)
        for r in server.releases.requests
        if r.method == "GET"
    ]


def test_cut_connection_resumes_with_range_and_if_match(
    tmp_path: Path, release_server: ReleaseServer
) -> None:
    """A cut download keeps its bytes; the next try fetches only the rest (Range, If-Match, 206)."""
    publish(release_server, "2.0", 3 * MIB)
    device = Device(tmp_path, release_server)
    release = device.offer()
    release_server.faults.cut_at = release.size // 2
    with pytest.raises(ServerError, match=r"^connection to the server ended early at \d+ of"):
        device.download(release)
    part = release.part_path
    kept = part.stat().st_size  # kept for the next try, less at most one unfinished chunk
    assert release.size // 2 - 64 * 1024 <= kept <= release.size // 2

    received = device.download(release)

    assert received == release.size - kept
    assert release.path.is_file() and not part.exists()
    last = release_server.releases.requests[-1]
    assert last.headers["Range"] == f"bytes={kept}-"
    assert last.headers["If-Match"] == release.etag and last.status == 206


def test_server_ignoring_range_starts_over_and_still_verifies(
    tmp_path: Path, release_server: ReleaseServer
) -> None:
    """A server ignoring Range after a cut: the next try fetches the whole release (200), done."""
    publish(release_server, "2.0", MIB)
    device = Device(tmp_path, release_server)
    release = device.offer()
    release_server.faults.cut_at = 1000
    with pytest.raises(ServerError):
        device.download(release)
    release_server.faults.ignore_range = True
    assert device.download(release) == release.size
    assert gets(release_server)[-1][0] == 200


def test_release_swapped_between_check_and_download_is_412(
    tmp_path: Path, release_server: ReleaseServer
) -> None:
    """A release swapped after the check: the download gets 412 (ReleaseChanged), no file kept."""
    publish(release_server, "2.0", MIB)
    device = Device(tmp_path, release_server)
    release = device.offer()
    newer = publish(release_server, "2.1", MIB)
    assert release_server.releases.active() is not None
    assert release_server.releases.active().path == newer  # type: ignore[union-attr]
    with pytest.raises(ReleaseChanged):
        device.download(release)
    assert gets(release_server)[-1][0] == 412
    assert not release.path.exists()


def test_digest_mismatch_deletes_the_file(tmp_path: Path, release_server: ReleaseServer) -> None:
    """Bytes that miss the announced digest: "digest mismatch", file and partial deleted."""
    path = publish(release_server, "2.0", MIB, seed=1)
    device = Device(tmp_path, release_server)
    release = device.offer()
    # Same size and time, other bytes: the server still announces the old digest.
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(ServerError, match="digest mismatch"):
        device.download(release)
    assert not release.path.exists()
    assert not release.part_path.exists()


def test_stalled_transfer_fails_and_resumes(tmp_path: Path, release_server: ReleaseServer) -> None:
    """A transfer stalled past stall_timeout fails "stalled"; the next try fetches only the rest."""
    publish(release_server, "2.0", 2 * MIB)
    device = Device(tmp_path, release_server, stall_timeout="500ms")
    release = device.offer()
    release_server.faults.stall_at = MIB
    release_server.faults.stall_for = 5
    with pytest.raises(ServerError, match="stalled"):
        device.download(release)
    assert device.download(release) == release.size - MIB


def test_retry_after_and_permanent_errors_are_reported(
    tmp_path: Path, release_server: ReleaseServer
) -> None:
    """A 503 with Retry-After: 7 is retryable after 7 s; a 404 is reported as permanent."""
    publish(release_server, "2.0", 1000)
    device = Device(tmp_path, release_server)
    release_server.faults.fail_next = 1
    release_server.faults.retry_after = "7"
    with pytest.raises(ServerError) as caught:
        device.offer()
    assert caught.value.retry_after == 7.0 and not caught.value.permanent
    release_server.faults.fail_next, release_server.faults.fail_status = 1, 404
    with pytest.raises(ServerError) as caught:
        device.offer()
    assert caught.value.permanent


def test_not_enough_space_is_refused_before_downloading(
    tmp_path: Path, release_server: ReleaseServer
) -> None:
    """Less free space than the release plus margin: refused "no space" before any GET."""
    publish(release_server, "2.0", 1000)
    device = Device(tmp_path, release_server, free_space_margin=2**62)
    release = device.offer()
    with pytest.raises(ServerError, match="no space"):
        device.download(release)
    assert gets(release_server) == []


def test_progress_is_reported_and_memory_is_chunked(
    tmp_path: Path, release_server: ReleaseServer
) -> None:
    """Progress rises to the release size in steps of at most one chunk, never the whole body."""
    publish(release_server, "2.0", 2 * MIB)
    device = Device(tmp_path, release_server)
    release = device.offer()
    device.download(release)
    assert device.progress[-1] == release.size
    assert device.progress == sorted(device.progress)
    assert (
        max(b - a for a, b in zip([0, *device.progress], device.progress, strict=False))
        <= CHUNK  # read by bounded pieces, never the whole body
    )


def test_hostile_version_header_is_refused(tmp_path: Path, release_server: ReleaseServer) -> None:
    """A server announcing version "../../etc/x" is refused at the check: "refused release"."""
    path = publish(release_server, "2.0", 1000)
    path.with_name(path.name + ".version").write_text("../../etc/x")
    device = Device(tmp_path, release_server)
    with pytest.raises(ServerError, match="refused release"):
        device.offer()


def test_416_drops_the_partial_and_the_next_try_starts_over(
    tmp_path: Path, release_server: ReleaseServer
) -> None:
    """A 416 on resume deletes the partial file; started over, the release comes whole."""
    publish(release_server, "2.0", MIB)
    device = Device(tmp_path, release_server)
    release = device.offer()
    release_server.faults.cut_at = MIB // 2
    with pytest.raises(ServerError):
        device.download(release)
    release_server.faults.refuse_range = True
    with pytest.raises(ServerError, match="416"):
        device.download(release)
    assert not release.part_path.exists()
    device.partial = None
    assert device.download(release) == release.size


def test_after_a_reboot_only_fsynced_bytes_are_kept(
    tmp_path: Path, release_server: ReleaseServer
) -> None:
    """After a reboot the resume starts at the last fsynced checkpoint (4 MiB), not at the cut."""
    publish(release_server, "2.0", 6 * MIB)
    device = Device(tmp_path, release_server)
    release = device.offer()
    release_server.faults.cut_at = 5 * MIB  # past the first 4 MiB checkpoint
    with pytest.raises(ServerError):
        device.download(release)
    assert device.partial is not None and device.partial.durable == 4 * MIB
    device.partial = device.partial.model_copy(update={"boot_id": "an-earlier-boot"})
    device.download(release)
    assert release_server.releases.requests[-1].headers["Range"] == f"bytes={4 * MIB}-"


def test_a_download_written_back_early_resumes_whole(
    tmp_path: Path, release_server: ReleaseServer
) -> None:
    """Past WRITEBACK_BYTES the kernel is asked to write as the bytes come; a cut between
    two checkpoints keeps every byte written (same boot) and the resume verifies."""
    path = publish(release_server, "2.0", 2 * WRITEBACK_BYTES + MIB)
    device = Device(tmp_path, release_server, checkpoint_bytes=64 * MIB)
    release = device.offer()
    cut = release_server.faults.cut_at = 2 * WRITEBACK_BYTES + MIB // 2
    with pytest.raises(ServerError, match="will resume"):
        device.download(release)
    kept = release.part_path.stat().st_size
    assert 2 * WRITEBACK_BYTES <= kept <= cut
    assert device.download(release) == release.size - kept
    assert release.path.read_bytes() == path.read_bytes()


def test_connect_timeout_is_a_clear_failure(tmp_path: Path) -> None:
    """A server that never answers the connect: "cannot connect to …: no answer within 0.3s"."""
    # A listener whose accept queue is full drops new SYNs: connecting hangs.
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(5):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    try:
        settings = load_settings(
            None,
            server_url=f"http://127.0.0.1:{port}",
            init_id="dev",
            install_dir=str(tmp_path),
            connect_timeout="300ms",
        )
        with pytest.raises(
            ServerError, match=rf"^cannot connect to http://127.0.0.1:{port}: no answer within 0.3s"
        ):
            Server(settings).check("")
    finally:
        for sock in [*fillers, listener]:
            sock.close()
