"""Ed25519 release signatures: key pairs, the signed manifest, and its verification.

A signed release carries ``manifest.json`` (the release's version, optionally its
model, and every other member with its size and SHA-256) and ``manifest.json.sig``
(the raw 64-byte Ed25519 signature of the manifest's bytes). The signature binds
the version: a release signed as 0.9.0 is refused when offered as 9.9.9.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class Manifest:
    """What ``manifest.json`` says: the signed identity and the expected files."""

    files: dict[str, tuple[int, str]] = field(default_factory=dict)
    """Member name -> (size, SHA-256 hex)."""
    version: str = ""
    """The release's version as signed; ``""`` in manifests made before versions were signed."""
    model: str = ""
    """The device type the release is for; ``""`` = any."""


def manifest_bytes(files: dict[str, tuple[int, str]], version: str = "", model: str = "") -> bytes:
    body: dict[str, object] = {
        "format": MANIFEST_FORMAT,
        "files": {
            name: {"size": size, "sha256": digest} for name, (size, digest) in sorted(files.items())
        },
    }
    if version:
        body["version"] = version
    if model:
        body["model"] = model
    return json.dumps(body, indent=1, sort_keys=True).encode()


def sign(key: Ed25519PrivateKey, manifest: bytes) -> bytes:
    return key.sign(manifest)


def parse_manifest(manifest: bytes) -> Manifest:
    """The contents of ``manifest.json``; ArchiveError when it is not a manifest."""
    try:
        body = json.loads(manifest)
        files = {str(name): (int(e["size"]), str(e["sha256"])) for name, e in body["files"].items()}
        version, model = body.get("version", ""), body.get("model", "")
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ArchiveError("manifest.json: not a valid manifest") from None
    if not isinstance(version, str) or not isinstance(model, str):
        raise ArchiveError("manifest.json: version and model must be strings")
    return Manifest(files, version, model)


def read_manifest(zip_path: Path) -> Manifest | None:
    """The manifest of a release without checking its signature (for display), or None."""
    manifest = read_member(zip_path, MANIFEST)
    return parse_manifest(manifest) if manifest is not None else None


def verified_manifest(zip_path: Path, public_key: Ed25519PublicKey) -> Manifest:
    """The manifest of a release whose signature is valid; ArchiveError otherwise."""
    manifest = read_member(zip_path, MANIFEST)
    signature = read_member(zip_path, SIGNATURE, limit=1024)
    if manifest is None or signature is None:
        raise ArchiveError("the release is not signed (no manifest.json or manifest.json.sig)")
    try:
        public_key.verify(signature, manifest)
    except InvalidSignature:
        raise ArchiveError("manifest.json.sig: signature does not match the public key") from None
    return parse_manifest(manifest)


def check_identity(manifest: Manifest, offered_version: str, model: str) -> None:
    """ArchiveError unless ``manifest`` was signed for ``offered_version`` (and ``model``).

    A manifest without a version is refused: its signature says nothing about
    which release it is, so it could be replayed under any version. ``model``
    is the device's ``[ota] model``; ``""`` skips the model check.
    """
    if not manifest.version:
        raise ArchiveError(
            f"manifest.json: signed without a version, offered as {offered_version} "
            "(sign with pack --version)"
        )
    if manifest.version != offered_version:
        raise ArchiveError(
            f"manifest.json: signed for version {manifest.version}, offered as {offered_version}"
        )
    if model and manifest.model != model:
        signed = f"model {manifest.model}" if manifest.model else "no model"
        raise ArchiveError(f"manifest.json: signed for {signed}, this device is model {model}")
