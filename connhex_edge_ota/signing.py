"""Ed25519 release signatures: key pairs, the signed manifest, and its verification.

A signed release carries ``manifest.json`` (every other member with its size and
SHA-256) and ``manifest.json.sig`` (the raw 64-byte Ed25519 signature of the
manifest's bytes).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from connhex_edge_ota.archive import MANIFEST, SIGNATURE, ArchiveError, read_member

MANIFEST_FORMAT = 1


class KeyFileError(ValueError):
    """A key that cannot be read."""


def keygen(private_path: Path) -> Path:
    """Write a new key pair: ``private_path`` (PEM, mode 0600) and ``<private_path>.pub``."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(pem)
    public_path = private_path.with_name(private_path.name + ".pub")
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return public_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not a readable private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 key")
    return key


def load_public_key(value: str) -> Ed25519PublicKey:
    """A public key from a ``.pub`` path, inline PEM, or base64 of the raw 32 bytes."""
    text = value.strip()
    if "-----BEGIN" not in text and not _is_base64_key(text):
        try:
            text = Path(text).read_text().strip()
        except OSError as exc:
            raise KeyFileError(f"public key file {value}: {exc.strerror}") from None
    if "-----BEGIN" in text:
        try:
            key = serialization.load_pem_public_key(text.encode())
        except ValueError as exc:
            raise KeyFileError(f"public key: not a PEM key ({exc})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise KeyFileError("public key: not an Ed25519 key")
        return key
    try:
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError):
        raise KeyFileError("public key: not base64 of 32 bytes") from None


def _is_base64_key(text: str) -> bool:
    try:
        return len(base64.b64decode(text, validate=True)) == 32
    except (binascii.Error, ValueError):
        return False


def manifest_bytes(files: dict[str, tuple[int, str]]) -> bytes:
    body = {
        "format": MANIFEST_FORMAT,
        "files": {
            name: {"size": size, "sha256": digest} for name, (size, digest) in sorted(files.items())
        },
    }
    return json.dumps(body, indent=1, sort_keys=True).encode()


def sign(key: Ed25519PrivateKey, manifest: bytes) -> bytes:
    return key.sign(manifest)


def verified_manifest(zip_path: Path, public_key: Ed25519PublicKey) -> dict[str, tuple[int, str]]:
    """The file list of a release whose manifest signature is valid; ArchiveError otherwise."""
    manifest = read_member(zip_path, MANIFEST)
    signature = read_member(zip_path, SIGNATURE, limit=1024)
    if manifest is None or signature is None:
        raise ArchiveError("the release is not signed (no manifest.json or manifest.json.sig)")
    try:
        public_key.verify(signature, manifest)
    except InvalidSignature:
        raise ArchiveError("manifest.json.sig: signature does not match the public key") from None
    try:
        files = json.loads(manifest)["files"]
        return {str(name): (int(e["size"]), str(e["sha256"])) for name, e in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ArchiveError("manifest.json: not a valid manifest") from None
