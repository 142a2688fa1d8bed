"""The Connhex OTA HTTP API: ``HEAD`` to check, resumable ``GET`` to download.

Blocking (requests); the service runs these calls in worker threads.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path

import requests

from connhex_edge_ota import __version__
from connhex_edge_ota.config import OtaSettings
from connhex_edge_ota.deadline import (
    Deadline,
    RateFloor,
    TooSlow,
    WatchedAdapter,
    chunks_as_they_come,
)
from connhex_edge_ota.digest import DigestError, format_content_digest, parse_content_digest
from connhex_edge_ota.release import Release, UnsafeVersionError, check_version
from connhex_edge_ota.store import Offer, Partial, boot_id, fsync_dir

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
CHECKPOINT = 4 * 1024 * 1024
"""Bytes between fsyncs of a partial download: what a power cut can cost."""
_MIB = 1024 * 1024


@dataclass
class ServerError(Exception):
    """A failed exchange with the server, and when it may be retried."""

    message: str
    retry_after: float | None = None
    """Seconds the server asked us to wait (``Retry-After``)."""
    permanent: bool = False
    """Retrying sooner than ``check_interval`` cannot help (401, 403, 404)."""
    partial_dropped: bool = False
    """The partial download was deleted: the next try starts from zero."""

    def __str__(self) -> str:
        return self.message


class ReleaseChanged(ServerError):
    """The release changed between check and download (412, or a new ETag)."""


def retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _filename(disposition: str) -> str:
    match = re.search(r'filename="?([^";]+)"?', disposition or "")
    return Path(match.group(1)).name if match else ""


class Server:
    """The release server of one device (``{server_url}/iot/ota/{init_id}``)."""

    def __init__(self, settings: OtaSettings) -> None:
        self.settings = settings
        self.url = f"{settings.server_url}/iot/ota/{settings.init_id}"
        self.session = requests.Session()
        for scheme in ("http://", "https://"):  # lets a Deadline cut a trickling answer
            self.session.mount(scheme, WatchedAdapter())
        # Given with every request: requests lets REQUESTS_CA_BUNDLE override a
        # session's verify (psf/requests#3829), which would drop our ca_file.
        self.verify: str | bool = str(settings.ca_file) if settings.ca_file else True
        self.cert: tuple[str, str] | None = None
        if settings.cert_file and settings.key_file:
            self.cert = (str(settings.cert_file), str(settings.key_file))
        self.session.headers["User-Agent"] = f"connhex-edge-ota/{__version__}"
        key = settings.init_key.get_secret_value()
        if key:
            self.session.headers["Authorization"] = f"Thing {key}"

    def close(self) -> None:
        self.session.close()

    def _timeout(self) -> tuple[float, float]:
        return (self.settings.connect_timeout, self.settings.stall_timeout)

    def check(self, current_version: str) -> Offer | None:
        """The release the server offers, or ``None`` when there is nothing new."""
        headers = {"Version": current_version} if current_version else {}
        deadline = Deadline(self.settings.check_timeout)
        try:
            with deadline:
                response = self.session.head(
                    self.url,
                    headers=headers,
                    timeout=self._timeout(),
                    allow_redirects=True,
                    verify=self.verify,
                    cert=self.cert,
                )
        except requests.RequestException as exc:
            if deadline.expired:
                raise ServerError(self._too_slow()) from None
            raise ServerError(_network_error(exc)) from None
        if deadline.expired:  # a cut in the headers can pass for a short, complete answer
            response.close()
            raise ServerError(self._too_slow())
        with response:
            if response.status_code in (204, 304):
                return None
            if response.status_code != 200:
                raise _http_error(response)
            return _offer(response)

    def download(
        self,
        release: Release,
        partial: Partial,
        save_partial: Callable[[Partial], None],
        progress: Callable[[int], None],
        cancel: threading.Event,
    ) -> int:
        """Fetch ``release`` into ``release.path``; returns the bytes received in this call.

        Resumes ``<path>.part`` when ``partial`` describes the same release,
        verifies size and SHA-256, fsyncs and renames atomically. A digest
        mismatch deletes the file; a cut, a stall or a full disk keep it for the
        next try.
        """
        part = release.part_path
        offset = _resumable_bytes(part, partial)
        _check_space(part.parent, release.size - offset, self.settings.free_space_margin)
        hasher = _hash_prefix(part, offset)
        if offset == release.size:  # complete before a restart: only verification is left
            return self._finish(release, part, hasher, 0)
        headers = {"If-Match": release.etag} if release.etag else {}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        deadline = Deadline(self.settings.check_timeout)  # for the status line and headers
        try:
            with deadline:
                response = self.session.get(
                    self.url,
                    headers=headers,
                    stream=True,
                    timeout=self._timeout(),
                    verify=self.verify,
                    cert=self.cert,
                )
        except requests.RequestException as exc:
            if deadline.expired:
                raise ServerError(self._too_slow()) from None
            raise ServerError(_network_error(exc)) from None
        if deadline.expired:  # a cut in the headers can pass for a short, complete answer
            response.close()
            raise ServerError(self._too_slow())
        with response:
            if response.status_code == 412:
                part.unlink(missing_ok=True)
                raise ReleaseChanged(
                    "the release changed on the server (412); checking again", partial_dropped=True
                )
            if response.status_code == 416:
                part.unlink(missing_ok=True)
                raise ServerError(
                    "server refused the resume range (416); starting over", partial_dropped=True
                )
            if response.status_code == 206:
                if not _range_starts_at(response.headers.get("Content-Range", ""), offset):
                    part.unlink(missing_ok=True)
                    raise ServerError(
                        "server answered a range that does not match; starting over",
                        partial_dropped=True,
                    )
            elif response.status_code == 200:
                if offset:
                    log.info(
                        "server ignored the range; downloading %s from the start", release.version
                    )
                offset, hasher = 0, hashlib.sha256()
            else:
                raise _http_error(response)
            floor = RateFloor(self.settings.min_transfer_rate, self.settings.stall_timeout)
            received = _receive(
                response,
                part,
                offset,
                hasher,
                release,
                partial,
                save_partial,
                progress,
                cancel,
                floor,
            )
        done = offset + received
        if done < release.size:
            raise ServerError(f"connection ended at {done} of {release.size} bytes; will resume")
        return self._finish(release, part, hasher, received)

    def _too_slow(self) -> str:
        return (
            f"server too slow: no complete answer within {self.settings.check_timeout:g}s "
            "(check_timeout)"
        )

    @staticmethod
    def _finish(release: Release, part: Path, hasher: hashlib._Hash, received: int) -> int:
        if format_content_digest(hasher.digest()) != release.digest:
            part.unlink(missing_ok=True)
            raise ServerError(
                "digest mismatch: the downloaded file was deleted", partial_dropped=True
            )
        part.replace(release.path)
        fsync_dir(release.path.parent)
        return received


def _receive(
    response: requests.Response,
    part: Path,
    offset: int,
    hasher: hashlib._Hash,
    release: Release,
    partial: Partial,
    save_partial: Callable[[Partial], None],
    progress: Callable[[int], None],
    cancel: threading.Event,
    floor: RateFloor,
) -> int:
    """Append the body to ``part``, hashing as it goes; the bytes written.

    Cut (keeping the bytes so far) when the body comes slower than ``floor``.
    """
    written = offset
    next_checkpoint = offset + CHECKPOINT
    mode = "r+b" if offset else "wb"
    with part.open(mode, buffering=0) as file:
        file.truncate(offset)
        file.seek(offset)
        partial = partial.model_copy(update={"boot_id": boot_id(), "durable": offset})
        save_partial(partial)

        def piece() -> int:  # pieces end at checkpoints: durable every CHECKPOINT bytes
            return min(CHUNK, next_checkpoint - written)

        try:
            for chunk in chunks_as_they_come(response.raw, piece):
                if cancel.is_set():
                    break
                floor.update(written - offset + len(chunk))
                if written + len(chunk) > release.size:
                    raise ServerError(f"server sent more than the announced {release.size} bytes")
                view = memoryview(chunk)
                while view:  # raw writes can be short: hash exactly what is on disk
                    count = file.write(view) or 0
                    hasher.update(view[:count])
                    written += count
                    view = view[count:]
                progress(written)
                if written >= next_checkpoint:
                    file.flush()
                    os.fsync(file.fileno())
                    partial = partial.model_copy(update={"durable": written})
                    save_partial(partial)
                    next_checkpoint = written + CHECKPOINT
        except TooSlow as exc:
            raise ServerError(
                f"server too slow: {exc}, at {written} of {release.size} bytes; will resume"
            ) from None
        except requests.RequestException as exc:  # before OSError: it is one
            raise ServerError(
                f"{_network_error(exc)} at {written} of {release.size} bytes; will resume"
            ) from None
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise ServerError(
                    f"no space left on device at {written} of {release.size} bytes; will resume"
                ) from None
            raise ServerError(f"write failed: {exc.strerror or exc}") from None
        os.fsync(file.fileno())
    if cancel.is_set():
        raise ServerError(f"download stopped at {written} of {release.size} bytes; will resume")
    return written - offset


def _resumable_bytes(part: Path, partial: Partial) -> int:
    """How many bytes of ``part`` can be kept (0 when it belongs to another release)."""
    try:
        size = part.stat().st_size
    except FileNotFoundError:
        return 0
    if partial.durable > size:
        return 0
    if partial.boot_id and partial.boot_id != boot_id():
        # After a reboot only fsynced bytes are trustworthy.
        size = partial.durable
    return min(size, partial.size)


def _hash_prefix(part: Path, length: int) -> hashlib._Hash:
    hasher = hashlib.sha256()
    if length:
        with part.open("rb") as file:
            remaining = length
            while remaining:
                block = file.read(min(CHUNK * 16, remaining))
                if not block:
                    break
                hasher.update(block)
                remaining -= len(block)
    return hasher


def _check_space(folder: Path, needed: int, margin: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed + margin:
        raise ServerError(
            f"no space: the download needs {needed / _MIB:.1f} MiB plus a "
            f"{margin / _MIB:.0f} MiB margin, {free / _MIB:.1f} MiB free"
        )


def _range_starts_at(content_range: str, offset: int) -> bool:
    match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", content_range.strip())
    return bool(match) and int(match.group(1)) == offset  # type: ignore[union-attr]


def _offer(response: requests.Response) -> Offer:
    headers = response.headers
    raw_version = headers.get("Version") or headers.get("ETag", "").removeprefix("W/").strip('"')
    try:
        version = check_version(raw_version)
    except UnsafeVersionError as exc:
        raise ServerError(f"refused release: {exc}") from None
    try:
        size = int(headers.get("Content-Length", ""))
    except ValueError:
        raise ServerError("server sent no valid Content-Length") from None
    digest_header = headers.get("Content-Digest") or headers.get("Digest", "")
    try:
        digest = format_content_digest(parse_content_digest(digest_header))
    except DigestError as exc:
        raise ServerError(f"refused release {version}: {exc}") from None
    return Offer(
        version=version,
        size=size,
        digest=digest,
        etag=headers.get("ETag", ""),
        min_version=headers.get("Min-Version", ""),
        max_version=headers.get("Max-Version", ""),
        filename=_filename(headers.get("Content-Disposition", "")),
    )


def _http_error(response: requests.Response) -> ServerError:
    code = response.status_code
    reason = f"server answered {code} {response.reason or ''}".strip()
    return ServerError(
        reason,
        retry_after=retry_after(response.headers.get("Retry-After")),
        permanent=code in (401, 403, 404),
    )


def _network_error(exc: requests.RequestException) -> str:
    """A short reason that never carries request headers (they hold the key)."""
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS error: the server certificate could not be verified"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return "connection ended early"
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return "connection timed out"
    if isinstance(exc, (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError)):
        if "Read timed out" in str(exc) or isinstance(exc, requests.exceptions.ReadTimeout):
            return "transfer stalled (read timeout)"
        return "connection failed"
    return f"HTTP error: {type(exc).__name__}"
