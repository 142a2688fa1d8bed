"""keygen, pack --key and verify: signed releases, and tampering found member by member."""

from __future__ import annotations

import base64
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from connhex_edge_ota.archive import ArchiveError
from connhex_edge_ota.pack import check_release, pack
from connhex_edge_ota.signing import keygen, load_public_key


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
    assert cli("pack", str(source), "-o", str(out), "--key", str(tmp_path / "k")).returncode == 0
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
    signed = pack(source, tmp_path / "s.zip", tmp_path / "a")
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
