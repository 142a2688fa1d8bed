"""SHA-256 digests as servers send them: RFC 9530 ``Content-Digest`` and the legacy hex form."""

from __future__ import annotations

import base64
import binascii
import re

_SFV = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*=\s*:([A-Za-z0-9+/=]*):\s*$")
_LEGACY = re.compile(r"^\s*(sha-?256)\s*=\s*([0-9a-fA-F]{64})\s*$", re.IGNORECASE)


class DigestError(ValueError):
    """A ``Content-Digest`` value without a usable SHA-256."""


def parse_content_digest(header: str) -> bytes:
    """The 32-byte SHA-256 in ``header``.

    Accepts ``sha-256=:<base64>:`` (RFC 9530; other algorithms in the same
    list are skipped) and the legacy ``sha256=<hex>``.
    """
    for member in header.split(","):
        legacy = _LEGACY.match(member)
        if legacy:
            return bytes.fromhex(legacy.group(2))
        sfv = _SFV.match(member)
        if sfv and sfv.group(1).lower() == "sha-256":
            try:
                raw = base64.b64decode(sfv.group(2), validate=True)
            except binascii.Error:
                raise DigestError("sha-256 value is not base64") from None
            if len(raw) != 32:
                raise DigestError(f"sha-256 value has {len(raw)} bytes, not 32")
            return raw
    raise DigestError(f"no sha-256 in Content-Digest {header[:80]!r}")


def format_content_digest(sha256: bytes) -> str:
    """``sha-256=:<base64>:``, the RFC 9530 form."""
    return f"sha-256=:{base64.b64encode(sha256).decode()}:"
