"""The Connhex OTA HTTP API: ``HEAD`` to check, resumable ``GET`` to download.

Blocking (requests); the service runs these calls in worker threads.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import queue
import re
import shutil
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import requests
from pydantic import ValidationError
from urllib3.connection import HTTPConnection

from connhex_edge_ota import __version__, delta, killpoints
from connhex_edge_ota.config import OtaSettings
from connhex_edge_ota.deadline import (
    Deadline,
    RateFloor,
    TooSlow,
    WatchedAdapter,
    chunks_as_they_come,
)
from connhex_edge_ota.delta import NoDelta
from connhex_edge_ota.digest import (
    DigestError,
    format_digest,
    new_hasher,
    offered_digest,
    stored_digest,
)
from connhex_edge_ota.release import Release, UnsafeVersionError, check_version
from connhex_edge_ota.state import Offer, Partial
from connhex_edge_ota.store import boot_id, fsync_dir, start_writeback

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
CHECKPOINT_SECONDS = 2.0
"""Seconds between durable checkpoints of a partial download at most (bytes: the
``checkpoint_bytes`` key): a power cut costs what came since the last one. Each
checkpoint fsyncs the file (in the background) and records it."""
WRITEBACK_BYTES = 16 * 1024 * 1024
"""Bytes received between two requests to start writing them to disk (not durable
yet; that is the checkpoints' fsync, which then has less to wait for)."""
_MIB = 1024 * 1024


@dataclass(frozen=True)
class Transfer:
    """What one download call fetched, and how."""

    how: str
    """``full``, ``resumed``, ``delta`` or ``kept`` (already complete here)."""
    fetched: int
    """Bytes received over the network."""
    total: int
    """Bytes it planned to fetch (a delta that fell back counts what it fetched first)."""
    fallback: str = ""
    """Why a delta was tried and not used (``how`` is then ``full`` or ``resumed``)."""


@dataclass(frozen=True)
class _Job:
    """One download call: what stays the same through its full, delta and ranged parts."""

    release: Release
    part: Path
    """Where the release grows (``<path>.part``)."""
    partial: Partial
    save_partial: Callable[[Partial], None]
    cancel: threading.Event
    checkpoint_bytes: int


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


class RangeRefused(ServerError):
    """The server refused to resume (416): the partial file is gone, start over at once."""


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
        # Escaped: an ID holding '#', '?' or '%' still names one device, never another path.
        self.url = f"{settings.server_url}/iot/ota/{urllib.parse.quote(settings.init_id, safe='')}"
        self.session = requests.Session()
        window = receive_window(settings.max_download_rate)
        self._pace: Pace | None = None
        """The clock of the download in progress, under ``max_download_rate``."""
        for scheme in ("http://", "https://"):  # lets a Deadline cut a trickling answer
            self.session.mount(scheme, WatchedAdapter() if not window else _CappedAdapter(window))
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
        response = self._send("HEAD", headers)
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
        progress: Callable[[int, int], None],
        cancel: threading.Event,
        base: Path | None = None,
    ) -> Transfer:
        """Fetch ``release`` into ``release.path``; what was fetched, and how.

        Resumes ``<path>.part`` when ``partial`` describes the same release,
        verifies size and SHA-256, fsyncs and renames atomically. With ``base``
        (the installed release's zip) and ``delta = "auto"``, members that did
        not change are copied from it and only the rest is fetched (see
        :mod:`connhex_edge_ota.delta`); any failure of the delta falls back to
        the whole release, and says so. A digest mismatch deletes the file; a
        cut, a stall or a full disk keep it for the next try. ``progress`` gets
        (bytes fetched, bytes to fetch) of this call.
        """
        if _already_here(release):  # renamed just before a stop could record it
            return Transfer("kept", 0, 0)
        rate = self.settings.max_download_rate
        # Linux doubles SO_RCVBUF (the half it adds is for its own bookkeeping, but the
        # window can use part of it): count the whole buffer.
        self._pace = Pace(rate, 2 * receive_window(rate)) if rate else None
        part = release.part_path
        offset = _resumable_bytes(part, partial)
        _make_room(part.parent, release.size - offset, self.settings.free_space_margin, base)
        hasher = _hash_prefix(part, offset, release.digest)
        if offset == release.size:  # complete before a restart: only verification is left
            self._finish(release, part, hasher)
            return Transfer("kept", 0, 0)
        job = _Job(release, part, partial, save_partial, cancel, self.settings.checkpoint_bytes)
        spent, fallback = 0, ""
        if base is not None and base.is_file() and self.settings.delta == "auto":
            try:
                return self._delta(job, offset, hasher, progress, base)
            except NoDelta as exc:
                spent, fallback = exc.fetched, str(exc)
                log.warning(
                    "delta of %s not used: %s (%d bytes fetched for it); fetching the %s",
                    release.version,
                    exc,
                    spent,
                    "whole release" if exc.dropped or not offset else "rest of the release",
                )
                if exc.dropped:
                    part.unlink(missing_ok=True)
                    offset = 0
                hasher = _hash_prefix(part, offset, release.digest)  # the delta wrote on
        transfer = self._full(job, offset, hasher, progress, spent)
        return Transfer(transfer.how, transfer.fetched, transfer.total, fallback)

    def _full(
        self,
        job: _Job,
        offset: int,
        hasher: hashlib._Hash,
        progress: Callable[[int, int], None],
        spent: int = 0,
    ) -> Transfer:
        """The release from ``offset`` on; ``spent`` bytes were fetched before (by a delta)."""
        release, part = job.release, job.part
        headers = {"If-Match": release.etag} if release.etag else {}
        self._paced_request(release.size - offset)
        if offset:
            headers["Range"] = f"bytes={offset}-"
        response = self._send("GET", headers)
        with response:
            if response.status_code == 412:
                part.unlink(missing_ok=True)
                raise ReleaseChanged(
                    "the release changed on the server (412); checking again", partial_dropped=True
                )
            if response.status_code == 416:
                part.unlink(missing_ok=True)
                raise RangeRefused(
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
                offset, hasher = 0, new_hasher(release.digest)
            else:
                raise _http_error(response)
            total = spent + release.size - offset
            received = _receive(
                job,
                self._body(response),
                offset,
                hasher,
                lambda written: progress(spent + written - offset, total),
            )
        done = offset + received
        if done < release.size:
            raise ServerError(f"connection ended at {done} of {release.size} bytes; will resume")
        self._finish(release, part, hasher)
        return Transfer("resumed" if offset else "full", spent + received, total)

    def _paced_request(self, length: int) -> None:
        """Under ``max_download_rate``: a request for ``length`` bytes is about to go."""
        if self._pace is not None:
            self._pace.request(length)

    def _chunk(self) -> int:
        """Bytes per read: smaller under a rate cap, so that pacing stays smooth."""
        rate = self.settings.max_download_rate
        return min(CHUNK, max(1024, rate // 10)) if rate else CHUNK

    def _send(self, method: str, headers: dict[str, str]) -> requests.Response:
        """A request whose status line and headers must come within ``check_timeout``
        (a GET's body is streamed: :meth:`_body` bounds it)."""
        deadline = Deadline(self.settings.check_timeout)
        try:
            with deadline:
                response = self.session.request(
                    method,
                    self.url,
                    headers=headers,
                    stream=method == "GET",
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
        return response

    def _body(self, response: requests.Response) -> Iterator[bytes]:
        """The body as it comes, cut when slower than ``min_transfer_rate``, paced to
        ``max_download_rate``."""
        limit = self.settings.max_download_rate
        rate = self.settings.min_transfer_rate
        if limit:  # our own pacing must never pass for a slow server
            rate = min(rate, limit / 2)
        floor = RateFloor(rate, self.settings.stall_timeout)
        chunk = self._chunk()
        received = 0
        try:
            for piece in paced(chunks_as_they_come(response.raw, lambda: chunk), limit, self._pace):
                received += len(piece)
                floor.update(received)
                yield piece
        finally:
            if self._pace is not None:
                self._pace.answered()

    def _range(self, release: Release, start: int, end: int) -> Iterator[bytes]:
        """Bytes ``[start, end)`` of the release, pinned to it with ``If-Match``."""
        headers = {"Range": f"bytes={start}-{end - 1}"}
        self._paced_request(end - start)
        if release.etag:
            headers["If-Match"] = release.etag
        response = self._send("GET", headers)
        with response:
            if response.status_code == 412:
                raise ReleaseChanged("the release changed on the server (412); checking again")
            if response.status_code == 200:
                raise NoDelta("the server ignored Range (200)")
            if response.status_code != 206:
                raise _http_error(response)
            if not _range_is(response.headers.get("Content-Range", ""), start, end):
                raise NoDelta("the server answered another range")
            sent = 0
            for chunk in self._body(response):
                sent += len(chunk)
                if sent > end - start:
                    raise NoDelta("the server sent more than the range")
                yield chunk
            if sent < end - start:
                raise ServerError(f"connection ended in a range at {start + sent}; will resume")

    def _delta(
        self,
        job: _Job,
        offset: int,
        hasher: hashlib._Hash,
        progress: Callable[[int, int], None],
        base: Path,
    ) -> Transfer:
        """Rebuild the release from ``base`` and ranges; NoDelta (with the bytes it
        fetched) when it cannot or should not."""
        fetched = [0]
        try:
            return self._rebuild(job, offset, hasher, progress, base, fetched)
        except NoDelta as exc:
            exc.fetched = fetched[0]
            raise
        except ReleaseChanged as exc:  # what was rebuilt belongs to the release that went
            job.part.unlink(missing_ok=True)
            raise ReleaseChanged(exc.message, partial_dropped=True) from None

    def _rebuild(
        self,
        job: _Job,
        offset: int,
        hasher: hashlib._Hash,
        progress: Callable[[int, int], None],
        base: Path,
        fetched: list[int],
    ) -> Transfer:
        release, part, size = job.release, job.part, job.release.size
        if size - offset < delta.MIN_GAIN:
            raise NoDelta(f"only {size - offset} bytes to fetch: too few for a delta")

        def get(begin: int, end: int) -> bytes:
            data = bytearray()
            try:
                for chunk in self._range(release, begin, end):
                    fetched[0] += len(chunk)
                    data += chunk
            except TooSlow as exc:
                raise ServerError(f"server too slow: {exc}; will retry") from None
            except requests.RequestException as exc:
                raise ServerError(f"{_network_error(exc)}; will retry") from None
            return bytes(data)

        start, _ = delta.probe_range(size)
        tail = get(start, size)
        try:
            cd_start, _ = delta.directory_range(tail, start, size)
        except NoDelta:  # a long zip comment: look further back, once
            wider, _ = delta.tail_range(size)
            if wider >= start:
                raise
            tail, start = get(wider, start) + tail, wider
            cd_start, _ = delta.directory_range(tail, start, size)
        if cd_start < start:
            tail, start = get(cd_start, start) + tail, cd_start
        limit = self.settings.max_members
        new = delta.parse_directory(tail, start, size, limit)
        known = delta.Known(new.start, size, tail[new.start - start :])
        plan = delta.plan(new, known, size, base, delta.read_directory(base, limit))
        total = plan.remote_bytes(offset) + fetched[0]
        if total > delta.MAX_SHARE * (size - offset):
            raise NoDelta(f"it would fetch {total} of {size - offset} bytes (over 70 %)")
        log.info(
            "delta of %s: fetching %d of %d bytes in %d requests; the rest comes from the "
            "installed release",
            release.version,
            total,
            size - offset,
            plan.requests(offset) + 1 + (start < size - delta.PROBE),
        )

        def chunks() -> Iterator[bytes]:
            for segment in plan.segments:
                if segment.end <= offset:
                    continue
                begin = max(segment.start, offset)
                if isinstance(segment, delta.Known | delta.Guess):
                    yield segment.data[begin - segment.start :]
                elif isinstance(segment, delta.Copy):
                    yield from delta.local_chunks(base, segment, offset, CHUNK * 16)
                else:
                    for chunk in self._range(release, begin, segment.end):
                        fetched[0] += len(chunk)
                        yield chunk

        received = _receive(
            job, chunks(), offset, hasher, lambda _written: progress(fetched[0], total)
        )
        if offset + received < size:
            raise ServerError(f"delta stopped at {offset + received} of {size} bytes; will resume")
        guesses = plan.guesses()
        if guesses and hasher.digest() != stored_digest(release.digest)[1]:
            log.info(
                "delta of %s: the rebuilt local headers are not the release's; fetching %d",
                release.version,
                len(guesses),
            )
            with part.open("r+b") as file:
                for guess in guesses:
                    file.seek(guess.start)
                    file.write(get(guess.start, guess.end))
                file.flush()
                os.fsync(file.fileno())
            hasher = _hash_prefix(part, size, release.digest)
            total += sum(guess.end - guess.start for guess in guesses)
            progress(fetched[0], total)
        try:
            self._finish(release, part, hasher)
        except ServerError:
            raise NoDelta(
                "the rebuilt file does not match the release digest", dropped=True
            ) from None
        log.info("delta of %s done: %d bytes fetched", release.version, fetched[0])
        return Transfer("delta", fetched[0], total)

    def _too_slow(self) -> str:
        return (
            f"server too slow: no complete answer within {self.settings.check_timeout:g}s "
            "(check_timeout)"
        )

    @staticmethod
    def _finish(release: Release, part: Path, hasher: hashlib._Hash) -> None:
        if hasher.digest() != stored_digest(release.digest)[1]:
            part.unlink(missing_ok=True)
            raise ServerError(
                "digest mismatch: the downloaded file was deleted", partial_dropped=True
            )
        killpoints.reached("download_verified")
        part.replace(release.path)
        fsync_dir(release.path.parent)


def _receive(
    job: _Job,
    chunks: Iterable[bytes],
    offset: int,
    hasher: hashlib._Hash,
    progress: Callable[[int], None],
) -> int:
    """Append ``chunks`` to ``job.part`` from ``offset``, hashing as it goes; bytes written.

    Every ``checkpoint_bytes`` (exactly: pieces are cut there) or CHECKPOINT_SECONDS,
    whichever comes first, the bytes so far are made durable and recorded.
    """
    release, part, partial, cancel = job.release, job.part, job.partial, job.cancel
    save_partial, checkpoint_bytes = job.save_partial, job.checkpoint_bytes
    written = kicked = offset
    next_checkpoint = offset + checkpoint_bytes
    checkpoint_at = time.monotonic() + CHECKPOINT_SECONDS
    mode = "r+b" if offset else "wb"
    hashing = _Hashing(hasher)
    with part.open(mode, buffering=0) as file:
        file.truncate(offset)
        file.seek(offset)
        partial = partial.model_copy(update={"boot_id": boot_id(), "durable": offset})
        save_partial(partial)
        checkpoints = _Checkpoints(file.fileno(), partial, save_partial)
        try:
            for chunk in chunks:
                if cancel.is_set():
                    break
                if written + len(chunk) > release.size:
                    raise ServerError(f"server sent more than the announced {release.size} bytes")
                view = memoryview(chunk)
                while view:
                    count = file.write(view[: next_checkpoint - written]) or 0
                    hashing.update(view[:count])  # raw writes can be short: hash what is on disk
                    written += count
                    view = view[count:]
                    if written - kicked >= WRITEBACK_BYTES:  # the checkpoints' fsyncs wait less
                        start_writeback(file.fileno(), kicked, written - kicked)
                        kicked = written
                    due = written >= next_checkpoint or time.monotonic() >= checkpoint_at
                    if due and checkpoints.offer(written):
                        next_checkpoint = written + checkpoint_bytes
                        checkpoint_at = time.monotonic() + CHECKPOINT_SECONDS
                progress(written)
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
        finally:
            hashing.finish()
            checkpoints.finish()
        os.fsync(file.fileno())
    if cancel.is_set():
        raise ServerError(f"download stopped at {written} of {release.size} bytes; will resume")
    return written - offset


class _Hashing:
    """Hashes, in order and in a thread of its own, what the download wrote.

    hashlib releases the GIL on large buffers, so the digest is computed on the
    other core while the download thread reads and writes; at most MAX_QUEUED
    chunks wait (bounded memory).
    """

    MAX_QUEUED = 4

    def __init__(self, hasher: hashlib._Hash) -> None:
        self.hasher = hasher
        self._queue: queue.Queue[memoryview | None] = queue.Queue(self.MAX_QUEUED)
        self._thread = threading.Thread(target=self._run, name="ota-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (data := self._queue.get()) is not None:
            self.hasher.update(data)

    def update(self, data: memoryview) -> None:
        self._queue.put(data)

    def finish(self) -> None:
        """Wait until everything given is hashed (``hasher`` is then complete)."""
        self._queue.put(None)
        self._thread.join()


class _Checkpoints:
    """Makes a partial download durable in the background: fsync, then record the bytes.

    The download thread goes on receiving while the disk syncs. One checkpoint at a
    time: :meth:`offer` declines while one is in flight (the next is offered later).
    Only bytes written before the fsync began are recorded as durable.
    """

    def __init__(self, fd: int, partial: Partial, save: Callable[[Partial], None]) -> None:
        self.fd = fd
        self.partial = partial
        self.save = save
        self._busy = threading.Lock()
        self._thread: threading.Thread | None = None
        self.error: OSError | None = None

    def offer(self, written: int) -> bool:
        if not self._busy.acquire(blocking=False):
            return False
        if self.error is not None:
            self._busy.release()
            raise self.error
        self._thread = threading.Thread(
            target=self._sync, args=(written,), name="ota-checkpoint", daemon=True
        )
        self._thread.start()
        return True

    def _sync(self, written: int) -> None:
        try:
            os.fsync(self.fd)
            self.partial = self.partial.model_copy(update={"durable": written})
            self.save(self.partial)
        except OSError as exc:
            self.error = exc
        finally:
            self._busy.release()

    def finish(self) -> None:
        """Wait for the checkpoint in flight (the file is closed after this)."""
        if self._thread is not None:
            self._thread.join()


def _already_here(release: Release) -> bool:
    """Whether ``release.path`` already holds the verified release (hashed again to know)."""
    try:
        if release.path.stat().st_size != release.size:
            return False
    except OSError:
        return False
    hasher = _hash_prefix(release.path, release.size, release.digest)
    return hasher.digest() == stored_digest(release.digest)[1]


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


def _hash_prefix(part: Path, length: int, digest: str) -> hashlib._Hash:
    hasher = new_hasher(digest)
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


def _make_room(folder: Path, needed: int, margin: int, base: Path | None) -> None:
    """Refuse to start without room; the installed release zip (kept for deltas) goes first."""
    if base is not None and base.is_file():
        try:
            _check_space(folder, needed, margin)
        except ServerError:
            log.warning("little space left: the installed release zip is dropped (no delta)")
            base.unlink(missing_ok=True)
    _check_space(folder, needed, margin)


def _check_space(folder: Path, needed: int, margin: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed + margin:
        raise ServerError(
            f"no space: the download needs {needed / _MIB:.1f} MiB plus a "
            f"{margin / _MIB:.0f} MiB margin, {free / _MIB:.1f} MiB free"
        )


def _range_is(content_range: str, start: int, end: int) -> bool:
    match = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", content_range.strip())
    return bool(match) and (int(match.group(1)), int(match.group(2)) + 1) == (start, end)  # type: ignore[union-attr]


class Pace:
    """The clock of one capped download: every response of it (a delta makes many) draws
    on one budget of ``rate`` bytes per second.

    The link runs ahead of our reads by what the kernel's receive buffer holds:
    when the server answers, it fills at once, and stays full while we read. So
    each request charges ``buffer`` bytes (or the whole answer when shorter) to
    the budget, reads are paced behind that, and the advance is given back
    when the answer ends (the buffer drained without being refilled). Time spent
    without reading (copying from the installed release, a round trip) earns no
    credit beyond a tenth of a second, so nothing bursts after a pause. Measured
    on loopback (server-side, ``tests/test_ratelimit.py``): no second over 1.25x
    the cap; without the small buffer the first second carried 2x to 4x.
    """

    SLACK = 0.1

    def __init__(self, rate: int, buffer: int = 0) -> None:
        self.rate = rate
        self.buffer = buffer
        self.began = time.monotonic()
        self.sent = 0
        self.advance = 0

    def request(self, length: int) -> None:
        """A request whose answer has ``length`` bytes is about to be sent: its first
        bytes may come at once, and the reads after them wait for it."""
        self._spend(0)
        self.advance = min(self.buffer, max(0, length))
        self.sent += self.advance

    def answered(self) -> None:
        """The answer of the last request ended: the buffer's advance is given back."""
        self.sent -= self.advance
        self.advance = 0

    def wait(self, count: int) -> None:
        """Sleep until ``count`` more bytes read fit the budget; then count them."""
        self._spend(count)

    def _spend(self, count: int) -> None:
        elapsed = time.monotonic() - self.began
        self.sent = max(self.sent, int((elapsed - self.SLACK) * self.rate)) + count
        ahead = self.sent / self.rate - elapsed
        if ahead > 0:
            time.sleep(ahead)


def paced(chunks: Iterable[bytes], rate: int, pace: Pace | None = None) -> Iterator[bytes]:
    """``chunks`` at no more than ``rate`` bytes per second (0: as they come).

    Each piece is at most a tenth of a second's worth, and the pace is kept
    from the start of the transfer (``pace``, shared by its requests, else from
    now): no burst ever exceeds a second's worth.
    """
    if rate <= 0:
        yield from chunks
        return
    clock = pace or Pace(rate)
    piece = max(1024, rate // 10)
    for chunk in chunks:
        for at in range(0, len(chunk), piece):
            part = chunk[at : at + piece]
            clock.wait(len(part))
            yield part


def receive_window(rate: int) -> int:
    """SO_RCVBUF under a rate cap (0: the kernel's own, autotuned): an eighth of a
    second's worth.

    Pacing reads is not enough: the kernel accepts what the sender sends until
    its receive buffer is full (128 KiB at first, autotuned to megabytes), so a
    capped download would start with a burst of that size on the link: 2x to 4x
    the cap in the first second at 16 to 64 KiB/s, measured. Linux doubles the
    value and the TCP window is most of that, about 0.2 s worth: the cap is
    reached on links whose round trip is under about 190 ms, and a slower
    round trip runs below the cap, never above. A quarter second's worth
    tolerated twice the round trip but let 1.3x to 1.4x of the cap through in
    some seconds (loopback, window updates come in steps of the buffer's size).
    """
    if rate <= 0:
        return 0
    return max(4096, min(rate // 8, 4 * _MIB))


class _CappedAdapter(WatchedAdapter):
    """Connections whose receive buffer is set before connecting (it fixes the window scale)."""

    def __init__(self, window: int) -> None:
        self.window = window
        super().__init__()

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
    ) -> None:
        pool_kwargs["socket_options"] = [
            *HTTPConnection.default_socket_options,
            (socket.SOL_SOCKET, socket.SO_RCVBUF, self.window),
        ]
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)


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
    length = headers.get("Content-Length", "").strip()
    if not (length.isascii() and length.isdigit()) or len(length) > 18:  # no sign, no "²"
        shown = f": {length[:20]!r}" if length else ""
        raise ServerError(f"refused release {version}: invalid Content-Length{shown}")
    size = int(length)
    try:
        digest = format_digest(*offered_digest(headers))
    except DigestError as exc:
        raise ServerError(f"refused release {version}: {exc}") from None
    try:
        return Offer(
            version=version,
            size=size,
            digest=digest,
            etag=headers.get("ETag", ""),
            min_version=headers.get("Min-Version", ""),
            max_version=headers.get("Max-Version", ""),
            filename=_filename(headers.get("Content-Disposition", "")),
        )
    except ValidationError as exc:
        reason = str(exc.errors()[0]["msg"]) if exc.errors() else "invalid headers"
        raise ServerError(f"refused release {version}: {reason}") from None


_HTTP_HINTS = {
    400: "; if the server requires a client certificate, set cert_file and key_file",
    401: "; check init_id and init_key",
    403: "; check init_id and init_key",
    404: "; the server does not know this device: check init_id and server_url",
}


def _http_error(response: requests.Response) -> ServerError:
    code = response.status_code
    reason = f"server answered {code} {response.reason or ''}".strip()
    hint = _HTTP_HINTS.get(code, "")
    if code == 400 and not response.url.startswith("https://"):
        hint = ""
    if code == 400 and "No required SSL certificate" in _short_body(response):
        hint = "; the server requires a client certificate: set cert_file and key_file"
    return ServerError(
        reason + hint,
        retry_after=retry_after(response.headers.get("Retry-After")),
        permanent=code in (401, 403, 404),
    )


def _short_body(response: requests.Response) -> str:
    """The start of a small error page (nginx names a missing client certificate there)."""
    if response.request.method == "HEAD" or int(response.headers.get("Content-Length") or 0) > 4096:
        return ""
    try:
        return response.text[:4096]
    except (requests.RequestException, OSError):
        return ""


def _network_error(exc: requests.RequestException) -> str:
    """What went wrong and where, for the operator; never the request's headers (the key).

    The text is built from the parts of the exception chain, never from the
    whole exception, which could quote a request.
    """
    where = _origin(exc)
    causes = list(_chain(exc))
    if isinstance(exc, requests.exceptions.SSLError):
        return f"TLS error with {where}: {_tls_reason(causes)}"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return f"connection to {where} ended early"
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        limit = re.search(r"connect timeout=([\d.]+)", " ".join(str(c) for c in causes))
        within = f" within {float(limit.group(1)):g}s" if limit else ""
        return f"cannot connect to {where}: no answer{within} (connect_timeout)"
    if isinstance(exc, requests.exceptions.ReadTimeout) or any(
        "Read timed out" in str(c) for c in causes
    ):
        return f"transfer from {where} stalled (nothing received within stall_timeout)"
    if isinstance(exc, requests.exceptions.ConnectionError):
        return f"cannot connect to {where}: {_connection_reason(causes)}"
    return f"HTTP error with {where}: {type(exc).__name__}"


def _origin(exc: requests.RequestException) -> str:
    """``scheme://host:port`` of the failed request (no path, no query)."""
    request = exc.request
    url = request.url if request is not None and request.url else ""
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname:
        return "the server"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}:{port}"


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and every cause behind it (requests and urllib3 nest them in args)."""
    seen: list[BaseException] = []
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop(0)
        if any(current is s for s in seen):
            continue
        seen.append(current)
        for nested in (
            getattr(current, "reason", None),
            *(a for a in current.args if isinstance(a, BaseException)),
            current.__cause__,
            current.__context__,
        ):
            if isinstance(nested, BaseException):
                todo.append(nested)
    return seen


def _connection_reason(causes: list[BaseException]) -> str:
    for cause in causes:
        if type(cause).__name__ == "NameResolutionError" or isinstance(cause, socket.gaierror):
            return "the host name could not be resolved (DNS); check server_url"
    for cause in causes:
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused (is the server running and the port right?)"
        if isinstance(cause, ConnectionResetError):
            return "connection reset by the server"
        if isinstance(cause, OSError) and cause.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            return f"{os.strerror(cause.errno)} (check the network)"
    for cause in causes:
        if isinstance(cause, OSError) and cause.errno and cause.strerror:
            return cause.strerror.lower()
    return "the connection failed"


def _tls_reason(causes: list[BaseException]) -> str:
    for cause in causes:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return _verify_reason(cause)
    for cause in causes:
        if isinstance(cause, ssl.SSLEOFError):
            return (
                "the server ended the TLS handshake: it may require a client certificate "
                "(set cert_file and key_file) or not trust the one given"
            )
        if isinstance(cause, ssl.SSLError):
            text = f"{cause.reason or ''} {cause}".upper()
            if "KEY_VALUES_MISMATCH" in text:
                return "key_file does not belong to cert_file (a local mistake: fix the pair)"
            if any(k in text for k in ("WRONG_VERSION_NUMBER", "RECORD_LAYER", "HTTP_REQUEST")):
                return "the server does not speak TLS (use http://, or check the port)"
            if "CERTIFICATE_REQUIRED" in text or "HANDSHAKE_FAILURE" in text:
                return "the server requires a client certificate: set cert_file and key_file"
            if any(k in text for k in ("BAD_CERTIFICATE", "UNKNOWN_CA", "CERTIFICATE_UNKNOWN")):
                return "the server does not accept our client certificate (cert_file)"
            return str(cause.reason or cause.strerror or "handshake failed").replace("_", " ")
    return "handshake failed"


def _verify_reason(cause: ssl.SSLCertVerificationError) -> str:
    message = cause.verify_message or ""
    if "expired" in message:
        return "the server certificate has expired"
    if "not yet valid" in message:
        return "the server certificate is not yet valid (check this device's clock)"
    if "mismatch" in message or "not valid for" in message:
        return f"the server certificate is for another host name ({message})"
    if "issuer" in message or "self-signed" in message or "self signed" in message:
        return (
            f"the server certificate is signed by an unknown CA ({message}); "
            "set ca_file to the CA that signed it"
        )
    return f"the server certificate could not be verified ({message or cause})"
