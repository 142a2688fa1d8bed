"""A release offered by the server, and the rule for which version strings are safe."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

MAX_VERSION_LENGTH = 128
"""Bytes (UTF-8): with ``.zip.part`` appended, a version is still a valid file name."""


class UnsafeVersionError(ValueError):
    """A version string that must never become part of a path."""


def check_version(version: str) -> str:
    """``version`` unchanged when it is safe to use in file names; else UnsafeVersionError.

    Versions are opaque strings compared for equality. They are refused when
    empty, longer than 128 bytes in UTF-8 (a file name holds 255), holding
    ``/``, ``\\``, ``..``, NUL or any other control character, or characters
    an HTTP header cannot carry (outside Latin-1: the version is sent back as
    the ``Version`` header).
    """
    if not version:
        raise UnsafeVersionError("empty version")
    if len(version.encode("utf-8", "surrogatepass")) > MAX_VERSION_LENGTH:
        raise UnsafeVersionError(f"version longer than {MAX_VERSION_LENGTH} bytes")
    if "/" in version or "\\" in version or ".." in version:
        raise UnsafeVersionError(f"version {version[:40]!r} holds a path separator or '..'")
    if any(ord(c) < 32 or ord(c) == 127 for c in version):
        raise UnsafeVersionError(f"version {version[:40]!r} holds a control character")
    try:
        version.encode("latin-1")
    except UnicodeEncodeError:
        raise UnsafeVersionError(
            f"version {version[:40]!r} holds characters an HTTP header cannot carry"
        ) from None
    return version


@dataclass(frozen=True)
class Release:
    """One release file as the server described it, and where it lives on this device."""

    version: str
    size: int
    digest: str
    """The SHA-256 in RFC 9530 form, ``sha-256=:<base64>:``."""
    etag: str = ""
    path: Path = Path()
    """The downloaded zip (complete once the status is ``update_ready``)."""
    workdir: Path | None = None
    """The unpacked release, once it exists (``.store/ota/current``)."""
    min_version: str = ""
    max_version: str = ""
    filename: str = ""
    """The server's file name (Content-Disposition), for display only."""

    @property
    def part_path(self) -> Path:
        """Where the download grows until it is verified and renamed to ``path``."""
        return self.path.with_name(self.path.name + ".part")

    def with_workdir(self, workdir: Path) -> Release:
        return dataclasses.replace(self, workdir=workdir)
