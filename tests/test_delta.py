"""Zip deltas over HTTP Range against real servers: same bytes as a full download, few
bytes fetched, and every fallback visible (log, ``Transfer``, progress totals)."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import random
import shutil
import struct
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connhex_edge_ota import delta
from connhex_edge_ota.client import ReleaseChanged, Server, ServerError, Transfer
from connhex_edge_ota.config import load_settings
from connhex_edge_ota.nginxserver import nginx_binary, nginx_endpoint
from connhex_edge_ota.release import Release
from connhex_edge_ota.server import ReleaseServer
from connhex_edge_ota.state import Partial
from connhex_edge_ota.store import Store
from connhex_edge_ota.testing import OtaAgent, StatusWatcher
from tests.conftest import offered_release

pytestmark = pytest.mark.reliability

KIB = 1024
MEMBER = 256 * KIB


def member(index: int, version: int, size: int = MEMBER) -> bytes:
    """The bytes of member ``index`` in release ``version`` (reproducible, incompressible)."""
    return random.Random(f"{index}-{version}").randbytes(size)


def build(
    path: Path,
    changed: set[int] = frozenset(),  # type: ignore[assignment]
    count: int = 10,
    version: int = 2,
    compression: int = zipfile.ZIP_DEFLATED,
    size: int = MEMBER,
) -> Path:
    """A release of ``count`` members; those in ``changed`` carry ``version``'s bytes."""
    with zipfile.ZipFile(path, "w", compression) as archive:
        archive.writestr("update.sh", "true\n")
        for i in range(count):
            archive.writestr(
                f"payload/m{i:04d}.bin", member(i, version if i in changed else 1, size)
            )
    return path


class Device:
    """The client side as the service wires it: settings, store, HTTP client, a journal."""

    def __init__(self, tmp_path: Path, url: str, **overrides: object) -> None:
        options: dict[str, object] = {
            "server_url": url,
            "init_id": "dev",
            "install_dir": str(tmp_path / "opt"),
            "stall_timeout": "2s",
            "free_space_margin": 0,
        }
        options.update(overrides)
        self.settings = load_settings(None, **options)
        self.store = Store(self.settings.store_dir)
        self.store.create()
        self.server = Server(self.settings)
        self.partial: Partial | None = None
        self.progress: list[tuple[int, int]] = []

    def installed(self, release_zip: Path) -> Device:
        shutil.copyfile(release_zip, self.store.installed_zip)
        return self

    def offer(self) -> Release:
        return offered_release(self.store, self.server.check(""))

    def download(self, release: Release) -> Transfer:
        partial = self.partial or Partial(
            version=release.version, etag=release.etag, digest=release.digest, size=release.size
        )

        def save(p: Partial) -> None:
            self.partial = p

        def progress(done: int, total: int) -> None:
            self.progress.append((done, total))

        return self.server.download(
            release, partial, save, progress, threading.Event(), self.store.installed_zip
        )


def gets(server: ReleaseServer) -> list[tuple[int, str, int]]:
    """(status, Range, bytes sent) of each GET the server answered."""
    return [
        (int(r.status), r.headers.get("Range", ""), r.sent)
        for r in server.releases.requests
        if r.method == "GET"
    ]


def sent(server: ReleaseServer) -> int:
    return sum(r.sent for r in server.releases.requests if r.method == "GET")


@pytest.fixture
def releases(tmp_path: Path) -> Path:
    folder = tmp_path / "built"
    folder.mkdir()
    return folder


@pytest.mark.parametrize("compression", [zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED])
def test_delta_rebuilds_the_release_fetching_only_what_changed(
    tmp_path: Path, release_server: ReleaseServer, releases: Path, compression: int
) -> None:
    """One member of ten changed: the delta fetches it, its neighbours' headers and the
    directory, nothing else, and the file is the release byte for byte."""
    old = build(releases / "old.zip", compression=compression)
    new = build(releases / "fw-2.0.zip", changed={3}, compression=compression)
    release_server.releases.publish(new)
    device = Device(tmp_path / "a", release_server.url).installed(old)
    release = device.offer()

    transfer = device.download(release)

    assert transfer.how == "delta" and transfer.fallback == ""
    assert release.path.read_bytes() == new.read_bytes()
    assert transfer.fetched == sent(release_server)
    changed = zipfile.ZipFile(new).getinfo("payload/m0003.bin").compress_size
    # the changed member, 11 local headers, the directory and the first probe's 8 KiB
    assert changed < transfer.fetched < changed + delta.PROBE + 11 * 100 + 2 * KIB
    assert transfer.fetched < release.size / 8
    assert device.progress[-1] == (transfer.fetched, transfer.total)
    assert all(status == 206 for status, _, _ in gets(release_server))
    assert all(
        r.headers.get("If-Match") == release.etag
        for r in release_server.releases.requests
        if r.method == "GET"
    )

    # A full download of the same release, on another device: the same bytes.
    full_device = Device(tmp_path / "b", release_server.url, delta="off").installed(old)
    full_release = full_device.offer()
    assert full_device.download(full_release).how == "full"
    assert full_release.path.read_bytes() == release.path.read_bytes()


def test_delta_of_a_zip64_release(
    tmp_path: Path, release_server: ReleaseServer, releases: Path
) -> None:
    """ZIP64 end records and extra fields (forced) are read as well as the classic ones."""

    def zip64(path: Path, changed: set[int]) -> Path:
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
            archive.writestr("update.sh", "true\n")
            for i in range(6):
                with archive.open(f"m{i}", "w", force_zip64=True) as out:
                    out.write(member(i, 2 if i in changed else 1))
        return path

    old = zip64(releases / "old.zip", set())
    new = zip64(releases / "fw-2.0.zip", {1})
    release_server.releases.publish(new)
    device = Device(tmp_path, release_server.url).installed(old)
    release = device.offer()
    transfer = device.download(release)
    assert transfer.how == "delta"
    assert release.path.read_bytes() == new.read_bytes()
    assert transfer.fetched < MEMBER + delta.PROBE + 2 * KIB


def test_many_small_files_cost_a_request_per_changed_member(
    tmp_path: Path, release_server: ReleaseServer, releases: Path
) -> None:
    """300 members of 5 to 8 KiB, 3 changed: the unchanged members' local headers are
    rebuilt, not fetched (one request each, before), and the digest proves them."""
    sizes = [random.Random(i).randrange(5 * KIB, 8 * KIB) for i in range(300)]

    def small(path: Path, changed: set[int], year: int) -> Path:
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            for i, size in enumerate(sizes):
                info = zipfile.ZipInfo(f"f{i:03d}", (year, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(info, member(i, 2 if i in changed else 1, size))
        return path

    old = small(releases / "old.zip", set(), 2025)
    new = small(releases / "fw-2.0.zip", {10, 150, 290}, 2026)  # every header's time differs
    release_server.releases.publish(new)
    device = Device(tmp_path, release_server.url).installed(old)
    release = device.offer()
    transfer = device.download(release)
    assert transfer.how == "delta"
    assert release.path.read_bytes() == new.read_bytes()
    assert len(gets(release_server)) <= 1 + 3 + 1  # probe, the changed members, a directory
    directory = new.stat().st_size - zipfile.ZipFile(new).start_dir
    assert transfer.fetched < 3 * 8 * KIB + delta.PROBE + directory + 3 * 100


def test_wrongly_rebuilt_headers_are_fetched_and_the_delta_still_counts(
    tmp_path: Path, release_server: ReleaseServer, releases: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Local headers whose extra field differs from the old release's (the directory
    cannot tell): the digest disagrees, the real headers are fetched in place, and the
    file is then the release."""

    def stamped(path: Path, changed: set[int], stamp: int) -> Path:
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
            for i in range(6):
                info = zipfile.ZipInfo(f"m{i}", (2020, 1, 1, 0, 0, 0))
                info.extra = struct.pack("<HHBI", 0x5455, 5, 1, stamp + i)
                archive.writestr(info, member(i, 2 if i in changed else 1))
        return path

    old = stamped(releases / "old.zip", set(), 1_600_000_000)
    new = stamped(releases / "fw-2.0.zip", {2}, 1_700_000_000)
    release_server.releases.publish(new)
    device = Device(tmp_path, release_server.url).installed(old)
    release = device.offer()
    with caplog.at_level(logging.INFO):
        transfer = device.download(release)
    assert transfer.how == "delta" and transfer.fallback == ""
    assert logged(caplog, "the rebuilt local headers are not the release's; fetching 5")
    assert release.path.read_bytes() == new.read_bytes()
    assert transfer.fetched == sent(release_server) < MEMBER + delta.PROBE + 2 * KIB
    assert device.progress[-1] == (transfer.fetched, transfer.total)


def logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in record.getMessage() for record in caplog.records)


def test_server_ignoring_range_falls_back_to_the_whole_release(
    tmp_path: Path, release_server: ReleaseServer, releases: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A server that answers 200 to a Range: the whole release, and the log says why."""
    old = build(releases / "old.zip")
    new = build(releases / "fw-2.0.zip", changed={3})
    release_server.releases.publish(new)
    release_server.faults.ignore_range = True
    device = Device(tmp_path, release_server.url).installed(old)
    release = device.offer()
    with caplog.at_level(logging.INFO):
        transfer = device.download(release)
    assert (transfer.how, transfer.fallback) == ("full", "the server ignored Range (200)")
    assert logged(caplog, "delta of 2.0 not used: the server ignored Range (200)")
    assert release.path.read_bytes() == new.read_bytes()
    assert transfer.total == transfer.fetched >= release.size
    assert device.progress[-1] == (transfer.fetched, transfer.total)
    assert [status for status, _, _ in gets(release_server)] == [200, 200]


def test_corrupt_installed_zip_is_caught_by_the_digest_and_falls_back(
    tmp_path: Path, release_server: ReleaseServer, releases: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Bytes flipped inside an unchanged member of installed.zip (its CRC in the directory
    unchanged): the rebuilt file fails the release digest, is deleted, and the release
    comes whole; the bytes of both attempts are counted."""
    old = build(releases / "old.zip", compression=zipfile.ZIP_STORED)
    new = build(releases / "fw-2.0.zip", changed={3}, compression=zipfile.ZIP_STORED)
    release_server.releases.publish(new)
    device = Device(tmp_path, release_server.url).installed(old)
    info = zipfile.ZipFile(old).getinfo("payload/m0007.bin")
    data = bytearray(device.store.installed_zip.read_bytes())
    data[info.header_offset + 200] ^= 0xFF  # inside the member's data (header is < 100 bytes)
    device.store.installed_zip.write_bytes(bytes(data))
    release = device.offer()
    with caplog.at_level(logging.INFO):
        transfer = device.download(release)
    assert transfer.how == "full"
    assert transfer.fallback == "the rebuilt file does not match the release digest"
    assert logged(caplog, "delta of 2.0 not used: the rebuilt file does not match")
    assert release.path.read_bytes() == new.read_bytes()
    assert transfer.fetched == sent(release_server) > release.size
    assert device.progress[-1] == (transfer.fetched, transfer.total)


def test_release_swapped_before_the_delta_is_412(
    tmp_path: Path, release_server: ReleaseServer, releases: Path
) -> None:
    """A release swapped before the delta: 412 (ReleaseChanged), partial dropped, no file kept."""
    old = build(releases / "old.zip")
    new = build(releases / "fw-2.0.zip", changed={3})
    newer = build(releases / "fw-3.0.zip", changed={4}, version=3)
    release_server.releases.publish(new)
    release_server.faults.swap_after_head = newer
    device = Device(tmp_path, release_server.url).installed(old)
    release = device.offer()
    with pytest.raises(ReleaseChanged, match="412") as caught:
        device.download(release)
    assert caught.value.partial_dropped
    assert gets(release_server)[-1][0] == 412
    assert not release.part_path.exists() and not release.path.exists()


def delta_cut_in_member_3(
    tmp_path: Path, release_server: ReleaseServer, releases: Path, changed: set[int]
) -> tuple[Device, Release, Path, int]:
    """A delta of stored releases (``changed`` members differ) cut halfway through member
    3: the device, the release, the new zip and where member 3's local header starts."""
    old = build(releases / "old.zip", compression=zipfile.ZIP_STORED)
    new = build(releases / "fw-2.0.zip", changed=changed, compression=zipfile.ZIP_STORED)
    release_server.releases.publish(new)
    device = Device(tmp_path, release_server.url).installed(old)
    release = device.offer()
    start = zipfile.ZipFile(new).getinfo("payload/m0003.bin").header_offset
    release_server.faults.cut_at = start + MEMBER // 2
    with pytest.raises(ServerError, match="will resume"):
        device.download(release)
    return device, release, new, start


def test_cut_delta_resumes_and_fetches_only_what_is_missing(
    tmp_path: Path, release_server: ReleaseServer, releases: Path
) -> None:
    """A cut inside the changed member: the next try rebuilds from where the file ends,
    fetching the rest of that member (and the probe) only."""
    device, release, new, start = delta_cut_in_member_3(
        tmp_path, release_server, releases, changed={3, 4}
    )
    kept = release.part_path.stat().st_size
    assert start < kept <= start + MEMBER // 2
    before = sent(release_server)

    transfer = device.download(release)

    assert transfer.how == "delta"
    assert release.path.read_bytes() == new.read_bytes()
    again = sent(release_server) - before
    assert transfer.fetched == again
    missing = 2 * MEMBER - (kept - start)
    assert missing < again < missing + delta.PROBE + 12 * 100 + 2 * KIB
    ranges = [r for _, r, _ in gets(release_server)]
    assert f"bytes={kept}-" in ranges[-1] or any(r.startswith(f"bytes={kept}-") for r in ranges)


def test_cut_in_the_first_probe_is_a_retry_not_a_crash(
    tmp_path: Path, release_server: ReleaseServer, releases: Path
) -> None:
    """The connection cut while the end records come: a download failure like any other
    ("will retry"), and the next try makes the delta."""
    old = build(releases / "old.zip")
    new = build(releases / "fw-2.0.zip", changed={3})
    release_server.releases.publish(new)
    device = Device(tmp_path, release_server.url).installed(old)
    release = device.offer()
    release_server.faults.cut_at = release.size - 100
    with pytest.raises(ServerError, match="will retry"):
        device.download(release)
    transfer = device.download(release)
    assert transfer.how == "delta"
    assert release.path.read_bytes() == new.read_bytes()


def test_release_changed_between_a_cut_and_the_resume_is_412(
    tmp_path: Path, release_server: ReleaseServer, releases: Path
) -> None:
    """Published while the delta was cut: the resumed delta gets 412, drops its partial
    file (bytes of the release that went) and says so."""
    device, release, _new, start = delta_cut_in_member_3(
        tmp_path, release_server, releases, changed={3}
    )
    assert release.part_path.stat().st_size > start
    release_server.releases.publish(build(releases / "fw-3.0.zip", changed={5}, version=3))
    with pytest.raises(ReleaseChanged) as caught:
        device.download(release)
    assert caught.value.partial_dropped and not release.part_path.exists()
    assert gets(release_server)[-1][0] == 412


def test_without_an_installed_zip_the_release_comes_whole(
    tmp_path: Path, release_server: ReleaseServer, releases: Path
) -> None:
    """No installed.zip: the release comes whole in one plain GET (200), no delta tried."""
    release_server.releases.publish(build(releases / "fw-2.0.zip", changed={3}))
    device = Device(tmp_path, release_server.url)
    release = device.offer()
    transfer = device.download(release)
    assert (transfer.how, transfer.fallback, transfer.fetched) == ("full", "", release.size)
    assert [(status, r) for status, r, _ in gets(release_server)] == [(200, "")]


def test_delta_off_downloads_whole(
    tmp_path: Path, release_server: ReleaseServer, releases: Path
) -> None:
    """delta = off: the release comes whole in one plain GET, no Range asked."""
    old = build(releases / "old.zip")
    release_server.releases.publish(build(releases / "fw-2.0.zip", changed={3}))
    device = Device(tmp_path, release_server.url, delta="off").installed(old)
    release = device.offer()
    transfer = device.download(release)
    assert (transfer.how, transfer.fallback, transfer.fetched) == ("full", "", release.size)
    assert [r for _, r, _ in gets(release_server)] == [""]


def test_everything_changed_costs_one_probe_over_a_full_download(
    tmp_path: Path, release_server: ReleaseServer, releases: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Over 70 % to fetch: the delta is not worth it; what it cost is the probe (and the
    directory), and the totals say so."""
    old = build(releases / "old.zip")
    new = build(releases / "fw-2.0.zip", changed=set(range(10)))
    release_server.releases.publish(new)
    device = Device(tmp_path, release_server.url).installed(old)
    release = device.offer()
    with caplog.at_level(logging.INFO):
        transfer = device.download(release)
    assert transfer.how == "full" and "over 70 %" in transfer.fallback
    assert logged(caplog, "delta of 2.0 not used: it would fetch")
    assert release.path.read_bytes() == new.read_bytes()
    assert transfer.fetched == sent(release_server)
    assert release.size < transfer.fetched <= release.size + delta.PROBE
    assert device.progress[-1] == (transfer.fetched, transfer.total)


def test_small_release_is_not_worth_a_delta(
    tmp_path: Path, release_server: ReleaseServer, releases: Path
) -> None:
    """A release of too few members is not worth a delta: fetched whole, not even a probe."""
    old = build(releases / "old.zip", count=2, size=1000)
    release_server.releases.publish(build(releases / "fw-2.0.zip", count=2, size=1000))
    device = Device(tmp_path, release_server.url).installed(old)
    release = device.offer()
    transfer = device.download(release)
    assert transfer.how == "full" and "too few for a delta" in transfer.fallback
    assert [r for _, r, _ in gets(release_server)] == [""]  # not even a probe


def test_short_space_drops_the_installed_zip_first(
    tmp_path: Path, release_server: ReleaseServer, releases: Path
) -> None:
    """With less room than the release plus the margin, installed.zip goes (no delta)."""
    release_server.releases.publish(build(releases / "fw-2.0.zip", changed={3}))
    size = (releases / "fw-2.0.zip").stat().st_size
    device = Device(tmp_path, release_server.url)
    kept = 64 * 1024 * KIB  # large, so that other tests writing meanwhile do not matter
    with device.store.installed_zip.open("wb") as file:
        for _ in range(64):
            file.write(bytes(1024 * KIB))
    # A margin that fits only once installed.zip is gone (half of it to spare either way).
    margin = shutil.disk_usage(tmp_path).free - size + kept // 2
    device = Device(tmp_path, release_server.url, free_space_margin=margin)
    release = device.offer()
    transfer = device.download(release)
    assert not device.store.installed_zip.exists()
    assert transfer.how == "full"


# --- hostile zips: refused or fallen back, nothing read or written outside the store ---


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def end_record(count: int, cd_size: int, cd_start: int) -> bytes:
    return b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, count, count, cd_size, cd_start, 0)


def patched(path: Path, edit: Callable[[bytearray], object]) -> Path:
    data = bytearray(path.read_bytes())
    edit(data)
    path.write_bytes(bytes(data))
    return path


def directory_of(data: bytes) -> tuple[int, int, int]:
    """(end record offset, directory size, directory start) of a classic zip."""
    at = data.rfind(b"PK\x05\x06")
    _d, _c, _h, _n, size, start, _m = struct.unpack_from("<HHHHIIH", data, at + 4)
    return at, size, start


def set_offsets(data: bytearray, offsets: dict[int, int]) -> None:
    """Rewrite the local-header offset of central entries by index."""
    _at, _size, pos = directory_of(bytes(data))
    index = 0
    while data[pos : pos + 4] == b"PK\x01\x02":
        nlen, elen, clen = struct.unpack_from("<HHH", data, pos + 28)
        if index in offsets:
            struct.pack_into("<I", data, pos + 42, offsets[index])
        pos += 46 + nlen + elen + clen
        index += 1


HOSTILE_NEW = {
    "overlapping members": lambda d: set_offsets(d, {5: 1000}),
    "a member past the directory": lambda d: set_offsets(d, {4: 0xFFFFFFF0}),
    "directory claiming to start at 0": lambda d: struct.pack_into(
        "<I", d, directory_of(bytes(d))[0] + 16, 0
    ),
    "huge member count": lambda d: struct.pack_into(
        "<HH", d, directory_of(bytes(d))[0] + 8, 0xFFFE, 0xFFFE
    ),
    "no end record": lambda d: d.__setitem__(slice(len(d) - 22, len(d) - 18), b"XXXX"),
}


@pytest.mark.parametrize("lie", sorted(HOSTILE_NEW))
def test_hostile_new_release_falls_back_and_stays_in_the_store(
    tmp_path: Path, release_server: ReleaseServer, releases: Path, lie: str
) -> None:
    """A release whose directory lies (served as is, its digest announced by the server):
    the delta is refused and the whole release comes (the probe is all it cost), or a
    lie that only moves the boundaries between members costs bytes, never correctness:
    the rebuilt file is still checked against the release digest."""
    old = build(releases / "old.zip", compression=zipfile.ZIP_STORED)
    new = patched(
        build(releases / "fw-2.0.zip", changed={3}, compression=zipfile.ZIP_STORED),
        HOSTILE_NEW[lie],
    )
    release_server.releases.publish(new)
    device = Device(tmp_path / "device", release_server.url).installed(old)
    outside = files_under(tmp_path)
    release = device.offer()
    transfer = device.download(release)
    if lie == "overlapping members":
        assert transfer.how == "delta" and transfer.fetched < release.size / 2
    else:
        assert transfer.how == "full" and transfer.fallback
        assert transfer.fetched <= release.size + delta.PROBE + 64 * KIB + 22
    assert release.path.read_bytes() == new.read_bytes()
    created = files_under(tmp_path) - outside
    assert all(device.store.root in p.parents for p in created), created


HOSTILE_OLD = {
    "offsets past the end": lambda d: set_offsets(d, {i: 0x7FFFFFF0 for i in range(11)}),
    "all members at one offset": lambda d: set_offsets(d, {i: 0 for i in range(11)}),
    "truncated": lambda d: d.__delitem__(slice(len(d) // 2, len(d) - 2000)),
    "huge member count": lambda d: struct.pack_into(
        "<HH", d, directory_of(bytes(d))[0] + 8, 0xFFFE, 0xFFFE
    ),
}


@pytest.mark.parametrize("lie", sorted(HOSTILE_OLD))
def test_hostile_installed_zip_never_yields_a_wrong_release(
    tmp_path: Path, release_server: ReleaseServer, releases: Path, lie: str
) -> None:
    """installed.zip broken or lying: the delta is refused, or rebuilt and then caught by
    the digest; the result is always the release, and nothing lands outside the store."""
    old = patched(build(releases / "old.zip", compression=zipfile.ZIP_STORED), HOSTILE_OLD[lie])
    new = build(releases / "fw-2.0.zip", changed={3}, compression=zipfile.ZIP_STORED)
    release_server.releases.publish(new)
    device = Device(tmp_path / "device", release_server.url).installed(old)
    outside = files_under(tmp_path)
    release = device.offer()
    transfer = device.download(release)
    assert release.path.read_bytes() == new.read_bytes()
    assert transfer.how in ("delta", "full")
    assert transfer.how == "full" or transfer.fetched < release.size
    created = files_under(tmp_path) - outside
    assert all(device.store.root in p.parents for p in created), created


def test_a_member_claiming_the_old_zips_first_bytes_is_not_copied_blindly(
    tmp_path: Path, releases: Path
) -> None:
    """An old entry whose offset points into another member's data: its 'local header' is
    not one, so nothing is copied from there."""
    old = patched(
        build(releases / "old.zip", compression=zipfile.ZIP_STORED),
        lambda d: set_offsets(d, {3: 5000}),
    )
    directory = delta.read_directory(old, 100)
    with old.open("rb") as file:
        entry = directory.entries[3]
        assert delta._data_start(file, entry, old.stat().st_size) is None


def valid_tail() -> tuple[bytes, int, int]:
    with tempfile.TemporaryDirectory() as tmp:
        path = build(Path(tmp) / "x.zip", count=5, size=100)
        data = path.read_bytes()
    start = max(0, len(data) - delta.PROBE)
    return data[start:], start, len(data)


TAIL, TAIL_START, TAIL_SIZE = valid_tail()


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(TAIL) - 1), st.integers(0, 255)), max_size=8))
def test_directory_parser_refuses_any_mutated_tail_cleanly(edits: list[tuple[int, int]]) -> None:
    """Any bytes changed in a zip's tail: NoDelta or a directory whose members all start
    before it, never another exception (RAUC fuzzes its parsers; so do we)."""
    tail = bytearray(TAIL)
    for at, value in edits:
        tail[at] = value
    try:
        found = delta.parse_directory(bytes(tail), TAIL_START, TAIL_SIZE, 100)
    except delta.NoDelta:
        return
    assert all(0 <= e.offset < found.start for e in found.entries)
    assert found.start < TAIL_SIZE


def test_zip64_records_that_overlap_or_run_short_are_refused() -> None:
    """A ZIP64 locator pointing at a record that would run into the locator itself, or
    past the tail: NoDelta, not a struct error."""
    eocd = b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    for record_at in (0, 10, 40):  # 40: the 56 bytes would run past the tail
        record = b"PK\x06\x06" + bytes(52)
        body = bytearray(bytes(20) + record[:30])
        body[record_at : record_at + 4] = b"PK\x06\x06"
        locator = b"PK\x06\x07" + struct.pack("<IQI", 0, 1000 + record_at, 1)
        tail = bytes(body) + locator + eocd
        with pytest.raises(delta.NoDelta, match="ZIP64"):
            delta.parse_directory(tail, 1000, 1000 + len(tail), 100)


# --- nginx, which answers Range its own way ---


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """``serve(zip, version, max_ranges=None)``: nginx answering /iot/ota/<id> with the zip
    (its own ETag and If-Match, our Version and Content-Digest headers); skipped without nginx."""
    binary = nginx_binary()
    if binary is None:
        pytest.skip("nginx is not installed (apt-get install nginx)")
    numbers = itertools.count()
    with contextlib.ExitStack() as servers:

        def serve(release: Path, version: str, max_ranges: int | None = None) -> str:
            folder = tmp_path / f"nginx-{next(numbers)}"
            folder.mkdir()
            return servers.enter_context(
                nginx_endpoint(binary, release, version, folder, max_ranges=max_ranges)
            )

        yield serve


def test_delta_from_nginx_is_the_release_byte_for_byte(
    tmp_path: Path,
    releases: Path,
    nginx: Callable[..., str],
) -> None:
    """A delta from real nginx is the release byte for byte, fetching about the changed member.

    Every GET nginx logged was answered 206, never the whole file."""
    old = build(releases / "old.zip")
    new = build(releases / "fw-2.0.zip", changed={3})
    url = nginx(new, "2.0")
    device = Device(tmp_path, url).installed(old)
    release = device.offer()
    transfer = device.download(release)
    assert transfer.how == "delta"
    assert release.path.read_bytes() == new.read_bytes()
    changed = zipfile.ZipFile(new).getinfo("payload/m0003.bin").compress_size
    assert changed < transfer.fetched < changed + delta.PROBE + 11 * 100 + 2 * KIB
    log = (Path(url and next(tmp_path.glob("nginx-*"))) / "access.log").read_text()
    answers = [line for line in log.splitlines() if '"GET ' in line]
    assert answers and all(" 206 " in line for line in answers)  # never the whole file


def test_nginx_without_ranges_falls_back(
    tmp_path: Path,
    releases: Path,
    nginx: Callable[..., str],
) -> None:
    """nginx with ``max_ranges 0`` answers every Range with 200: the whole release."""
    old = build(releases / "old.zip")
    new = build(releases / "fw-2.0.zip", changed={3})
    device = Device(tmp_path, nginx(new, "2.0", max_ranges=0)).installed(old)
    release = device.offer()
    transfer = device.download(release)
    assert (transfer.how, transfer.fallback) == ("full", "the server ignored Range (200)")
    assert release.path.read_bytes() == new.read_bytes()


def test_nginx_release_replaced_is_412(
    tmp_path: Path,
    releases: Path,
    nginx: Callable[..., str],
) -> None:
    """nginx's ETag changes with the file: a delta pinned to the old one gets 412."""
    old = build(releases / "old.zip")
    served = releases / "served.zip"
    shutil.copyfile(build(releases / "fw-2.0.zip", changed={3}), served)
    device = Device(tmp_path, nginx(served, "2.0")).installed(old)
    release = device.offer()
    newer = build(releases / "fw-3.0.zip", changed={4}, version=3)
    shutil.copyfile(newer, served)
    os.utime(served, (time.time() + 10, time.time() + 10))
    with pytest.raises(ReleaseChanged):
        device.download(release)


# --- the real service ---


def test_service_updates_with_a_delta(
    tmp_path: Path,
    release_server: ReleaseServer,
    statuses: StatusWatcher,
    ota_agent: Callable[..., OtaAgent],
    releases: Path,
) -> None:
    """Install 1.0.0, then 2.0.0 with one member changed: ``updated``, the log says
    "(delta)", and the server sent a small share of the zip."""
    first = build(releases / "fw-1.0.0.zip", version=1)
    release_server.releases.publish(first)
    agent: OtaAgent = ota_agent(initial_version="0.9.0", auto_install=True)
    statuses.wait_updated("1.0.0", timeout=30)
    assert agent.store.joinpath("installed.zip").read_bytes() == first.read_bytes()
    before = sent(release_server)
    second = build(releases / "fw-2.0.0.zip", changed={3})
    release_server.releases.publish(second)
    mark = statuses.mark()
    statuses.request("install", timeout=30)
    statuses.wait_updated("2.0.0", timeout=30, after=mark)
    fetched = sent(release_server) - before
    assert fetched < second.stat().st_size / 8
    assert "downloaded 2.0.0 (delta)" in agent.output()
    assert agent.store.joinpath("installed.zip").read_bytes() == second.read_bytes()
