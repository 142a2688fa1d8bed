"""Hostile or broken release zips are refused as a whole, before anything is written."""

from __future__ import annotations

import hashlib
import stat
import zipfile
from collections.abc import Sequence
from pathlib import Path

import pytest

from connhex_edge_ota.archive import ArchiveError, Limits, check_archive, unpack

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
    path = make_zip(tmp_path / "r.zip", members)
    with pytest.raises(ArchiveError, match=reason):
        check_archive(path, Limits())


def test_not_a_zip(tmp_path: Path) -> None:
    path = tmp_path / "r.zip"
    path.write_bytes(b"PK\x03\x04 but not really")
    with pytest.raises(ArchiveError, match="not a valid zip"):
        check_archive(path, Limits())


def test_limits_on_count_size_and_ratio(tmp_path: Path) -> None:
    many = make_zip(tmp_path / "many.zip", [UPDATE] + [(f"f{i}", b"", None) for i in range(20)])
    with pytest.raises(ArchiveError, match="more than the limit"):
        check_archive(many, Limits(max_members=10))
    big = make_zip(tmp_path / "big.zip", [UPDATE, ("big", b"x" * 100_000, None)])
    with pytest.raises(ArchiveError, match="unpacked size"):
        check_archive(big, Limits(max_unpacked_size=50_000))
    bomb = make_zip(tmp_path / "bomb.zip", [UPDATE, ("zeros", bytes(20 * 1024 * 1024), None)])
    with pytest.raises(ArchiveError, match="compression ratio"):
        check_archive(bomb, Limits())


def test_unpack_replaces_current_as_a_whole(tmp_path: Path) -> None:
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
    current = tmp_path / "current"
    current.mkdir()
    (current / "old.txt").write_text("old")
    path = make_zip(tmp_path / "r.zip", [UPDATE, ("extra.txt", b"x", None)])
    with pytest.raises(ArchiveError, match="not in the signed manifest"):
        unpack(path, check_archive(path, Limits()), current, {"update.sh": (8, UPDATE_SHA)})
    assert (current / "old.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "r.zip"]
