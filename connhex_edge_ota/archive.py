"""Release zips: refuse a hostile or broken archive as a whole, then unpack it safely.

Nothing from the archive is trusted: member names, types, sizes and counts are
checked before a single byte is written, and the unpacked tree is built in a
temporary folder that replaces ``current/`` only once complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from connhex_edge_ota import killpoints

UPDATE_SCRIPT = "update.sh"
ROLLBACK_SCRIPT = "rollback.sh"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.json.sig"


class ArchiveError(ValueError):
    """A release file that must not be unpacked; the message names the member."""


@dataclass(frozen=True)
class Limits:
    max_members: int = 10_000
    max_unpacked_size: int = 8 * 1024**3
    max_ratio: float = 200.0


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
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ArchiveError(f"not a valid zip file: {exc}") from None
    if len(infos) > limits.max_members:
        raise ArchiveError(f"{len(infos)} members, more than the limit of {limits.max_members}")
    members: list[Member] = []
    seen: set[str] = set()
    total = 0
    for info in infos:
        name = _safe_name(info.filename)
        _check_type(info, name)
        key = name.rstrip("/")
        if key in seen:
            raise ArchiveError(f"{name}: duplicate member")
        seen.add(key)
        total += info.file_size
        if total > limits.max_unpacked_size:
            raise ArchiveError(f"unpacked size above the limit of {limits.max_unpacked_size} bytes")
        if info.file_size > 1024 * 1024 and info.file_size > limits.max_ratio * max(
            info.compress_size, 1
        ):
            raise ArchiveError(f"{name}: compression ratio above {limits.max_ratio:g}")
        members.append(Member(key, info))
    names = {m.name for m in members if not m.is_dir}
    if UPDATE_SCRIPT not in names:
        raise ArchiveError(f"no {UPDATE_SCRIPT} at the root of the release")
    for member in members:  # a file may not also be a folder of another member
        parents = PurePosixPath(member.name).parents
        for parent in list(parents)[:-1]:
            if str(parent) in names:
                raise ArchiveError(f"{member.name}: {parent} is both a file and a folder")
    return members


def unpacked_size(members: list[Member]) -> int:
    return sum(m.info.file_size for m in members)


def _safe_name(raw: str) -> str:
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


def _check_type(info: zipfile.ZipInfo, name: str) -> None:
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
        with zipfile.ZipFile(path) as archive:
            for member in members:
                _extract(archive, member, staging, expected)
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


def _extract(
    archive: zipfile.ZipFile,
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
    hasher = hashlib.sha256()
    size = 0
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(dest, flags, 0o755 if executable else 0o644)
    with os.fdopen(fd, "wb") as out, archive.open(member.info) as source:
        while block := source.read(256 * 1024):
            size += len(block)
            if size > member.info.file_size:  # never trust the declared size alone
                raise ArchiveError(f"{member.name}: larger than declared")
            hasher.update(block)
            out.write(block)
    if expected is not None and member.name in expected:
        want_size, want_hash = expected[member.name]
        if size != want_size or hasher.hexdigest() != want_hash:
            raise ArchiveError(f"{member.name}: differs from the signed manifest")


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def read_member(path: Path, name: str, limit: int = 16 * 1024 * 1024) -> bytes | None:
    """The bytes of member ``name`` (at most ``limit``), or None when absent."""
    with zipfile.ZipFile(path) as archive:
        try:
            info = archive.getinfo(name)
        except KeyError:
            return None
        if info.file_size > limit:
            raise ArchiveError(f"{name}: larger than {limit} bytes")
        with contextlib.closing(archive.open(info)) as file:
            return file.read(limit + 1)[:limit]
