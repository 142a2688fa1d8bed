"""Digest headers as the standards write them (RFC 9530, RFC 3230) and the legacy hex form."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connhex_edge_ota.client import ServerError
from connhex_edge_ota.digest import (
    DigestError,
    format_content_digest,
    format_digest,
    new_hasher,
    offered_digest,
    parse_digest_header,
    stored_digest,
)
from connhex_edge_ota.server import DIGEST_FORMS, ReleaseServer
from tests.test_download import MIB, Device, publish

SHA = hashlib.sha256(b"release").digest()
B64 = base64.b64encode(SHA).decode()
SHA512 = hashlib.sha512(b"release").digest()
B64_512 = base64.b64encode(SHA512).decode()


@pytest.mark.parametrize(
    ("name", "value", "algorithm", "digest"),
    [
        ("Content-Digest", f"sha-256=:{B64}:", "sha-256", SHA),
        ("Repr-Digest", f"sha-256=:{B64}:", "sha-256", SHA),
        ("Content-Digest", f"sha-512=:{B64_512}:, sha-256=:{B64}:", "sha-256", SHA),
        ("Content-Digest", f"sha-256=:{B64}:;note=1, md5=:AAAA:", "sha-256", SHA),
        ("Content-Digest", f"md5=:AAAA:, sha-512=:{B64_512}:", "sha-512", SHA512),
        ("Repr-Digest", f"sha-512=:{B64_512}:", "sha-512", SHA512),
        ("Digest", f"SHA-256={B64}", "sha-256", SHA),
        ("Digest", f"sha-256={B64}", "sha-256", SHA),
        ("Digest", f"MD5=AAAA, SHA-512={B64_512}", "sha-512", SHA512),
        ("Digest", f"SHA-512={B64_512},SHA-256={B64}", "sha-256", SHA),
        ("Content-Digest", f"sha256={SHA.hex()}", "sha-256", SHA),
        ("Content-Digest", f"SHA256={SHA.hex().upper()}", "sha-256", SHA),
        ("Digest", f"sha256={SHA.hex()}", "sha-256", SHA),
    ],
)
def test_accepted_forms(name: str, value: str, algorithm: str, digest: bytes) -> None:
    assert parse_digest_header(name, value) == (algorithm, digest)


@pytest.mark.parametrize(
    ("name", "value", "error"),
    [
        ("Content-Digest", "", "Content-Digest: '' is not a list of algorithm=value"),
        ("Content-Digest", "md5=:AAAA:", "Content-Digest: no sha-256 or sha-512 among the"),
        ("Content-Digest", f"sha-256={B64}", "Content-Digest: sha-256 value is not an RFC 9530"),
        ("Content-Digest", "sha-256=:not base64!:", "Content-Digest: sha-256 value is not an RFC"),
        ("Content-Digest", "sha-256=:YWJj:", "Content-Digest: sha-256 value is not base64 of 32"),
        ("Repr-Digest", f"sha-512=:{B64}:", "Repr-Digest: sha-512 value is not base64 of 64"),
        ("Content-Digest", "sha256=abc", "Content-Digest: legacy sha256 value is not 64 hex"),
        ("Digest", f"SHA-256=:{B64}:", "Digest: sha-256 value is not base64 (RFC 3230) of 32"),
        ("Digest", f"sha-256={SHA.hex()}", "Digest: sha-256 value is not base64 (RFC 3230)"),
        ("Digest", "UNIXsum=30637", "Digest: no sha-256 or sha-512 among the algorithms"),
    ],
)
def test_refused_forms_name_the_header(name: str, value: str, error: str) -> None:
    with pytest.raises(DigestError) as refused:
        parse_digest_header(name, value)
    assert str(refused.value).startswith(error)


def test_the_header_looked_at_comes_first_in_standard_order() -> None:
    both = {"Digest": "MD5=AAAA", "Repr-Digest": f"sha-256=:{B64}:"}
    assert offered_digest(both) == ("sha-256", SHA)
    with pytest.raises(DigestError, match=r"^no digest header"):
        offered_digest({"ETag": '"x"'})


@given(st.binary(min_size=32, max_size=32))
def test_round_trip(raw: bytes) -> None:
    assert stored_digest(format_content_digest(raw)) == ("sha-256", raw)


def test_the_hasher_follows_the_stored_algorithm() -> None:
    for algorithm, expected in (("sha-256", SHA), ("sha-512", SHA512)):
        hasher = new_hasher(format_digest(algorithm, expected))
        hasher.update(b"release")
        assert hasher.digest() == expected


@pytest.mark.parametrize("form", [f for f in DIGEST_FORMS if f != "none"])
def test_each_header_form_downloads_and_verifies(
    tmp_path: Path, release_server: ReleaseServer, form: str
) -> None:
    release_server.releases.digest_form = form
    path = publish(release_server, "1.0.0", 2 * MIB)
    # Cut once so that the resumed download hashes the kept prefix with the right algorithm.
    release_server.faults.cut_at = MIB
    device = Device(tmp_path, release_server)
    release = device.offer()
    algorithm = "sha-512" if form == "sha-512" else "sha-256"
    assert release.digest.startswith(f"{algorithm}=:")
    with pytest.raises(ServerError, match="will resume"):
        device.download(release)
    device.download(release)
    assert release.path.read_bytes() == path.read_bytes()


@pytest.mark.parametrize("form", ["sha-512", "digest"])
def test_a_wrong_digest_in_any_form_deletes_the_file(
    tmp_path: Path, release_server: ReleaseServer, form: str
) -> None:
    release_server.releases.digest_form = form
    publish(release_server, "1.0.0", MIB)
    device = Device(tmp_path, release_server)
    release = device.offer()
    algorithm, raw = stored_digest(release.digest)
    wrong = dataclasses.replace(release, digest=format_digest(algorithm, raw[::-1]))
    with pytest.raises(ServerError, match="digest mismatch"):
        device.download(wrong)
    assert not wrong.path.exists() and not wrong.part_path.exists()


def test_a_release_without_a_usable_digest_header_is_refused(
    tmp_path: Path, release_server: ReleaseServer
) -> None:
    release_server.releases.digest_form = "none"
    publish(release_server, "1.0.0", 1000)
    device = Device(tmp_path, release_server)
    with pytest.raises(ServerError) as refused:
        device.server.check("")
    assert str(refused.value) == (
        "refused release 1.0.0: no digest header (expected one of "
        "Content-Digest, Repr-Digest, Digest)"
    )
