"""keygen, pack --key and verify: signed releases, and tampering found member by member."""

from __future__ import annotations

import base64
import hashlib
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from connhex_edge_ota.archive import MANIFEST, SIGNATURE, ArchiveError
from connhex_edge_ota.pack import PackUsageError, check_release, pack
from connhex_edge_ota.signing import (
    Manifest,
    check_identity,
    keygen,
    load_private_key,
    load_public_key,
    manifest_bytes,
    sign,
    verified_manifest,
)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "connhex_edge_ota", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def source(tmp_path: Path) -> Path:
    folder = tmp_path / "src"
    (folder / "bin").mkdir(parents=True)
    (folder / "update.sh").write_text("echo update\n")
    (folder / "bin" / "tool").write_bytes(b"\x7fELF payload")
    return folder


def test_keygen_writes_a_private_key_only_we_can_read(tmp_path: Path) -> None:
    result = cli("keygen", str(tmp_path / "k"))
    assert result.returncode == 0
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "k.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert cli("keygen", str(tmp_path / "k")).returncode == 1  # never overwritten


def test_signed_pack_verifies_and_tampering_is_named(tmp_path: Path, source: Path) -> None:
    keygen(tmp_path / "k")
    out = tmp_path / "fw-1.zip"
    packed = cli(
        "pack", str(source), "-o", str(out), "--key", str(tmp_path / "k"), "--version", "1"
    )
    assert packed.returncode == 0, packed.stderr
    assert cli("verify", str(out), "--public-key", str(tmp_path / "k.pub")).returncode == 0

    tampered = tmp_path / "fw-2.zip"
    with zipfile.ZipFile(out) as original, zipfile.ZipFile(tampered, "w") as copy:
        for info in original.infolist():
            data = original.read(info)
            copy.writestr(info, b"\x7fELF evil!!" if info.filename == "bin/tool" else data)
    result = cli("verify", str(tampered), "--public-key", str(tmp_path / "k.pub"))
    assert result.returncode == 1 and "bin/tool: differs from the signed manifest" in result.stderr


def test_wrong_key_and_unsigned_release_are_refused(tmp_path: Path, source: Path) -> None:
    keygen(tmp_path / "a")
    keygen(tmp_path / "b")
    signed = pack(source, tmp_path / "s.zip", tmp_path / "a", "1.0")
    unsigned = pack(source, tmp_path / "u.zip")
    with pytest.raises(ArchiveError, match="signature does not match"):
        check_release(signed, load_public_key(str(tmp_path / "b.pub")))
    with pytest.raises(ArchiveError, match="not signed"):
        check_release(unsigned, load_public_key(str(tmp_path / "a.pub")))


def test_public_key_forms(tmp_path: Path) -> None:
    keygen(tmp_path / "k")
    pem = (tmp_path / "k.pub").read_text()
    key = load_public_key(pem)
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    for form in (str(tmp_path / "k.pub"), pem, base64.b64encode(raw).decode()):
        assert (
            load_public_key(form).public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
            == raw
        )


def test_pack_refuses_a_folder_without_update_sh(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "x").write_text("x")
    result = cli("pack", str(tmp_path / "src"), "-o", str(tmp_path / "o.zip"))
    assert result.returncode == 1 and "no update.sh" in result.stderr
    assert not (tmp_path / "o.zip").exists()


def test_pack_signs_the_version_and_model_and_verify_prints_them(
    tmp_path: Path, source: Path
) -> None:
    keygen(tmp_path / "k")
    out = tmp_path / "fw.zip"
    args = ("pack", str(source), "-o", str(out), "--key", str(tmp_path / "k"))
    refused = cli(*args)
    assert refused.returncode == 2 and "--version is required with --key" in refused.stderr
    assert not out.exists()
    assert cli(*args, "--version", "2.1.0", "--model", "gw-4").returncode == 0
    shown = cli("verify", str(out), "--public-key", str(tmp_path / "k.pub"))
    assert shown.returncode == 0
    assert shown.stdout.strip() == (
        f"{out}: ok, signature verified; signed for version 2.1.0, model gw-4"
    )
    manifest = verified_manifest(out, load_public_key(str(tmp_path / "k.pub")))
    assert (manifest.version, manifest.model) == ("2.1.0", "gw-4")
    assert set(manifest.files) == {"update.sh", "bin/tool"}


def test_unsigned_pack_still_records_the_version(tmp_path: Path, source: Path) -> None:
    out = tmp_path / "fw.zip"
    assert cli("pack", str(source), "-o", str(out), "--version", "3.0").returncode == 0
    with zipfile.ZipFile(out) as archive:
        names = archive.namelist()
        assert b'"version": "3.0"' in archive.read(MANIFEST)
    assert SIGNATURE not in names
    shown = cli("verify", str(out))
    assert "manifest says version 3.0" in shown.stdout and "not checked" in shown.stdout


def test_pack_refuses_an_unsafe_version(tmp_path: Path, source: Path) -> None:
    keygen(tmp_path / "k")
    with pytest.raises(PackUsageError, match="path separator"):
        pack(source, tmp_path / "o.zip", tmp_path / "k", "../1.0")
    assert not list(tmp_path.glob("*.zip")) and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize(
    ("manifest", "offered", "model", "error"),
    [
        (Manifest({}, "0.9.0"), "9.9.9", "", "signed for version 0.9.0, offered as 9.9.9"),
        (Manifest({}, ""), "1.0", "", "signed without a version, offered as 1.0"),
        (Manifest({}, "1.0", "gw-b"), "1.0", "gw-a", "signed for model gw-b, this device is"),
        (Manifest({}, "1.0"), "1.0", "gw-a", "signed for no model, this device is model gw-a"),
    ],
)
def test_identity_mismatches_are_refused(
    manifest: Manifest, offered: str, model: str, error: str
) -> None:
    with pytest.raises(ArchiveError, match=error):
        check_identity(manifest, offered, model)


def test_identity_matches() -> None:
    check_identity(Manifest({}, "1.0", "gw-a"), "1.0", "gw-a")
    check_identity(Manifest({}, "1.0", "gw-a"), "1.0", "")  # no model configured: any


def test_a_manifest_signed_before_versions_were_signed_has_no_version(
    tmp_path: Path, source: Path
) -> None:
    keygen(tmp_path / "k")
    data = (source / "update.sh").read_bytes()
    body = manifest_bytes({"update.sh": (len(data), hashlib.sha256(data).hexdigest())})
    out = tmp_path / "old.zip"
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("update.sh", data)
        archive.writestr(MANIFEST, body)
        archive.writestr(SIGNATURE, sign(load_private_key(tmp_path / "k"), body))
    manifest = check_release(out, load_public_key(str(tmp_path / "k.pub")))
    assert manifest.version == ""
    with pytest.raises(ArchiveError, match="signed without a version"):
        check_identity(manifest, "1.0", "")


def test_an_unsigned_release_may_carry_a_manifest_json_of_its_own(tmp_path: Path) -> None:
    out = tmp_path / "web.zip"
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("update.sh", "echo hi\n")
        archive.writestr(MANIFEST, '{"name": "my web app", "icons": []}')
    assert check_release(out, None) == Manifest()
    shown = cli("verify", str(out))
    assert shown.returncode == 0 and "no manifest; signature not checked" in shown.stdout


def test_verify_names_each_bad_member(tmp_path: Path, source: Path) -> None:
    """Two members changed, one added, one removed: verify names all four, exit 1."""
    (source / "a.txt").write_text("a")
    (source / "b.txt").write_text("b")
    (source / "c.txt").write_text("c")
    keygen(tmp_path / "k")
    signed = pack(source, tmp_path / "fw.zip", tmp_path / "k", "1.0.0")
    tampered = tmp_path / "bad.zip"
    with zipfile.ZipFile(signed) as original, zipfile.ZipFile(tampered, "w") as out:
        for info in original.infolist():
            if info.filename == "c.txt":
                continue  # removed
            data = original.read(info)
            if info.filename in ("a.txt", "b.txt"):
                data += b" tampered"
            out.writestr(info, data)
        out.writestr("extra.txt", b"not signed")
    result = cli("verify", str(tampered), "--public-key", str(tmp_path / "k.pub"))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    for expected in (
        "a.txt: differs from the signed manifest",
        "b.txt: differs from the signed manifest",
        "extra.txt: not in the signed manifest",
        "c.txt: listed in the manifest but missing",
    ):
        assert sum(expected in line for line in lines) == 1, (expected, lines)


def test_verify_names_each_hostile_name(tmp_path: Path) -> None:
    """Every refused member name is told, not only the first."""
    hostile = tmp_path / "hostile.zip"
    with zipfile.ZipFile(hostile, "w") as archive:
        archive.writestr("update.sh", b"true\n")
        for name in ("../evil1", "/abs/evil2", "a/../../evil3"):
            archive.writestr(zipfile.ZipInfo(name), b"x")
    result = cli("verify", str(hostile))
    assert result.returncode == 1
    for name in ("../evil1", "/abs/evil2", "a/../../evil3"):
        assert name in result.stderr, result.stderr


def test_pack_stores_what_deflate_would_not_shrink_and_deflates_the_rest(tmp_path: Path) -> None:
    """Already compressed payloads (images, archives) are stored, so the device copies
    them without inflating; text and sparse images are deflated."""
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "update.sh").write_text("cp payload.bin /somewhere\n" * 20)
    noise = random.Random(7).randbytes(3 * 1024 * 1024)
    (src / "images" / "rootfs.squashfs").write_bytes(noise)
    # compressible only in its middle: the samples from start, middle and end decide
    (src / "images" / "mostly-noise.bin").write_bytes(noise[:1_000_000] + bytes(1_000_000))
    (src / "images" / "sparse.img").write_bytes(bytes(600_000) + noise[:8192])
    (src / "empty").write_bytes(b"")
    out = pack(src, tmp_path / "r.zip", version="2.0.0")
    with zipfile.ZipFile(out) as archive:
        methods = {info.filename: info.compress_type for info in archive.infolist()}
    assert methods == {
        "empty": zipfile.ZIP_DEFLATED,
        "images/mostly-noise.bin": zipfile.ZIP_DEFLATED,
        "images/rootfs.squashfs": zipfile.ZIP_STORED,
        "images/sparse.img": zipfile.ZIP_DEFLATED,
        "update.sh": zipfile.ZIP_DEFLATED,
        MANIFEST: zipfile.ZIP_DEFLATED,
    }
