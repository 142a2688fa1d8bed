"""The server's version constraints on a release: ``Min-Version`` and ``Max-Version``.

Everywhere else versions are opaque strings compared for equality. Here only,
and only when the release carries a constraint, the running version and the
bounds are read as versions: semantic versions (semver.org) when all of them
are, else PEP 440 versions (through ``packaging``). When one of them reads as
neither, the constraint is not enforced, and that is logged once.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from functools import total_ordering
from typing import Any, Protocol

from packaging.version import InvalidVersion, Version

log = logging.getLogger(__name__)


class _Ordered(Protocol):
    def __lt__(self, other: Any, /) -> bool: ...


# The regular expression semver.org gives (with an optional leading "v").
_IDENTIFIER = r"(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)"
_SEMVER = re.compile(
    r"^v?(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    rf"(?:-({_IDENTIFIER}(?:\.{_IDENTIFIER})*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)


@total_ordering
@dataclass(frozen=True)
class SemVer:
    """A semantic version, ordered by semver.org precedence (build metadata ignored)."""

    core: tuple[int, int, int]
    prerelease: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> SemVer | None:
        match = _SEMVER.match(text.strip())
        if match is None:
            return None
        major, minor, patch, pre, _build = match.groups()
        return cls((int(major), int(minor), int(patch)), tuple(pre.split(".")) if pre else ())

    def _key(self) -> tuple[object, ...]:
        # A release sorts after its prereleases; numeric identifiers before alphanumeric ones.
        pre = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in self.prerelease)
        return (self.core, not self.prerelease, pre)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, SemVer):
            return NotImplemented
        return self._key() < other._key()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SemVer):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


def _parse_all(texts: list[str]) -> list[_Ordered] | None:
    """All of ``texts`` as semantic versions, else all as PEP 440 versions, else None."""
    semvers = [SemVer.parse(t) for t in texts]
    if all(v is not None for v in semvers):
        return [v for v in semvers if v is not None]
    try:
        return [Version(t.strip()) for t in texts]
    except InvalidVersion:
        return None


_reported: set[tuple[str, str, str, str]] = set()
"""Unenforceable constraints already logged (so a check every minute logs them once)."""


def refusal(version: str, current: str, min_version: str, max_version: str) -> str:
    """Why release ``version`` cannot be installed over ``current``; "" when it can.

    ``min_version`` is the inclusive minimum installed version, ``max_version``
    the exclusive maximum; "" means no bound. Versions that do not parse leave
    the constraint unenforced ("" is returned), with one log line saying so.
    """
    bounds = [b for b in (min_version, max_version) if b]
    if not bounds:
        return ""
    parsed = _parse_all([current, *bounds]) if current else None
    if parsed is None:
        key = (version, current, min_version, max_version)
        if key not in _reported:
            if len(_reported) > 100:
                _reported.clear()
            _reported.add(key)
            log.warning(
                "release %s: constraint %s not enforced: the versions do not parse (installed %r)",
                _short(version),
                _describe(min_version, max_version),
                _short(current),
            )
        return ""
    running, *limits = parsed
    low = limits.pop(0) if min_version else None
    high = limits.pop(0) if max_version else None
    runs = f"this device runs {current}"
    if low is not None and running < low:
        return f"{version} requires an installed version >= {min_version}; {runs}"
    if high is not None and not running < high:
        return f"{version} requires an installed version < {max_version}; {runs}"
    return ""


def _describe(min_version: str, max_version: str) -> str:
    parts = []
    if min_version:
        parts.append(f">= {_short(min_version)!r}")
    if max_version:
        parts.append(f"< {_short(max_version)!r}")
    return ", ".join(parts)


def _short(text: str) -> str:
    """At most 64 characters of a version the server sent, for a log line."""
    return text if len(text) <= 64 else text[:64] + "…"
