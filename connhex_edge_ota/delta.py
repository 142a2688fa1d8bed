"""Zip deltas over HTTP ``Range``: rebuild a new release from the installed one's unchanged members.

A zip's central directory (at its end) lists every member with its CRC-32,
method, sizes and where its local header starts. Members of the new release
that have the same name, CRC-32, method and sizes as a member of the release
zip the device installed last have the same compressed bytes: those are
copied from the old zip, and only the rest (local headers, changed members,
the directory itself) is fetched with ``Range``. The result is written in the
order of the new file, so a cut leaves an ordinary resumable prefix; the
release's own digest then proves the rebuilt file bit for bit (a mismatch
falls back to a full download, in :mod:`connhex_edge_ota.client`).

Nothing from either zip is trusted: offsets must lie inside their file and
members may not overlap; anything odd simply means "no delta".
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from connhex_edge_ota import zipdirectory

EOCD = b"PK\x05\x06"
EOCD64 = b"PK\x06\x06"
EOCD64_LOCATOR = b"PK\x06\x07"
CENTRAL = b"PK\x01\x02"
CENTRAL_HEADER = 46
TAIL = 64 * 1024 + 22
"""The end-of-central-directory record is within this many bytes of the end."""
PROBE = 8 * 1024
"""The first request of a delta: the end records, and the whole directory of a small zip."""
MIN_GAIN = 64 * 1024
"""Below this many bytes to fetch, a delta cannot save what its requests cost."""
MAX_DIRECTORY = 16 * 1024 * 1024
"""A central directory larger than this is not worth a delta (nor our memory)."""
GAP = 4096
"""Local bytes between two fetched ranges below which one request fetches both."""
MAX_SHARE = 0.7
"""A delta that would fetch more than this share of the release is not worth it."""


class NoDelta(Exception):
    """No delta for this release (the reason is for the log); download it whole."""

    def __init__(self, reason: str, dropped: bool = False) -> None:
        super().__init__(reason)
        self.dropped = dropped
        """The partial file is useless (deleted): the whole release starts from zero."""
        self.fetched = 0
        """Bytes the delta fetched before it gave up (they count in what the download cost)."""


@dataclass(frozen=True)
class Entry:
    """One central-directory entry, as much as a delta needs."""

    name: bytes
    flags: int
    method: int
    crc: int
    compressed: int
    size: int
    offset: int
    """Where its local header starts."""
    local_fields: bytes = b""
    """Version needed, flags, method, time and date: what its local header repeats."""

    @property
    def key(self) -> tuple[bytes, int, int, int, int]:
        return (self.name, self.crc, self.method, self.compressed, self.size)


@dataclass(frozen=True)
class Directory:
    entries: list[Entry]
    start: int
    """Where the central directory starts (= where the last member's region ends)."""


@dataclass(frozen=True)
class Fetch:
    """Bytes ``[start, end)`` of the new release, from the server."""

    start: int
    end: int


@dataclass(frozen=True)
class Copy:
    """Bytes ``[start, end)`` of the new release, copied from ``source`` of the old zip."""

    start: int
    end: int
    source: int


@dataclass(frozen=True)
class Known:
    """Bytes ``[start, end)`` of the new release that were already fetched (the tail)."""

    start: int
    end: int
    data: bytes


@dataclass(frozen=True)
class Guess:
    """Bytes ``[start, end)`` of the new release rebuilt, not fetched: an unchanged member's
    local header, from the old one with the new directory's fields (its time above all).

    Zip writers repeat the directory's fields in the local header, so the guess is
    nearly always right; the release digest decides, and when it disagrees the real
    headers are fetched (:meth:`Plan.guesses`) and the file checked again.
    """

    start: int
    end: int
    data: bytes


Segment = Fetch | Copy | Known | Guess


@dataclass(frozen=True)
class Plan:
    """How to rebuild the new release, in file order."""

    segments: list[Segment]
    size: int

    def remote_bytes(self, offset: int = 0) -> int:
        """Bytes still to fetch from ``offset`` on."""
        fetches = (s for s in self.segments if isinstance(s, Fetch))
        return sum(max(0, s.end - max(s.start, offset)) for s in fetches)

    def requests(self, offset: int = 0) -> int:
        return sum(1 for s in self.segments if isinstance(s, Fetch) and s.end > offset)

    def guesses(self) -> list[Guess]:
        """The rebuilt local headers, all of them (an earlier try may have written some)."""
        return [s for s in self.segments if isinstance(s, Guess)]


def probe_range(size: int) -> tuple[int, int]:
    """The range ``[start, end)`` to fetch first: the end records, unless a long comment
    pushes them further back (then :func:`tail_range`)."""
    return max(0, size - PROBE), size


def tail_range(size: int) -> tuple[int, int]:
    """The range ``[start, end)`` to fetch first: where the end records are."""
    return max(0, size - TAIL), size


def parse_directory(tail: bytes, tail_start: int, size: int, max_members: int) -> Directory:
    """The central directory of a zip of ``size`` bytes whose last bytes are ``tail``.

    ``tail`` must hold the whole directory (see :func:`directory_range`); NoDelta otherwise.
    """
    count, cd_size, cd_start = _end_records(tail, tail_start, size)
    if count > max_members:
        raise NoDelta(f"{count} members, more than the limit of {max_members}")
    if cd_start < tail_start:
        raise NoDelta("the central directory is not in the tail")
    directory = tail[cd_start - tail_start : cd_start - tail_start + cd_size]
    return Directory(_entries(directory, count, cd_start), cd_start)


def directory_range(tail: bytes, tail_start: int, size: int) -> tuple[int, int]:
    """Where the central directory and the end records are: ``[start, size)``."""
    _count, _cd_size, cd_start = _end_records(tail, tail_start, size)
    return cd_start, size


def read_directory(path: Path, max_members: int) -> Directory:
    """The central directory of the zip at ``path`` (the installed release)."""
    size = path.stat().st_size
    with path.open("rb") as file:
        start, _ = tail_range(size)
        file.seek(start)
        tail = file.read()
        cd_start, _ = directory_range(tail, start, size)
        if cd_start < start:
            file.seek(cd_start)
            start, tail = cd_start, file.read()
    return parse_directory(tail, start, size, max_members)


def _end_records(tail: bytes, tail_start: int, size: int) -> tuple[int, int, int]:
    """(entries, directory size, directory start) from the EOCD (ZIP64 included)."""
    at = tail.rfind(EOCD)
    if at < 0 or len(tail) - at < 22:
        raise NoDelta("no end-of-central-directory record")
    (_disk, _cd_disk, _here, count, cd_size, cd_start, _comment) = struct.unpack_from(
        "<HHHHIIH", tail, at + 4
    )
    if 0xFFFF in (count,) or 0xFFFFFFFF in (cd_size, cd_start):
        locator = at - 20
        if locator < 0 or tail[locator : locator + 4] != EOCD64_LOCATOR:
            raise NoDelta("ZIP64 locator missing")
        (eocd64,) = struct.unpack_from("<Q", tail, locator + 8)
        local = eocd64 - tail_start
        if local < 0 or local + 56 > locator or tail[local : local + 4] != EOCD64:
            raise NoDelta("ZIP64 end record not in the tail")
        count, cd_size, cd_start = struct.unpack_from("<QQQ", tail, local + 32)
        end = eocd64
    else:
        end = tail_start + at
    # The directory ends where the end records start: nothing is fetched or kept for
    # a directory that claims to start earlier than its size says.
    if cd_size > MAX_DIRECTORY or cd_start + cd_size != end or end > size:
        raise NoDelta("central directory out of bounds")
    return count, cd_size, cd_start


def _entries(directory: bytes, count: int, cd_start: int) -> list[Entry]:
    entries: list[Entry] = []
    pos = 0
    for _ in range(count):
        if directory[pos : pos + 4] != CENTRAL or pos + CENTRAL_HEADER > len(directory):
            raise NoDelta("broken central directory")
        (flags, method, _time, _date, crc, compressed, size, nlen, elen, clen) = struct.unpack_from(
            "<HHHHIIIHHH", directory, pos + 8
        )
        (offset,) = struct.unpack_from("<I", directory, pos + 42)
        local_fields = bytes(directory[pos + 6 : pos + 16])
        name = directory[pos + CENTRAL_HEADER : pos + CENTRAL_HEADER + nlen]
        extra = directory[pos + CENTRAL_HEADER + nlen : pos + CENTRAL_HEADER + nlen + elen]
        size, compressed, offset = _zip64(extra, size, compressed, offset)
        if offset >= cd_start:
            raise NoDelta("a member starts past the directory")
        entries.append(
            Entry(bytes(name), flags, method, crc, compressed, size, offset, local_fields)
        )
        pos += CENTRAL_HEADER + nlen + elen + clen
    return entries


def _zip64(extra: bytes, size: int, compressed: int, offset: int) -> tuple[int, int, int]:
    """Sizes and offset with ZIP64 extra-field values where the 32-bit ones are saturated."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, pos)
        if tag == 0x0001:
            values = extra[pos + 4 : pos + 4 + length]
            at = 0
            fields = [size, compressed, offset]
            for i, value in enumerate(fields):
                if value == 0xFFFFFFFF:
                    if at + 8 > len(values):
                        raise NoDelta("short ZIP64 extra field")
                    (fields[i],) = struct.unpack_from("<Q", values, at)
                    at += 8
            return fields[0], fields[1], fields[2]
        pos += 4 + length
    return size, compressed, offset


def plan(
    new: Directory,
    tail: Known,
    size: int,
    old_path: Path,
    old: Directory,
    guess: bool = True,
) -> Plan:
    """How to rebuild the new release (``size`` bytes) from ``old_path`` and ranges.

    With ``guess``, the local headers of unchanged members are rebuilt (:class:`Guess`)
    rather than fetched: a release of many small files then costs a request per
    changed member, not one per member.
    """
    old_members = {e.key: e for e in old.entries if not e.flags & 0x08}
    old_size = old_path.stat().st_size
    segments: list[Segment] = []
    ordered = sorted(new.entries, key=lambda e: e.offset)
    position = 0
    with old_path.open("rb") as old_file:
        for i, entry in enumerate(ordered):
            end = ordered[i + 1].offset if i + 1 < len(ordered) else new.start
            if entry.offset < position or end < entry.offset:
                raise NoDelta("members overlap")
            if entry.offset > position:
                segments.append(Fetch(position, entry.offset))
            position = end
            match = old_members.get(entry.key)
            data_start = end - entry.compressed
            source = _data_start(old_file, match, old_size) if match is not None else None
            header_fits = data_start - entry.offset >= zipdirectory.LOCAL_HEADER + len(entry.name)
            if source is None or entry.flags & 0x08 or not header_fits or entry.compressed == 0:
                segments.append(Fetch(entry.offset, end))
                continue
            assert match is not None
            header = _local_header(old_file, match, source, entry) if guess else None
            if header is not None and len(header) == data_start - entry.offset:
                segments.append(Guess(entry.offset, data_start, header))
            else:
                segments.append(Fetch(entry.offset, data_start))
            segments.append(Copy(data_start, end, source))
    if position > tail.start:
        raise NoDelta("members overlap the directory")
    if tail.start > position:
        segments.append(Fetch(position, tail.start))
    segments.append(tail)
    if tail.end != size:
        raise NoDelta("the tail does not end the file")
    return Plan(_coalesce(segments), size)


def _data_start(old_file: BinaryIO, entry: Entry, old_size: int) -> int | None:
    """Where ``entry``'s compressed bytes start in the old zip (from its local header)."""
    start = zipdirectory.data_start(old_file, entry.offset)
    if start is None or start + entry.compressed > old_size:
        return None
    return start


def _local_header(old_file: BinaryIO, old: Entry, data_start: int, new: Entry) -> bytes | None:
    """``new``'s local header as it most likely is: the old member's, whose data is the
    same, with the fields the new directory gives (version, flags, method, time, date)."""
    length = data_start - old.offset
    if length > zipdirectory.LOCAL_HEADER + 2 * 0xFFFF or len(new.local_fields) != 10:
        return None
    old_file.seek(old.offset)
    header = bytearray(old_file.read(length))
    if len(header) != length:
        return None
    header[4:14] = new.local_fields
    return bytes(header)


def _coalesce(segments: list[Segment]) -> list[Segment]:
    """Merge adjacent fetches, and fetches separated by a copy shorter than GAP."""
    merged: list[Segment] = []
    for segment in segments:
        if segment.end <= segment.start and not isinstance(segment, Known | Guess):
            continue
        if isinstance(segment, Fetch) and merged:
            last = merged[-1]
            if isinstance(last, Fetch) and last.end == segment.start:
                merged[-1] = Fetch(last.start, segment.end)
                continue
            if (
                isinstance(last, Copy)
                and last.end - last.start < GAP
                and len(merged) >= 2
                and isinstance(merged[-2], Fetch)
                and merged[-2].end == last.start
            ):
                merged[-2:] = [Fetch(merged[-2].start, segment.end)]
                continue
        merged.append(segment)
    return merged


def local_chunks(old_path: Path, copy: Copy, offset: int, chunk: int) -> Iterator[bytes]:
    """The bytes of ``copy`` from the new file's ``offset`` on, read from the old zip."""
    start = max(copy.start, offset)
    remaining = copy.end - start
    with old_path.open("rb") as old_file:
        old_file.seek(copy.source + (start - copy.start))
        while remaining > 0:
            block = old_file.read(min(chunk, remaining))
            if not block:
                raise NoDelta("the installed release zip changed while copying from it")
            remaining -= len(block)
            yield block
