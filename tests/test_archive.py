"""Hostile or broken release zips are refused as a whole, before anything is written."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import resource
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connhex_edge_ota.archive import (
    ArchiveError,
    Limits,
    Member,
    check_archive,
    read_member,
    unpack,
)

pytestmark = pytest.mark.reliability


def make_zip(path: Path, members: Sequence[tuple[str, bytes, int | None]]) -> Path:
    """members: (name, data, unix mode or None)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data, mode in members:
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if mode is not None:
                info.create_system = 3
                info.external_attr = mode << 16
            archive.writestr(info, data)
    return path


UPDATE = ("update.sh", b"echo hi\n", None)
UPDATE_SHA = hashlib.sha256(b"echo hi\n").hexdigest()


@pytest.mark.parametrize(
    ("members", "reason"),
    [
        ([UPDATE, ("/etc/evil", b"x", None)], "absolute member path"),
        ([UPDATE, ("../evil", b"x", None)], "'..' in member path"),
        ([UPDATE, ("a/../../evil", b"x", None)], "'..' in member path"),
        ([UPDATE, ("link", b"/etc/passwd", stat.S_IFLNK | 0o777)], "symbolic link"),
        ([UPDATE, ("fifo", b"", stat.S_IFIFO | 0o644)], "special file"),
        ([UPDATE, ("dev", b"", stat.S_IFCHR | 0o644)], "special file"),
        ([UPDATE, ("a", b"1", None), ("a", b"2", None)], "duplicate member"),
        ([UPDATE, ("a", b"1", None), ("a/b", b"2", None)], "both a file and a folder"),
        ([UPDATE, ("C:/x", b"1", None)], "absolute member path"),
        ([UPDATE, ("a\\..\\b", b"1", None)], "backslash"),
        ([("payload.bin", b"x", None)], "no update.sh"),
        ([("sub/update.sh", b"x", None)], "no update.sh"),
    ],
)
def test_hostile_members_are_refused(
    tmp_path: Path, members: list[tuple[str, bytes, int | None]], reason: str
) -> None:
    """A zip with an absolute or '..' path, a link, a device or no update.sh is refused whole.

    check_archive raises ArchiveError naming the reason; also for duplicate names, a name that
    is both a file and a folder, a backslash in a path and a ``C:/`` path."""
    path = make_zip(tmp_path / "r.zip", members)
    with pytest.raises(ArchiveError, match=reason):
        check_archive(path, Limits())


def test_not_a_zip(tmp_path: Path) -> None:
    """A file that is not a zip is refused: ArchiveError "r.zip: not a valid zip"."""
    path = tmp_path / "r.zip"
    path.write_bytes(b"PK\x03\x04 but not really")
    with pytest.raises(ArchiveError, match=r"^r\.zip: not a valid zip"):
        check_archive(path, Limits())


def test_member_count_limit(tmp_path: Path) -> None:
    """More members than max_members is refused, naming count and limit; at the limit it passes."""
    many = make_zip(tmp_path / "many.zip", [UPDATE] + [(f"f{i}", b"", None) for i in range(20)])
    with pytest.raises(ArchiveError, match="21 members, more than the limit of 10"):
        check_archive(many, Limits(max_members=10))
    assert len(check_archive(many, Limits(max_members=21))) == 21


def test_unpacked_size_limit(tmp_path: Path) -> None:
    """A zip unpacking to more than max_unpacked_size is refused; one within the limit passes."""
    big = make_zip(tmp_path / "big.zip", [UPDATE, ("big", os.urandom(100_000), None)])
    with pytest.raises(ArchiveError, match="unpacked size"):
        check_archive(big, Limits(max_unpacked_size=50_000))
    check_archive(big, Limits(max_unpacked_size=100_008))


def test_ratio_limit_on_a_large_member(tmp_path: Path) -> None:
    """A member of 20 MiB of zeros (a zip bomb) is refused: compression ratio above 200."""
    bomb = make_zip(tmp_path / "bomb.zip", [UPDATE, ("zeros", bytes(20 * 1024 * 1024), None)])
    with pytest.raises(ArchiveError, match="zeros: compression ratio above 200"):
        check_archive(bomb, Limits())


def test_ratio_limit_on_a_small_member(tmp_path: Path) -> None:
    """Even a small member (64 KiB of zeros, ratio 780) is refused for its compression ratio."""
    # 64 KiB of zeros deflate to 84 bytes: a ratio of 780, no longer exempt for being small.
    small = make_zip(tmp_path / "small.zip", [UPDATE, ("zeros", bytes(64 * 1024), None)])
    with pytest.raises(ArchiveError, match="zeros: compression ratio above 200"):
        check_archive(small, Limits())


def test_ratio_limit_on_the_archive_as_a_whole(tmp_path: Path) -> None:
    """Members each within the ratio's slack, above it together: the archive is refused whole.

    The same zip with only one of those members is accepted."""
    # 8 KiB of zeros deflate to about 30 bytes: each member is within the slack, the sum is not.
    members = [UPDATE] + [(f"z{i}", bytes(8192), None) for i in range(50)]
    crowd = make_zip(tmp_path / "crowd.zip", members)
    with zipfile.ZipFile(crowd) as archive:
        infos = archive.infolist()
    assert all(i.file_size <= 200 * i.compress_size + 4096 for i in infos)
    assert sum(i.file_size for i in infos) > 200 * sum(i.compress_size for i in infos) + 4096
    with pytest.raises(ArchiveError, match=r"crowd\.zip: compression ratio of the archive as a"):
        check_archive(crowd, Limits())
    check_archive(make_zip(tmp_path / "one.zip", members[:2]), Limits())


def test_small_members_compressing_well_are_fine(tmp_path: Path) -> None:
    """A 100-byte member compressing 10:1 passes a max_ratio of 5: small members get slack."""
    text = b"x" * 100  # deflates to about 10 bytes: ratio 10, above a max_ratio of 5
    path = make_zip(tmp_path / "r.zip", [UPDATE, ("notes.txt", text, None)])
    check_archive(path, Limits(max_ratio=5))


# Crafted archives: raw bytes, so that the end record and the directory can lie.
_LOCAL = struct.Struct("<4s5H3L2H")
_CENTRAL = struct.Struct("<4s4B4HL2L5H2L")


def _entry(name: bytes, data: bytes, offset: int) -> tuple[bytes, bytes]:
    crc = zlib.crc32(data)
    local = _LOCAL.pack(b"PK\x03\x04", 20, 0, 0, 0, 0, crc, len(data), len(data), len(name), 0)
    central = _CENTRAL.pack(
        b"PK\x01\x02", 20, 3, 20, 0, 0, 0, 0, 0, crc, len(data), len(data), len(name), 0, 0,
        0, 0, 0o100644 << 16, offset,
    )  # fmt: skip
    return local + name + data, central + name


def directory_bomb(path: Path, copies: int, announced: int | None = None) -> Path:
    """One ``update.sh`` and ``copies`` central directory entries pointing at it, with a
    ZIP64 end record announcing ``announced`` entries (default: the truth)."""
    local, central = _entry(b"update.sh", b"echo hi\n", 0)
    entries = copies if announced is None else announced
    size = len(central) * copies
    with path.open("wb") as out:
        out.write(local)
        for _ in range(0, copies, 10_000):
            out.write(central * min(10_000, copies - _))
        end64 = len(local) + size
        out.write(
            struct.pack(
                "<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, entries, entries, size, len(local)
            )
        )
        out.write(struct.pack("<4sLQL", b"PK\x06\x07", 0, end64, 1))
        out.write(
            struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
        )
    return path


def test_a_crafted_zip64_archive_is_read_like_any_other(tmp_path: Path) -> None:
    """A hand-built ZIP64 zip holding update.sh is checked and unpacked like any other."""
    members = check_archive(directory_bomb(tmp_path / "one.zip", 1), Limits())
    assert [m.name for m in members] == ["update.sh"]
    unpack(tmp_path / "one.zip", members, tmp_path / "current", None)
    assert (tmp_path / "current" / "update.sh").read_bytes() == b"echo hi\n"


_MEASURE = """
import sys
from pathlib import Path
from connhex_edge_ota.archive import ArchiveError, Limits, check_archive

def peak_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

before = peak_kib()
try:
    check_archive(Path(sys.argv[1]), Limits())
    print("accepted")
except ArchiveError as exc:
    print(exc)
print(peak_kib() - before)
"""


@pytest.mark.parametrize(
    ("announced", "error"),
    [
        (None, "1000000 members, more than the limit of 10000"),
        (
            1,
            "central directory of 55000000 bytes, "
            "more than the limit of 10240000 for 10000 members",
        ),
    ],
)
def test_a_million_entries_are_refused_before_zipfile_reads_them(
    tmp_path: Path, announced: int | None, error: str
) -> None:
    """A million-entry directory is refused (by count or by size); peak memory grows < 10 MiB."""
    bomb = directory_bomb(tmp_path / "bomb.zip", 1_000_000, announced)
    assert bomb.stat().st_size > 50_000_000
    measured = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(bomb)], capture_output=True, text=True, timeout=120
    )
    message, growth_kib = measured.stdout.splitlines()
    assert message == f"bomb.zip: {error}"
    assert int(growth_kib) < 10 * 1024, f"peak RSS grew by {int(growth_kib) / 1024:.1f} MiB"


def test_an_end_record_that_understates_the_count_is_caught_by_the_walk(tmp_path: Path) -> None:
    """An end record claiming 1 entry of 50 is caught: over max_members, or "holds 50 entries"."""
    liar = directory_bomb(tmp_path / "liar.zip", 50, announced=1)
    with pytest.raises(ArchiveError, match="more than the limit of 10 members"):
        check_archive(liar, Limits(max_members=10))
    with pytest.raises(ArchiveError, match="holds 50 entries, its end record says 1"):
        check_archive(liar, Limits())


def _stored_release(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("update.sh", b"echo hi\n")
        archive.writestr("payload.bin", b"payload bytes " * 8)
    return path


def _deflated_release(path: Path) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("update.sh", b"echo hi\n")
        archive.writestr("payload.bin", bytes(range(256)) * 8)
    return path


def _patch(path: Path, find: bytes, replace: bytes, occurrence: int = 0) -> None:
    data = bytearray(path.read_bytes())
    at = -1
    for _ in range(occurrence + 1):
        at = data.index(find, at + 1)
    data[at : at + len(replace)] = replace
    path.write_bytes(bytes(data))


def _central(path: Path, name: bytes) -> int:
    data = path.read_bytes()
    return next(
        i
        for i in range(len(data))
        if data.startswith(b"PK\x01\x02", i) and data[i + 46 : i + 46 + len(name)] == name
    )


def _set_central(path: Path, name: bytes, field: str, value: int) -> None:
    offsets = {
        "flags": (8, "<H"),
        "method": (10, "<H"),
        "crc": (16, "<L"),
        "compressed": (20, "<L"),
        "size": (24, "<L"),
    }
    at = _central(path, name)
    where, fmt = offsets[field]
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, at + where, value)
    path.write_bytes(bytes(data))


def _local(path: Path, name: bytes) -> int:
    data = path.read_bytes()
    return next(
        i
        for i in range(len(data))
        if data.startswith(b"PK\x03\x04", i) and data[i + 30 : i + 30 + len(name)] == name
    )


def _set_local(path: Path, name: bytes, field: str, value: int) -> None:
    offsets = {"method": (8, "<H"), "size": (22, "<L")}
    at = _local(path, name)
    where, fmt = offsets[field]
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, at + where, value)
    path.write_bytes(bytes(data))


def _crc_mismatch(path: Path) -> None:
    _patch(_stored_release(path), b"payload bytes", b"PAYLOAD")


def _renamed_local_header(path: Path) -> None:
    _patch(_stored_release(path), b"payload.bin", b"paylXad.bin", occurrence=0)


def _deflate64(path: Path) -> None:
    _deflated_release(path)
    _set_central(path, b"payload.bin", "method", 9)
    _set_local(path, b"payload.bin", "method", 9)


def _encrypted(path: Path) -> None:
    _stored_release(path)
    _set_central(path, b"payload.bin", "flags", 0x1)


def _size_too_large(path: Path) -> None:
    _deflated_release(path)  # the CRC still matches the real data: only the size lies
    _set_central(path, b"payload.bin", "size", 2048 + 100)
    _set_local(path, b"payload.bin", "size", 2048 + 100)


def _size_too_small(path: Path) -> None:
    _deflated_release(path)
    _set_central(path, b"payload.bin", "size", 1000)
    _set_local(path, b"payload.bin", "size", 1000)


def _corrupt_deflate(path: Path) -> None:
    _deflated_release(path)
    at = _local(path, b"payload.bin") + 30 + len(b"payload.bin")
    data = bytearray(path.read_bytes())
    data[at : at + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))


def _no_local_header(path: Path) -> None:
    _patch(_stored_release(path), b"PK\x03\x04", b"XX\x03\x04", occurrence=1)


def _truncated(path: Path) -> None:
    data = _deflated_release(path).read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("defect", "error"),
    [
        (_crc_mismatch, "payload.bin: CRC-32 mismatch: the data is corrupt"),
        (_renamed_local_header, "payload.bin: local header disagrees with the central directory"),
        (_deflate64, "payload.bin: compression method 9 not supported"),
        (_encrypted, "payload.bin: encrypted member"),
        (_size_too_large, "payload.bin: smaller than declared"),
        (_size_too_small, "payload.bin: CRC-32 mismatch: the data is corrupt"),
        (_corrupt_deflate, "payload.bin: corrupt compressed data"),
        (_no_local_header, "payload.bin: no local header where the directory points"),
        (_truncated, "r.zip: not a valid zip file: no end of central directory record"),
    ],
)
def test_archive_defects_are_archive_errors_naming_the_member(
    tmp_path: Path, defect: Callable[[Path], None], error: str
) -> None:
    """A damaged member (CRC, size, method, header, cut): ArchiveError naming it, nothing left.

    Also encrypted members; the exact message is checked, current/ is not created and no
    staging folder is left beside the release."""
    path = tmp_path / "r.zip"
    defect(path)
    current = tmp_path / "current"
    with pytest.raises(ArchiveError) as refused:
        unpack(path, check_archive(path, Limits()), current, None)
    assert str(refused.value) == error
    assert not current.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.zip"]


def test_reading_the_manifest_of_a_broken_archive_is_an_archive_error(tmp_path: Path) -> None:
    """A corrupt manifest.json is an ArchiveError "manifest.json: CRC-32 mismatch" when read."""
    path = tmp_path / "r.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("update.sh", b"echo hi\n")
        archive.writestr("manifest.json", b'{"files": {}}')
    _patch(path, b'{"files"', b'{"FILES"')
    with pytest.raises(ArchiveError, match=r"^manifest\.json: CRC-32 mismatch"):
        read_member(path, "manifest.json")


def test_unpack_replaces_current_as_a_whole(tmp_path: Path) -> None:
    """Unpacking replaces current/ whole: the new files are in, the old ones gone, no leftovers."""
    current = tmp_path / "current"
    current.mkdir()
    (current / "old.txt").write_text("old")
    path = make_zip(
        tmp_path / "r.zip", [UPDATE, ("dir/", b"", None), ("dir/new.txt", b"new", None)]
    )
    unpack(path, check_archive(path, Limits()), current, None)
    assert (current / "dir" / "new.txt").read_text() == "new"
    assert not (current / "old.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "r.zip"]


def test_failed_unpack_leaves_current_untouched(tmp_path: Path) -> None:
    """A member not in the signed manifest fails the unpack; current/ keeps its old files."""
    current = tmp_path / "current"
    current.mkdir()
    (current / "old.txt").write_text("old")
    path = make_zip(tmp_path / "r.zip", [UPDATE, ("extra.txt", b"x", None)])
    with pytest.raises(ArchiveError, match="not in the signed manifest"):
        unpack(path, check_archive(path, Limits()), current, {"update.sh": (8, UPDATE_SHA)})
    assert (current / "old.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "r.zip"]


@pytest.mark.parametrize(
    ("defect", "error"),
    [
        (_deflate64, "payload.bin: compression method not supported"),
        (_encrypted, "payload.bin: encrypted member"),
        (_crc_mismatch, "payload.bin: CRC-32 mismatch: the data is corrupt"),
        (_corrupt_deflate, "payload.bin: corrupt compressed data"),
    ],
)
def test_unpack_alone_also_turns_read_errors_into_archive_errors(
    tmp_path: Path, defect: Callable[[Path], None], error: str
) -> None:
    """Unpack alone (no check first) turns an unreadable member into an ArchiveError naming it.

    Unsupported method, encryption, CRC-32 mismatch and corrupt deflate data."""
    path = tmp_path / "r.zip"
    defect(path)
    with zipfile.ZipFile(path) as archive:  # as if check_archive had been skipped
        members = [Member(info.filename, info) for info in archive.infolist()]
    with pytest.raises(ArchiveError) as refused:
        unpack(path, members, tmp_path / "current", None)
    assert str(refused.value) == error


def _member_running_into_the_next(path: Path) -> Path:
    """update.sh (stored) claims its data goes on into payload.bin's local header."""
    _stored_release(path)
    data = path.read_bytes()
    start = _local(path, b"update.sh") + 30 + len(b"update.sh")
    claimed = data[start : _local(path, b"payload.bin") + 10]
    _set_central(path, b"update.sh", "crc", zlib.crc32(claimed))
    _set_central(path, b"update.sh", "compressed", len(claimed))
    _set_central(path, b"update.sh", "size", len(claimed))
    return path


def test_a_stored_member_whose_data_overlaps_the_next_is_refused(tmp_path: Path) -> None:
    """A stored member whose data runs into the next member is refused; nothing is unpacked."""
    path = _member_running_into_the_next(tmp_path / "r.zip")
    with pytest.raises(ArchiveError) as refused:
        unpack(path, check_archive(path, Limits()), tmp_path / "current", None)
    assert str(refused.value) == "update.sh: overlaps another member"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.zip"]


def _big_stored_release(path: Path, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("update.sh", b"echo hi\n")
        archive.writestr("payload.bin", payload)
    return path


def test_a_big_stored_member_is_copied_whole_and_its_crc_checked(tmp_path: Path) -> None:
    """A 9 MiB stored member unpacks byte for byte; a flipped byte is a CRC-32 error, no folder."""
    payload = os.urandom(9 * 1024 * 1024 + 123)  # above PARALLEL_FROM: checked on a thread
    path = _big_stored_release(tmp_path / "r.zip", payload)
    digest = hashlib.sha256(payload).hexdigest()
    expected = {"update.sh": (8, UPDATE_SHA), "payload.bin": (len(payload), digest)}
    unpack(path, check_archive(path, Limits()), tmp_path / "current", expected)
    assert (tmp_path / "current" / "payload.bin").read_bytes() == payload

    data = bytearray(path.read_bytes())
    data[_local(path, b"payload.bin") + 30 + 11 + len(payload) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArchiveError) as refused:
        unpack(path, check_archive(path, Limits()), tmp_path / "again", None)
    assert str(refused.value) == "payload.bin: CRC-32 mismatch: the data is corrupt"
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("size", [100, 9 * 1024 * 1024])
def test_a_stored_member_that_differs_from_the_signed_manifest_is_refused(
    tmp_path: Path, size: int
) -> None:
    """A stored member whose SHA-256 is not the signed manifest's is refused; nothing unpacked."""
    payload = os.urandom(size)
    path = _big_stored_release(tmp_path / "r.zip", payload)
    wrong = hashlib.sha256(payload + b"x").hexdigest()
    expected = {"update.sh": (8, UPDATE_SHA), "payload.bin": (size, wrong)}
    with pytest.raises(ArchiveError, match=r"^payload\.bin: differs from the signed manifest$"):
        unpack(path, check_archive(path, Limits()), tmp_path / "current", expected)
    assert not (tmp_path / "current").exists()


def test_stored_members_are_copied_where_copy_file_range_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kernels before 5.3 refuse copies across filesystems (EXDEV), some filesystems
    do not support it at all: the copy goes through a buffer instead."""
    payload = os.urandom(5 * 1024 * 1024 + 7)
    path = _big_stored_release(tmp_path / "r.zip", payload)
    calls = []

    def refused(*args: object) -> int:
        calls.append(args)
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refused)
    unpack(path, check_archive(path, Limits()), tmp_path / "current", None)
    assert (tmp_path / "current" / "payload.bin").read_bytes() == payload
    assert (tmp_path / "current" / "update.sh").read_bytes() == b"echo hi\n"
    assert len(calls) == 2


def _refuse_kernel_copies(monkeypatch: pytest.MonkeyPatch, error: int = errno.EXDEV) -> None:
    def refused(*args: object) -> int:
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(os, "copy_file_range", refused)


def test_short_writes_of_the_buffered_copy_are_completed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """os.pwrite may write less than asked (a disk filling up, a signal): never a hole."""
    payload = os.urandom(3 * 1024 * 1024 + 11)
    path = _big_stored_release(tmp_path / "r.zip", payload)
    _refuse_kernel_copies(monkeypatch)
    real = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, at: real(fd, bytes(data)[:1000], at))
    unpack(path, check_archive(path, Limits()), tmp_path / "current", None)
    assert (tmp_path / "current" / "payload.bin").read_bytes() == payload


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_a_disk_that_fills_up_mid_member_is_an_os_error_and_leaves_nothing(
    tmp_path: Path, kernel_copy: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RLIMIT_FSIZE makes the file system refuse the rest of a member, as a full disk
    does: a short write, then an error. It stays an OSError (the installer's "no space"),
    and no staging folder is left."""
    path = _big_stored_release(tmp_path / "r.zip", os.urandom(6 * 1024 * 1024))
    members = check_archive(path, Limits())
    if not kernel_copy:
        _refuse_kernel_copies(monkeypatch)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (5 * 1024 * 1024 + 3, limits[1]))
    try:
        with pytest.raises(OSError) as refused:
            unpack(path, members, tmp_path / "current", None)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
    assert not isinstance(refused.value, ArchiveError)
    assert refused.value.errno == errno.EFBIG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.zip"]


@pytest.mark.parametrize("size", [100_000, 9 * 1024 * 1024])
def test_what_is_checked_is_what_was_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """A byte that changes on its way into current/ (a flaky disk, another writer) is
    caught: the CRC-32 and the SHA-256 are read back from the unpacked file."""
    payload = os.urandom(size)
    path = _big_stored_release(tmp_path / "r.zip", payload)
    real = os.copy_file_range

    def flipping(src: int, dst: int, count: int, at: int, to: int) -> int:
        copied = real(src, dst, count, at, to)
        if copied > 1000:
            os.pwrite(dst, b"EVIL", to + 500)
        return copied

    monkeypatch.setattr(os, "copy_file_range", flipping)
    digest = hashlib.sha256(payload).hexdigest()
    expected = {"update.sh": (8, UPDATE_SHA), "payload.bin": (size, digest)}
    with pytest.raises(ArchiveError) as refused:
        unpack(path, check_archive(path, Limits()), tmp_path / "current", expected)
    assert str(refused.value) == "payload.bin: CRC-32 mismatch: the data is corrupt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.zip"]


@pytest.mark.parametrize("failure", ["copies nothing", "EIO"])
def test_a_kernel_copy_that_fails_goes_on_through_a_buffer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    """copy_file_range cannot say whether the source or the target failed, and some
    file systems copy nothing: the buffered copy then does the work, or names the side."""
    payload = os.urandom(5 * 1024 * 1024)
    path = _big_stored_release(tmp_path / "r.zip", payload)
    if failure == "EIO":
        _refuse_kernel_copies(monkeypatch, errno.EIO)
    else:
        monkeypatch.setattr(os, "copy_file_range", lambda *args: 0)
    unpack(path, check_archive(path, Limits()), tmp_path / "current", None)
    assert (tmp_path / "current" / "payload.bin").read_bytes() == payload


def test_a_release_that_cannot_be_read_is_refused_naming_the_member(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A release whose reads fail (EIO) is an ArchiveError naming the member; nothing unpacked."""
    path = _big_stored_release(tmp_path / "r.zip", os.urandom(5 * 1024 * 1024))
    members = check_archive(path, Limits())
    release = path.open("rb")  # the only descriptor whose reads fail
    _refuse_kernel_copies(monkeypatch, errno.EIO)
    real = os.preadv

    def failing(fd: int, buffers: list[memoryview], at: int) -> int:
        if os.path.samestat(os.fstat(fd), os.fstat(release.fileno())):
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, buffers, at)

    monkeypatch.setattr(os, "preadv", failing)
    with release, pytest.raises(ArchiveError) as refused:
        unpack(path, members, tmp_path / "current", None)
    assert str(refused.value) == "update.sh: cannot be read: Input/output error"  # read first
    assert not (tmp_path / "current").exists()


def test_a_failed_check_stops_the_copy_of_a_big_member(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The unpacked file cannot be read back (a failing disk): the copy stops at the
    next piece instead of writing the rest of a member that is refused anyway."""
    path = _big_stored_release(tmp_path / "r.zip", bytes(48 * 1024 * 1024))  # 3 pieces
    members = check_archive(path, Limits())
    real = os.copy_file_range
    copies = []

    def slow_copy(*args: int) -> int:
        copies.append(args)
        time.sleep(0.05)  # the check of the piece before has failed by now
        return real(*args)

    real_read = os.preadv

    def failing(fd: int, buffers: list[memoryview], at: int) -> int:
        if os.fstat(fd).st_size > 1024 * 1024:  # payload.bin, not update.sh
            raise OSError(errno.EIO, "Input/output error")
        return real_read(fd, buffers, at)

    monkeypatch.setattr(os, "copy_file_range", slow_copy)
    monkeypatch.setattr(os, "preadv", failing)
    with pytest.raises(OSError, match="Input/output error"):
        unpack(path, members, tmp_path / "current", None)
    assert len(copies) == 3  # update.sh, then two pieces of payload.bin: not the third
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.zip"]


def test_unpack_alone_refuses_a_stored_member_whose_sizes_disagree(tmp_path: Path) -> None:
    """Unpack alone refuses a stored member whose sizes disagree, naming the member."""
    path = _big_stored_release(tmp_path / "r.zip", b"x" * 100)
    _set_central(path, b"payload.bin", "size", 50)
    with zipfile.ZipFile(path) as archive:  # as if check_archive had been skipped
        members = [Member(info.filename, info) for info in archive.infolist()]
    with pytest.raises(ArchiveError, match=r"^payload\.bin: stored member whose sizes disagree$"):
        unpack(path, members, tmp_path / "current", None)


def _sample(compression: int) -> bytes:
    sample = io.BytesIO()
    with zipfile.ZipFile(sample, "w", compression=compression) as archive:
        archive.writestr("update.sh", b"echo hi\n")
        archive.writestr("dir/payload.bin", bytes(range(256)) * 4)
    return sample.getvalue()


_SAMPLES = {"deflated": _sample(zipfile.ZIP_DEFLATED), "stored": _sample(zipfile.ZIP_STORED)}
_SAMPLE_SIZE = min(len(sample) for sample in _SAMPLES.values())


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.sampled_from(sorted(_SAMPLES)),
    st.lists(
        st.tuples(st.integers(0, _SAMPLE_SIZE - 1), st.integers(0, 255)),
        min_size=1,
        max_size=4,
    ),
    st.integers(0, _SAMPLE_SIZE),
)
def test_a_damaged_archive_only_ever_raises_archive_error(
    tmp_path: Path, kind: str, changes: list[tuple[int, int]], cut: int
) -> None:
    """A randomly damaged zip raises only ArchiveError, and when refused leaves no current/."""
    data = bytearray(_SAMPLES[kind])
    for position, value in changes:
        data[position] = value
    path = tmp_path / "r.zip"
    path.write_bytes(bytes(data[: max(cut, len(data) - 40)]))
    target = tmp_path / "current"
    try:
        unpack(path, check_archive(path, Limits()), target, None)
    except ArchiveError as exc:
        assert str(exc)
        assert not target.exists()
    shutil.rmtree(target, ignore_errors=True)
