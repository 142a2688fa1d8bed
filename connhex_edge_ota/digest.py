"""Release digests as servers send them, and the hash a download must match.

Accepted, in this order of preference when a response has several:
``Content-Digest`` and ``Repr-Digest`` (RFC 9530, ``sha-256=:<base64>:``, a
dictionary that may list several algorithms), ``Digest`` (RFC 3230,
``SHA-256=<base64>``, algorithm names in any case), and in any of them the
documented legacy ``sha256=<hex>``. SHA-256 is verified when offered, else
SHA-512. A release's digest is kept in the RFC 9530 form, which names its
algorithm: ``sha-256=:<base64>:`` or ``sha-512=:<base64>:``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Mapping

SHA256 = "sha-256"
SHA512 = "sha-512"
_SIZES = {SHA256: 32, SHA512: 64}
_HASHLIB = {SHA256: "sha256", SHA512: "sha512"}
HEADERS = ("Content-Digest", "Repr-Digest", "Digest")
"""The digest headers, in the order they are looked for."""
_LEGACY = re.compile(r"[0-9a-fA-F]{64}")
_BYTES = re.compile(r":([A-Za-z0-9+/=]*):")


class DigestError(ValueError):
    """A digest header without a usable SHA-256 or SHA-512; the message names the header."""


def offered_digest(headers: Mapping[str, str]) -> tuple[str, bytes]:
    """``(algorithm, digest)`` from the first digest header present in ``headers``."""
    for name in HEADERS:
        value = headers.get(name)
        if value is not None:
            return parse_digest_header(name, value)
    raise DigestError(f"no digest header (expected one of {', '.join(HEADERS)})")


def parse_digest_header(name: str, value: str) -> tuple[str, bytes]:
    """``(algorithm, digest)`` from the header ``name: value``; DigestError otherwise."""
    rfc3230 = name.lower() == "digest"
    offered: dict[str, str] = {}
    for member in value.split(","):
        item = member.split(";", 1)[0].strip()  # RFC 9530 parameters carry nothing we use
        algorithm, equals, encoded = item.partition("=")
        if not equals or not algorithm.strip():
            raise DigestError(f"{name}: {_shown(value)} is not a list of algorithm=value")
        offered[algorithm.strip().lower()] = encoded.strip()
    if "sha256" in offered and SHA256 not in offered:
        legacy = offered["sha256"]
        if not _LEGACY.fullmatch(legacy):
            raise DigestError(f"{name}: legacy sha256 value is not 64 hex digits")
        return SHA256, bytes.fromhex(legacy)
    for algorithm in (SHA256, SHA512):
        if algorithm in offered:
            return algorithm, _decode(name, algorithm, offered[algorithm], rfc3230)
    listed = ", ".join(sorted(offered)) or "none"
    raise DigestError(f"{name}: no sha-256 or sha-512 among the algorithms offered ({listed})")


def _decode(name: str, algorithm: str, encoded: str, rfc3230: bool) -> bytes:
    if rfc3230:
        text = encoded
        form = "base64 (RFC 3230)"
    else:
        match = _BYTES.fullmatch(encoded)
        if match is None:
            raise DigestError(
                f"{name}: {algorithm} value is not an RFC 9530 byte sequence :<base64>:"
            )
        text = match.group(1)
        form = "base64"
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != _SIZES[algorithm]:
        raise DigestError(f"{name}: {algorithm} value is not {form} of {_SIZES[algorithm]} bytes")
    return raw


def _shown(value: str) -> str:
    return repr(value[:80])


def format_digest(algorithm: str, digest: bytes) -> str:
    """``<algorithm>=:<base64>:``, the RFC 9530 form a release's digest is kept in."""
    return f"{algorithm}=:{base64.b64encode(digest).decode()}:"


def format_content_digest(sha256: bytes) -> str:
    """``sha-256=:<base64>:``, the RFC 9530 form."""
    return format_digest(SHA256, sha256)


def stored_digest(digest: str) -> tuple[str, bytes]:
    """``(algorithm, digest)`` of a release's digest as kept by :func:`format_digest`."""
    return parse_digest_header("Content-Digest", digest)


def new_hasher(digest: str) -> hashlib._Hash:
    """A fresh hash object of the algorithm a release's ``digest`` names."""
    return hashlib.new(_HASHLIB[stored_digest(digest)[0]])
