"""Build, sign and check release files (``pack``, ``verify``), as the installer will see them."""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
import zipfile
import zlib
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from connhex_edge_ota.archive import (
    MANIFEST,
    SIGNATURE,
    UPDATE_SCRIPT,
    ArchiveError,
    Limits,
    check_archive,
    check_type,
    entries,
    safe_name,
    unpack,
)
from connhex_edge_ota.release import UnsafeVersionError, check_version
from connhex_edge_ota.signing import (
    Manifest,
    check_identity,
    load_private_key,
    manifest_bytes,
    read_manifest,
    sign,
    verified_manifest,
)


class PackUsageError(ValueError):
    """Arguments that cannot make a release (``--key`` without ``--version``, a bad version)."""


def pack(
    source: Path,
    out: Path,
    key: Path | None = None,
    version: str = "",
    model: str = "",
    *,
    overwrite: bool = True,
) -> Path:
    """Zip the folder ``source`` into ``out`` and check it.

    Members are deflated, except those deflate would barely shrink (``compression``).

    With ``key`` the release is signed and ``version`` is required: the signed
    manifest binds it. Without ``key`` an unsigned manifest records ``version``
    and ``model`` when given. ``out`` appears whole and checked, or not at all
    (nothing is left behind on failure); with ``overwrite=False`` an existing
    ``out`` raises FileExistsError.
    """
    if key is not None and not version:
        raise PackUsageError("--version is required with --key: the signature binds the version")
    if version:
        try:
            check_version(version)
        except UnsafeVersionError as exc:
            raise PackUsageError(f"--version: {exc}") from None
    files = _collect(source)
    if UPDATE_SCRIPT not in files:
        raise ArchiveError(f"{source}: no {UPDATE_SCRIPT} at the root")
    if not overwrite and out.exists():
        raise FileExistsError(out)
    private = load_private_key(key) if key is not None else None
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, 0o644)  # a release is not secret; mkstemp's 0600 would surprise
        with os.fdopen(fd, "wb") as file:
            with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_DEFLATED) as archive:
                for name, path in sorted(files.items()):
                    archive.write(path, name, compress_type=compression(path))
                if version or model:
                    hashes = {name: _size_and_hash(p) for name, p in files.items()}
                    manifest = manifest_bytes(hashes, version, model)
                    archive.writestr(MANIFEST, manifest)
                    if private is not None:
                        archive.writestr(SIGNATURE, sign(private, manifest))
            file.flush()
            os.fsync(file.fileno())
        signed = check_release(tmp, private.public_key() if private is not None else None)
        if private is not None:
            check_identity(signed, version, model)
        if overwrite:
            tmp.replace(out)
        else:
            os.link(tmp, out)  # fails if `out` appeared meanwhile: never replaced unasked
    finally:
        tmp.unlink(missing_ok=True)
    return out


def check_release(
    path: Path, public_key: Ed25519PublicKey | None, limits: Limits | None = None
) -> Manifest:
    """Check ``path`` exactly as the installer would, unpacking it into a scratch folder.

    Returns the manifest: verified with ``public_key`` when given, else read as
    it is (an empty one when the release has none).
    """
    members = check_archive(path, limits or Limits())
    if public_key is not None:
        manifest = verified_manifest(path, public_key)
        expected: dict[str, tuple[int, str]] | None = manifest.files
    else:
        try:  # shown, not enforced: an unsigned release may carry its own manifest.json
            manifest = read_manifest(path) or Manifest()
        except ArchiveError:
            manifest = Manifest()
        expected = None
    with tempfile.TemporaryDirectory(prefix="connhex-ota-verify-") as scratch:
        unpack(path, members, Path(scratch) / "current", expected)
    return manifest


def release_problems(
    path: Path, public_key: Ed25519PublicKey | None, limits: Limits | None = None
) -> list[str]:
    """Every reason the installer would refuse ``path``, naming each bad member ([] = ok).

    The installer stops at the first; ``verify`` tells them all: each member whose
    name or type is refused and, with ``public_key``, each member missing from the
    signed manifest, differing from it, or listed but absent. The directory is only
    read when its count and size are within ``limits`` (a zip bomb gets one line).
    """
    limits = limits or Limits()
    try:
        check_release(path, public_key, limits)
    except ArchiveError as first:
        problems = [str(first)]
    else:
        return []
    try:
        with path.open("rb") as file:
            infos = entries(file, path.name, limits)
    except (ArchiveError, OSError, zipfile.BadZipFile):
        return problems
    for info in infos:
        try:
            check_type(info, safe_name(info.filename))
        except ArchiveError as exc:
            problems.append(str(exc))
    if public_key is not None:
        problems += _manifest_problems(path, public_key, infos)
    return list(dict.fromkeys(problems))  # each once, the first (the installer's) first


def _manifest_problems(
    path: Path, public_key: Ed25519PublicKey, infos: list[zipfile.ZipInfo]
) -> list[str]:
    try:
        manifest = verified_manifest(path, public_key)
    except ArchiveError as exc:
        return [str(exc)]
    problems: list[str] = []
    files = {i.filename: i for i in infos if not i.is_dir()}
    files.pop(MANIFEST, None)
    files.pop(SIGNATURE, None)
    with zipfile.ZipFile(path) as archive:
        for name, info in sorted(files.items()):
            if name not in manifest.files:
                problems.append(f"{name}: not in the signed manifest")
                continue
            hasher, size = hashlib.sha256(), 0
            try:
                with archive.open(info) as member:
                    while block := member.read(1024 * 1024):
                        hasher.update(block)
                        size += len(block)
            except Exception as exc:  # any read error of a hostile member: a bad member
                problems.append(f"{name}: unreadable ({type(exc).__name__})")
                continue
            if (size, hasher.hexdigest()) != manifest.files[name]:
                problems.append(f"{name}: differs from the signed manifest")
    problems += [
        f"{name}: listed in the manifest but missing"
        for name in sorted(set(manifest.files) - set(files))
    ]
    return problems


def _collect(source: Path) -> dict[str, Path]:
    if not source.is_dir():
        raise ArchiveError(f"{source}: not a folder")
    files: dict[str, Path] = {}
    for folder, dirs, names in os.walk(source):
        dirs.sort()
        for name in names:
            path = Path(folder) / name
            mode = path.lstat().st_mode
            relative = path.relative_to(source).as_posix()
            if not stat.S_ISREG(mode):
                raise ArchiveError(f"{relative}: only regular files go into a release")
            if relative in (MANIFEST, SIGNATURE):
                raise ArchiveError(f"{relative}: reserved name, written by pack")
            files[relative] = path
    return files


SAMPLES = 16
SAMPLE = 64 * 1024
"""A file is judged by deflating ``SAMPLES`` pieces of ``SAMPLE`` bytes spread over it."""
STORE_ABOVE = 0.95
"""A file whose samples deflate to more than this share of their size is stored:
already compressed data (images, archives, media) gains nothing from deflate, and
a stored member is copied on the device by the kernel, without inflating it. A file
that fools the samples is stored: bigger than it could be, never wrong."""


def compression(path: Path) -> int:
    """``ZIP_STORED`` for a file that deflate would barely shrink, else ``ZIP_DEFLATED``."""
    size = path.stat().st_size
    if size == 0:
        return zipfile.ZIP_DEFLATED
    step = max(size - SAMPLE, 0) / max(SAMPLES - 1, 1)
    plain = packed = 0
    with path.open("rb") as file:
        for at in sorted({round(i * step) for i in range(SAMPLES)}):
            file.seek(at)
            sample = file.read(SAMPLE)
            deflate = zlib.compressobj(wbits=-15)  # raw deflate, as in a zip member
            plain += len(sample)
            packed += len(deflate.compress(sample)) + len(deflate.flush())
    return zipfile.ZIP_STORED if packed > STORE_ABOVE * plain else zipfile.ZIP_DEFLATED


def _size_and_hash(path: Path) -> tuple[int, str]:
    hasher = hashlib.sha256()
    size = 0
    with path.open("rb") as file:
        while block := file.read(1024 * 1024):
            size += len(block)
            hasher.update(block)
    return size, hasher.hexdigest()
