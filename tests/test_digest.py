"""Content-Digest parsing: RFC 9530 and the legacy hex form."""

from __future__ import annotations

import base64
import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connhex_edge_ota.digest import DigestError, format_content_digest, parse_content_digest

SHA = hashlib.sha256(b"release").digest()
B64 = base64.b64encode(SHA).decode()


@pytest.mark.parametrize(
    "header",
    [
        f"sha-256=:{base64.b64encode(SHA).decode()}:",
        f"sha-512=:{base64.b64encode(b'x' * 64).decode()}:, sha-256=:{B64}:",
        f"sha256={SHA.hex()}",
        f"SHA-256={SHA.hex().upper()}",
    ],
)
def test_accepts_both_forms(header: str) -> None:
    assert parse_content_digest(header) == SHA


@pytest.mark.parametrize(
    "header", ["", "md5=:abc:", "sha-256=:not base64!:", "sha-256=:YWJj:", "sha256=abc"]
)
def test_refuses_what_has_no_usable_sha256(header: str) -> None:
    with pytest.raises(DigestError):
        parse_content_digest(header)


@given(st.binary(min_size=32, max_size=32))
def test_round_trip(raw: bytes) -> None:
    assert parse_content_digest(format_content_digest(raw)) == raw
