"""Release zips: refuse a hostile or broken archive as a whole, then unpack it safely.

Nothing from the archive is trusted: the member count and the size of the
central directory are checked before zipfile parses it (zipdirectory.py); member
names, types, sizes and ratios before a single byte is written; and the
unpacked tree is built in a temporary folder that replaces ``current/`` only once
complete. Whatever goes wrong while reading the archive is an ArchiveError
``"<member>: <why>"``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import lzma
import os
import shutil
import stat
import struct
import zipfile
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, BinaryIO

from connhex_edge_ota import killpoints
from connhex_edge_ota.store import start_writeback
from connhex_edge_ota.zipdirectory import DirectoryError, count_entries, data_start, end_record

UPDATE_SCRIPT = "update.sh"
ROLLBACK_SCRIPT = "rollback.sh"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.json.sig"


class ArchiveError(ValueError):
    """A release file that must not be unpacked; the message names the member."""


RATIO_SLACK = 4096
"""Bytes a member (or the archive) may unpack to beyond ``max_ratio`` times its
compressed size: tiny members compress at odd ratios, and this bounds what a
member can add to a bomb, since the archive as a whole is held to the ratio too."""
DIRECTORY_BYTES_PER_MEMBER = 1024
"""Central directory bytes allowed per member (46 fixed, the name, extras, comment)."""
_DIRECTORY_FLOOR = 64 * 1024
BLOCK = 1024 * 1024
"""Bytes read at a time when unpacking (a reused buffer for stored members)."""
PIECE = 16 * 1024 * 1024
"""Bytes of a stored member copied at a time; each piece is checked while the next is copied."""
WRITEBACK_FROM = 1024 * 1024
"""A piece at least this large is written back at once; smaller ones wait for the syncfs
(one request per small file would start one small write each)."""
PARALLEL_FROM = 4 * 1024 * 1024
"""A stored member above this size is checked on another thread while it is copied."""
_METHODS = {
    zipfile.ZIP_STORED: "stored",
    zipfile.ZIP_DEFLATED: "deflated",
    zipfile.ZIP_BZIP2: "bzip2",
    zipfile.ZIP_LZMA: "lzma",
}
_READ_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    NotImplementedError,
    RuntimeError,
    EOFError,
    OSError,
    ValueError,
    struct.error,
    zlib.error,
    lzma.LZMAError,
    UnicodeDecodeError,
)


@dataclass(frozen=True)
class Limits:
    max_members: int = 10_000
    max_unpacked_size: int = 8 * 1024**3
    max_ratio: float = 200.0

    @property
    def max_directory_size(self) -> int:
        """The largest central directory read: proportional to ``max_members``."""
        return max(_DIRECTORY_FLOOR, self.max_members * DIRECTORY_BYTES_PER_MEMBER)


@dataclass(frozen=True)
class Member:
    name: str
    """The normalised relative path."""
    info: zipfile.ZipInfo

    @property
    def is_dir(self) -> bool:
        return self.info.is_dir()


def check_archive(path: Path, limits: Limits) -> list[Member]:
    """The members of ``path`` when it is a safe release; ArchiveError otherwise."""
    with _reading(path.name), path.open("rb") as file:
        infos = entries(file, path.name, limits)
    members: list[Member] = []
    seen: set[str] = set()
    total = 0
    compressed = 0
    for info in infos:
        name = safe_name(info.filename)
        check_type(info, name)
        key = name.rstrip("/")
        if key in seen:
            raise ArchiveError(f"{name}: duplicate member")
        seen.add(key)
        _check_encoding(info, name)
        total += info.file_size
        compressed += info.compress_size
        if total > limits.max_unpacked_size:
            raise ArchiveError(f"unpacked size above the limit of {limits.max_unpacked_size} bytes")
        if info.file_size > limits.max_ratio * info.compress_size + RATIO_SLACK:
            raise ArchiveError(f"{name}: compression ratio above {limits.max_ratio:g}")
        members.append(Member(key, info))
    if total > limits.max_ratio * compressed + RATIO_SLACK:
        raise ArchiveError(
            f"{path.name}: compression ratio of the archive as a whole above {limits.max_ratio:g}"
        )
    names = {m.name for m in members if not m.is_dir}
    if UPDATE_SCRIPT not in names:
        raise ArchiveError(f"no {UPDATE_SCRIPT} at the root of the release")
    for member in members:  # a file may not also be a folder of another member
        parents = PurePosixPath(member.name).parents
        for parent in list(parents)[:-1]:
            if str(parent) in names:
                raise ArchiveError(f"{member.name}: {parent} is both a file and a folder")
    return members


def entries(file: BinaryIO, label: str, limits: Limits) -> list[zipfile.ZipInfo]:
    """The entries of the zip open as ``file``, parsed only once count and size are in bounds."""
    try:
        directory = end_record(file)
        if directory.entries > limits.max_members:
            raise ArchiveError(
                f"{label}: {directory.entries} members, more than the limit of {limits.max_members}"
            )
        if directory.size > limits.max_directory_size:
            raise ArchiveError(
                f"{label}: central directory of {directory.size} bytes, more than the limit "
                f"of {limits.max_directory_size} for {limits.max_members} members"
            )
        found = count_entries(file, directory, limits.max_members)
    except DirectoryError as exc:
        raise ArchiveError(f"{label}: not a valid zip file: {exc}") from None
    if found > limits.max_members:
        raise ArchiveError(
            f"{label}: more than the limit of {limits.max_members} members in the central "
            f"directory (its end record says {directory.entries})"
        )
    if found != directory.entries:
        raise ArchiveError(
            f"{label}: the central directory holds {found} entries, "
            f"its end record says {directory.entries}"
        )
    file.seek(0)
    with zipfile.ZipFile(file) as archive:
        return archive.infolist()


def _check_encoding(info: zipfile.ZipInfo, name: str) -> None:
    if info.flag_bits & 0x1:
        raise ArchiveError(f"{name}: encrypted member")
    if info.compress_type not in _METHODS:
        raise ArchiveError(f"{name}: compression method {info.compress_type} not supported")
    if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
        raise ArchiveError(f"{name}: stored member whose sizes disagree")


@contextlib.contextmanager
def _reading(member: str) -> Iterator[None]:
    """Turn whatever zipfile or the file raises while reading ``member`` into ArchiveError."""
    try:
        yield
    except ArchiveError:
        raise
    except _READ_ERRORS as exc:
        raise ArchiveError(f"{member}: {_why(exc)}") from None


def _why(exc: BaseException) -> str:
    """A short reason for an error raised while reading an archive."""
    text = str(exc)
    known = (
        ("Bad CRC-32", "CRC-32 mismatch: the data is corrupt"),
        ("File name in directory", "local header disagrees with the central directory"),
        ("Bad magic number for file header", "no local header where the directory points"),
        ("Truncated file header", "truncated local header"),
        ("Overlapped entries", "overlaps another member"),
        ("compression method is not supported", "compression method not supported"),
        ("File is not a zip file", "not a valid zip file"),
        ("Truncated central directory", "not a valid zip file: truncated central directory"),
        ("Bad magic number for central directory", "not a valid zip file: broken directory"),
    )
    if isinstance(exc, RuntimeError) and "encrypted" in text:
        return "encrypted member"
    for needle, reason in known:
        if needle in text:
            return reason
    if isinstance(exc, EOFError):
        return "truncated: the data ends early"
    if isinstance(exc, (zlib.error, lzma.LZMAError)):
        return "corrupt compressed data"
    if isinstance(exc, OSError) and exc.strerror:
        return f"cannot be read: {exc.strerror}"
    return f"unreadable ({type(exc).__name__}: {text[:80]})"


def unpacked_size(members: list[Member]) -> int:
    return sum(m.info.file_size for m in members)


def safe_name(raw: str) -> str:
    if "\x00" in raw or any(ord(c) < 32 for c in raw):
        raise ArchiveError(f"{raw!r}: control character in member name")
    if "\\" in raw:
        raise ArchiveError(f"{raw!r}: backslash in member name")
    if raw.startswith("/") or (len(raw) > 1 and raw[1] == ":"):
        raise ArchiveError(f"{raw}: absolute member path")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(f"{raw}: '..' in member path")
    if not parts:
        raise ArchiveError(f"{raw!r}: empty member name")
    return "/".join(parts) + ("/" if raw.endswith("/") else "")


def check_type(info: zipfile.ZipInfo, name: str) -> None:
    mode = info.external_attr >> 16
    kind = stat.S_IFMT(mode)
    if info.create_system == 3 and kind not in (0, stat.S_IFREG, stat.S_IFDIR):  # 3 = Unix
        what = "symbolic link" if kind == stat.S_IFLNK else "special file"
        raise ArchiveError(f"{name}: {what} not allowed")


def unpack(
    path: Path, members: list[Member], target: Path, expected: dict[str, tuple[int, str]] | None
) -> None:
    """Unpack ``members`` of ``path`` so that ``target`` is replaced as a whole.

    ``expected`` maps file names to (size, sha256 hex) from a verified manifest;
    when given, every file must be listed and match. On any error nothing of the
    new tree is left and ``target`` is untouched.
    """
    parent = target.parent
    staging = parent / f".{target.name}.new"
    _remove(staging)
    staging.mkdir(mode=0o755)
    try:
        with _reading(path.name):
            archive = zipfile.ZipFile(path)
        with archive, path.open("rb") as source:
            bounds = _data_bounds(members, archive.start_dir)
            for member in members:
                _extract(archive, source, bounds, member, staging, expected)
                killpoints.reached("unpack_member")
        if expected is not None:
            files = {m.name for m in members if not m.is_dir} - {MANIFEST, SIGNATURE}
            missing = sorted(set(expected) - files)
            if missing:
                raise ArchiveError(f"{missing[0]}: listed in the manifest but missing")
    except BaseException:
        _remove(staging)
        raise
    killpoints.reached("unpack_staged")
    old = parent / f".{target.name}.old"
    _remove(old)
    if target.exists():
        target.replace(old)
    staging.replace(target)
    killpoints.reached("unpack_swapped")
    _remove(old)


def _data_bounds(members: list[Member], directory_start: int) -> dict[int, int]:
    """For each local header offset, where the next one (or the central directory) starts:
    a member's data must end there, or it overlaps another (as zipfile 3.12 checks)."""
    offsets = sorted({m.info.header_offset for m in members})
    return dict(zip(offsets, [*offsets[1:], directory_start], strict=True))


def _extract(
    archive: zipfile.ZipFile,
    source: BinaryIO,
    bounds: dict[int, int],
    member: Member,
    root: Path,
    expected: dict[str, tuple[int, str]] | None,
) -> None:
    dest = root.joinpath(*member.name.split("/"))
    if member.is_dir:
        dest.mkdir(mode=0o755, parents=True, exist_ok=True)
        return
    signed_member = member.name not in (MANIFEST, SIGNATURE)
    if expected is not None and signed_member and member.name not in expected:
        raise ArchiveError(f"{member.name}: not in the signed manifest")
    dest.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    executable = bool((member.info.external_attr >> 16) & 0o111)
    want = expected.get(member.name) if expected is not None else None
    hasher = hashlib.sha256() if want is not None else None
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(dest, flags, 0o755 if executable else 0o644)
    with os.fdopen(fd, "wb") as out:
        with _reading(member.name):
            opened = archive.open(member.info)  # zipfile checks the local header here
        with opened:
            if member.info.compress_type == zipfile.ZIP_STORED:
                size = _copy_stored(source, bounds, member, out.fileno(), hasher)
            else:
                size = _copy_decoded(opened, member, out, hasher)
    if want is not None and hasher is not None and (size, hasher.hexdigest()) != want:
        raise ArchiveError(f"{member.name}: differs from the signed manifest")


def _copy_decoded(
    source: IO[bytes], member: Member, out: IO[bytes], hasher: hashlib._Hash | None
) -> int:
    """Decompress ``member`` into ``out`` (zipfile checks its CRC-32); the bytes written."""
    size = 0
    while True:
        with _reading(member.name):  # disk errors while writing stay OSError
            block = source.read(BLOCK)
        if not block:
            break
        size += len(block)
        if size > member.info.file_size:  # never trust the declared size alone
            raise ArchiveError(f"{member.name}: larger than declared")
        if hasher is not None:
            hasher.update(block)
        out.write(block)
    if size != member.info.file_size:
        raise ArchiveError(f"{member.name}: smaller than declared")
    return size


def _copy_stored(
    source: BinaryIO, bounds: dict[int, int], member: Member, out: int, hasher: hashlib._Hash | None
) -> int:
    """Copy a stored member's bytes into ``out`` (opened for reading too) inside the
    kernel (``copy_file_range``: no pass through Python, a reflink where the filesystem
    has them), and check the CRC-32 (and SHA-256) of what was written, each piece read
    back from the page cache on another thread while the next is copied; the bytes
    written."""
    info = member.info
    if info.compress_size != info.file_size:
        raise ArchiveError(f"{member.name}: stored member whose sizes disagree")
    with _reading(member.name):
        start = data_start(source, info.header_offset)
    if start is None:
        raise ArchiveError(f"{member.name}: no local header where the directory points")
    length = info.compress_size
    if start + length > bounds[info.header_offset]:
        raise ArchiveError(f"{member.name}: overlaps another member")
    written = _Written(out, hasher, length)
    with _pipeline(length > PARALLEL_FROM) as check:
        copied = 0
        while copied < length:
            piece = min(PIECE, length - copied)
            got = _copy_range(source.fileno(), out, start + copied, copied, piece, member.name)
            if got:
                check(written.add, copied, got)
                if got >= WRITEBACK_FROM:  # the syncfs after unpacking waits less
                    start_writeback(out, copied, got)
            copied += got
            if got < piece:
                break
    if copied != length:
        raise ArchiveError(f"{member.name}: truncated: the data ends early")
    if written.crc != info.CRC:
        raise ArchiveError(f"{member.name}: CRC-32 mismatch: the data is corrupt")
    return copied


@contextlib.contextmanager
def _pipeline(parallel: bool) -> Iterator[Callable[[Callable[[int, int], None], int, int], None]]:
    """``check(step, offset, length)``: run now, or in order on one other thread (whose
    errors are raised on leaving, and whose pending steps are dropped on an error)."""
    if not parallel:
        yield lambda step, offset, length: step(offset, length)
        return
    checker = ThreadPoolExecutor(1, thread_name_prefix="unpack-check")
    pending: deque[Future[None]] = deque()

    def check(step: Callable[[int, int], None], offset: int, length: int) -> None:
        while pending and pending[0].done():  # a failed check stops the copy here
            pending.popleft().result()
        pending.append(checker.submit(step, offset, length))

    try:
        yield check
        for future in pending:
            future.result()
    finally:
        checker.shutdown(wait=True, cancel_futures=True)


class _Written:
    """The CRC-32 (and SHA-256) of a file's bytes, fed in order, read back from it."""

    def __init__(self, fd: int, hasher: hashlib._Hash | None, size: int) -> None:
        self.fd, self.hasher, self.crc = fd, hasher, 0
        self._view = memoryview(bytearray(max(1, min(BLOCK, size))))

    def add(self, offset: int, length: int) -> None:
        done = 0
        while done < length:
            got = os.preadv(self.fd, [self._view[: length - done]], offset + done)
            if got == 0:
                raise OSError(errno.EIO, "the unpacked file is shorter than what was written")
            block = self._view[:got]
            self.crc = zlib.crc32(block, self.crc)
            if self.hasher is not None:
                self.hasher.update(block)
            done += got


def _copy_range(source: int, out: int, offset: int, to: int, length: int, label: str) -> int:
    """Copy ``length`` bytes of ``source`` from ``offset`` to ``out`` at ``to``; the bytes
    copied (fewer only when ``source`` ends early).

    ``copy_file_range`` first. Where it copies nothing or fails (other filesystems,
    older kernels, a read or write error: it cannot say which), the rest goes through
    a buffer, so that an error reading ``source`` is an ArchiveError naming ``label``
    and one writing ``out`` (a full disk) stays an OSError. Writes are completed.
    """
    done = 0
    try:
        while done < length:
            got = os.copy_file_range(source, out, length - done, offset + done, to + done)
            if got == 0:
                break  # the end of ``source``, or a filesystem that copies nothing: see below
            done += got
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
    view = memoryview(bytearray(min(BLOCK, max(length - done, 1))))
    while done < length:
        with _reading(label):
            got = os.preadv(source, [view[: min(len(view), length - done)]], offset + done)
        if got == 0:
            break
        written = 0
        while written < got:
            written += os.pwrite(out, view[written:got], to + done + written)
        done += got
    return done


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def read_member(path: Path, name: str, limit: int = 16 * 1024 * 1024) -> bytes | None:
    """The bytes of member ``name`` (at most ``limit``), or None when absent."""
    with _reading(name), zipfile.ZipFile(path) as archive:
        try:
            info = archive.getinfo(name)
        except KeyError:
            return None
        if info.file_size > limit:
            raise ArchiveError(f"{name}: larger than {limit} bytes")
        with contextlib.closing(archive.open(info)) as file:
            return file.read(limit + 1)[:limit]
