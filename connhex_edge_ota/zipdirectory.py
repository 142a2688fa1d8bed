"""A zip's end record (ZIP64 included) and central directory, measured before zipfile reads them.

``zipfile.ZipFile`` reads the whole central directory into memory and builds a
``ZipInfo`` per entry before anyone can look at the count: a 54 MB archive of a
million empty entries costs hundreds of MiB. Here the end record is read by
hand, exactly as zipfile will read it, and the directory is walked entry by
entry (fixed headers only, nothing kept) so that a count or size over the
limits is refused first.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO

_EOCD = struct.Struct("<4s4H2LH")
_EOCD_SIG = b"PK\x05\x06"
_LOCATOR = struct.Struct("<4sLQL")
_LOCATOR_SIG = b"PK\x06\x07"
_EOCD64 = struct.Struct("<4sQ2H2L4Q")
_EOCD64_SIG = b"PK\x06\x06"
_ENTRY = struct.Struct("<4s4B4HL2L5H2L")
_ENTRY_SIG = b"PK\x01\x02"
_MAX_COMMENT = 0xFFFF


class DirectoryError(ValueError):
    """The end record or the central directory is broken, or over a limit."""


@dataclass(frozen=True)
class Directory:
    """Where the central directory is and what the end record says about it."""

    entries: int
    """Entries the end record announces (ZIP64 record when there is one)."""
    start: int
    size: int
    zip64: bool


def end_record(file: BinaryIO) -> Directory:
    """The central directory as zipfile (3.11 to 3.13) will locate it; DirectoryError otherwise."""
    file.seek(0, 2)
    file_size = file.tell()
    if file_size < _EOCD.size:
        raise DirectoryError("too short for an end of central directory record")
    # zipfile first tries a record with no comment at the very end, then searches backwards.
    file.seek(file_size - _EOCD.size)
    data = file.read(_EOCD.size)
    if data[:4] == _EOCD_SIG and data[-2:] == b"\0\0":
        location = file_size - _EOCD.size
    else:
        window_start = max(file_size - _MAX_COMMENT - _EOCD.size, 0)
        file.seek(window_start)
        data = file.read()
        found = data.rfind(_EOCD_SIG)
        if found < 0 or len(data) - found < _EOCD.size:
            raise DirectoryError("no end of central directory record")
        location = window_start + found
        data = data[found : found + _EOCD.size]
    _sig, disk, cd_disk, on_disk, entries, size, offset, _comment = _EOCD.unpack(data)
    zip64 = False
    records_start = location
    if location >= _LOCATOR.size + _EOCD64.size:
        file.seek(location - _LOCATOR.size)
        sig, cd64_disk, cd64_offset, disks = _LOCATOR.unpack(file.read(_LOCATOR.size))
        if sig == _LOCATOR_SIG:
            if cd64_disk != 0 or disks > 1:
                raise DirectoryError("archives spanning several disks are not supported")
            record_at = location - _LOCATOR.size - _EOCD64.size
            file.seek(record_at)
            record = _EOCD64.unpack(file.read(_EOCD64.size))
            if record[0] == _EOCD64_SIG:
                # zipfile reads the record just before the locator (3.11) or where the
                # locator points (later versions): both must be the same record.
                if cd64_offset != record_at or record[1] != _EOCD64.size - 12:
                    raise DirectoryError("ZIP64 end record is not where its locator points")
                _s, _l, _v1, _v2, disk, cd_disk, on_disk, entries, size, offset = record
                zip64 = True
                records_start = record_at
    if disk != 0 or cd_disk != 0 or on_disk != entries:
        raise DirectoryError("archives spanning several disks are not supported")
    start = records_start - size
    if start < 0 or start != offset:
        # zipfile tolerates data before the archive; a release has no reason to carry any.
        raise DirectoryError(
            f"central directory offset {offset} and size {size} disagree with the end record"
        )
    return Directory(entries=entries, start=start, size=size, zip64=zip64)


def count_entries(file: BinaryIO, directory: Directory, limit: int) -> int:
    """The entries in the central directory, walked as zipfile walks it.

    Stops at ``limit + 1`` entries (more are not counted) and with DirectoryError
    at a broken header; keeps nothing but the count.
    """
    position, end, count = directory.start, directory.start + directory.size, 0
    while position < end:
        file.seek(position)
        header = file.read(_ENTRY.size)
        if len(header) != _ENTRY.size or position + _ENTRY.size > end:
            raise DirectoryError(f"central directory truncated at entry {count + 1}")
        fields = _ENTRY.unpack(header)
        if fields[0] != _ENTRY_SIG:
            raise DirectoryError(f"central directory entry {count + 1} has a bad signature")
        count += 1
        if count > limit:
            break
        name_length, extra_length, comment_length = fields[12:15]
        position += _ENTRY.size + name_length + extra_length + comment_length
    return count


LOCAL_SIG = b"PK\x03\x04"
LOCAL_HEADER = 30
"""Fixed part of a local file header; the name and the extra field follow it."""


def data_start(file: BinaryIO, header_offset: int) -> int | None:
    """Where the data of the member whose local header is at ``header_offset`` begins
    (None when no local header is there)."""
    file.seek(header_offset)
    header = file.read(LOCAL_HEADER)
    if len(header) < LOCAL_HEADER or header[:4] != LOCAL_SIG:
        return None
    name_length, extra_length = struct.unpack_from("<HH", header, 26)
    return int(header_offset + LOCAL_HEADER + name_length + extra_length)
