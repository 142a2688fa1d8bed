"""A local release server speaking the Connhex OTA API from a folder of release zips.

For development, tests and the demo. The newest ``*.zip`` of the folder (by
modification time) is the active release; its version comes from a sidecar file
``<zip>.version`` when there is one, else from the file name (``fw-1.2.3.zip``
-> ``1.2.3``). ``Faults`` lets tests cut, stall or refuse transfers on purpose.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from connhex_edge_ota.digest import SHA256, SHA512, format_digest

log = logging.getLogger(__name__)

STOP_POLL = 0.02
"""Seconds between the background server's looks at a stop request."""

_VERSION_IN_NAME = re.compile(r"^(?:.*?[-_])?v?(\d[^/]*)$")


def version_of(path: Path) -> str:
    sidecar = path.with_name(path.name + ".version")
    if sidecar.is_file():
        return sidecar.read_text().strip()
    stem = path.name.removesuffix(".zip")
    match = _VERSION_IN_NAME.match(stem)
    return match.group(1) if match else stem


@dataclass(frozen=True)
class Published:
    path: Path
    version: str
    size: int
    sha256: bytes

    @property
    def etag(self) -> str:
        return f'"{self.sha256.hex()[:32]}"'


@dataclass
class Faults:
    """Misbehaviour on demand, for tests. Every field applies to GET bodies unless said."""

    cut_at: int | None = None
    """Close the connection once this many bytes of the file have been sent (once)."""
    stall_at: int | None = None
    """Stop sending (without closing) at this byte offset, for ``stall_for`` seconds (once)."""
    stall_for: float = 3600.0
    fail_next: int = 0
    """Answer the next N requests (HEAD or GET) with ``fail_status``."""
    fail_status: int = 503
    retry_after: str | None = None
    rate: float | None = None
    """Bytes per second, to make a transfer last."""
    ignore_range: bool = False
    refuse_range: bool = False
    """Answer every ``Range`` request with 416."""
    swap_after_head: Path | None = None
    """Publish this file right after the next HEAD (the release changes before GET)."""
    head_headers: dict[str, str] = field(default_factory=dict)
    """Headers a HEAD answer sends in place of the computed ones (a lying server)."""
    send_buffer: int | None = None
    """SO_SNDBUF of new connections, and the size of each write: what the server counts
    as sent is then close to what crossed the link (the kernel would otherwise absorb
    megabytes at once)."""


DIGEST_FORMS = ("content-digest", "repr-digest", "digest", "legacy", "sha-512", "none")
"""How the server states a release's digest (``ReleaseFolder.digest_form``):
``content-digest`` ``Content-Digest: sha-256=:<b64>:`` (the default);
``repr-digest`` ``Repr-Digest: sha-512=:<b64>:, sha-256=:<b64>:`` (RFC 9530, two algorithms);
``digest`` ``Digest: SHA-256=<b64>`` (RFC 3230); ``legacy`` ``Content-Digest: sha256=<hex>``;
``sha-512`` ``Content-Digest: sha-512=:<b64>:`` only; ``none`` no digest header."""


def digest_header(form: str, release: Published) -> tuple[str, str] | None:
    """The header stating ``release``'s digest in ``form`` (one of DIGEST_FORMS)."""
    sha256 = format_digest(SHA256, release.sha256)
    if form == "content-digest":
        return "Content-Digest", sha256
    if form == "repr-digest":
        return "Repr-Digest", f"{format_digest(SHA512, _sha512(release.path))}, {sha256}"
    if form == "digest":
        return "Digest", f"SHA-256={base64.b64encode(release.sha256).decode()}"
    if form == "legacy":
        return "Content-Digest", f"sha256={release.sha256.hex()}"
    if form == "sha-512":
        return "Content-Digest", format_digest(SHA512, _sha512(release.path))
    if form == "none":
        return None
    raise ValueError(f"unknown digest form {form!r}; expected one of {', '.join(DIGEST_FORMS)}")


def _sha512(path: Path) -> bytes:
    hasher = hashlib.sha512()
    with path.open("rb") as file:
        while block := file.read(1024 * 1024):
            hasher.update(block)
    return hasher.digest()


@dataclass
class Seen:
    method: str
    headers: dict[str, str]
    status: int = 0
    sent: int = 0


@dataclass
class ReleaseFolder:
    folder: Path
    init_key: str | None = None
    faults: Faults = field(default_factory=Faults)
    digest_form: str = "content-digest"
    """One of DIGEST_FORMS: how HEAD and GET state the release's digest."""
    requests: list[Seen] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    """Sent with every answer that describes the release (e.g. ``Min-Version``)."""
    _cache: dict[tuple[Path, float, int], Published] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def active(self) -> Published | None:
        zips = [p for p in self.folder.glob("*.zip") if p.is_file()]
        if not zips:
            return None
        path = max(zips, key=lambda p: (p.stat().st_mtime_ns, p.name))
        stat = path.stat()
        key = (path, stat.st_mtime, stat.st_size)
        with self._lock:
            if key not in self._cache:
                hasher = hashlib.sha256()
                with path.open("rb") as file:
                    while block := file.read(1024 * 1024):
                        hasher.update(block)
                self._cache[key] = Published(path, version_of(path), stat.st_size, hasher.digest())
            return self._cache[key]

    def publish(self, source: Path, name: str | None = None) -> Path:
        """Copy ``source`` in as the newest release (``name`` defaults to its own)."""
        dest = self.folder / (name or source.name)
        tmp = dest.with_name("." + dest.name + ".tmp")
        tmp.write_bytes(source.read_bytes())
        tmp.replace(dest)
        newest = max((p.stat().st_mtime for p in self.folder.glob("*.zip")), default=0.0)
        stamp = max(time.time(), newest + 1)

        os.utime(dest, (stamp, stamp))
        return dest


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        if self.server.releases.faults.send_buffer:
            self.connection.setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, self.server.releases.faults.send_buffer
            )

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        releases = self.server.releases
        seen = Seen(self.command, {k: v for k, v in self.headers.items()})
        releases.requests.append(seen)
        faults = releases.faults
        if not re.fullmatch(r"/iot/ota/[^/]+", self.path.split("?")[0]):
            return self._empty(seen, HTTPStatus.NOT_FOUND)
        if (
            releases.init_key is not None
            and self.headers.get("Authorization") != f"Thing {releases.init_key}"
        ):
            return self._empty(seen, HTTPStatus.UNAUTHORIZED)
        if faults.fail_next > 0:
            faults.fail_next -= 1
            extra = {"Retry-After": faults.retry_after} if faults.retry_after else {}
            return self._empty(seen, faults.fail_status, extra)
        release = releases.active()
        if release is None:
            return self._empty(seen, HTTPStatus.NO_CONTENT)
        if not body:
            if self.headers.get("Version") == release.version:
                return self._empty(seen, HTTPStatus.NOT_MODIFIED)
            self._headers(seen, HTTPStatus.OK, release, release.size)
            if faults.swap_after_head is not None:
                swap, faults.swap_after_head = faults.swap_after_head, None
                releases.publish(swap)
            return None
        if_match = self.headers.get("If-Match")
        if if_match and if_match != "*" and if_match != release.etag:
            return self._empty(seen, HTTPStatus.PRECONDITION_FAILED)
        start, end = 0, release.size
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match and not faults.ignore_range:
            start = int(match.group(1))
            if match.group(2):  # a closed range ends at its last byte, clipped to the file
                end = min(end, int(match.group(2)) + 1)
            if start >= release.size or start >= end or faults.refuse_range:
                return self._empty(
                    seen,
                    HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE,
                    {"Content-Range": f"bytes */{release.size}"},
                )
            self._headers(
                seen,
                HTTPStatus.PARTIAL_CONTENT,
                release,
                end - start,
                {"Content-Range": f"bytes {start}-{end - 1}/{release.size}"},
            )
        else:
            start, end = 0, release.size
            self._headers(seen, HTTPStatus.OK, release, release.size)
        self._send_body(seen, release, start, end)
        return None

    def _send_body(self, seen: Seen, release: Published, start: int, end: int) -> None:
        faults = self.server.releases.faults
        position = start
        began = time.monotonic()
        with release.path.open("rb") as file:
            file.seek(start)
            while position < end:
                block = file.read(min(faults.send_buffer or 64 * 1024, end - position))
                if not block:
                    break
                # A fault strikes in the request whose range covers its offset.
                if (
                    faults.stall_at is not None
                    and start <= faults.stall_at < end
                    and (position + len(block) > faults.stall_at)
                ):
                    keep = max(0, faults.stall_at - position)
                    self._write(block[:keep], seen)
                    faults.stall_at = None
                    time.sleep(faults.stall_for)
                    self.close_connection = True
                    return
                if (
                    faults.cut_at is not None
                    and start <= faults.cut_at < end
                    and (position + len(block) > faults.cut_at)
                ):
                    keep = max(0, faults.cut_at - position)
                    self._write(block[:keep], seen)
                    faults.cut_at = None
                    self.close_connection = True
                    return
                if not self._write(block, seen):
                    return
                position += len(block)
                if faults.rate:
                    ahead = (position - start) / faults.rate - (time.monotonic() - began)
                    if ahead > 0:
                        time.sleep(ahead)

    def _write(self, block: bytes, seen: Seen) -> bool:
        try:
            self.wfile.write(block)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return False
        seen.sent += len(block)
        return True

    def _headers(
        self,
        seen: Seen,
        status: int,
        release: Published,
        length: int,
        extra: dict[str, str] | None = None,
    ) -> None:
        seen.status = status
        self.send_response(status)
        self.send_header("Version", release.version)
        self.send_header("ETag", release.etag)
        self.send_header("Content-Length", str(length))
        digest = digest_header(self.server.releases.digest_form, release)
        if digest is not None:
            self.send_header(*digest)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Disposition", f'attachment; filename="{release.path.name}"')
        for key, value in self.server.releases.headers.items():
            self.send_header(key, value)
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()

    def send_header(self, keyword: str, value: str) -> None:
        lies = self.server.releases.faults.head_headers if self.command == "HEAD" else {}
        replaced = {k.lower(): v for k, v in lies.items()}
        if keyword.lower() in replaced:
            value = replaced[keyword.lower()]
        super().send_header(keyword, value)

    def _empty(self, seen: Seen, status: int, extra: dict[str, str] | None = None) -> None:
        seen.status = status
        self.send_response(status)
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", "0")
        self.end_headers()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    releases: ReleaseFolder


class ReleaseServer:
    """The release server on ``host:port`` (port 0 picks a free one), in a background thread."""

    def __init__(
        self,
        folder: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        init_key: str | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.releases = ReleaseFolder(folder, init_key=init_key)
        self.httpd = _Server((host, port), _Handler)
        self.httpd.releases = self.releases
        self.scheme = "https" if tls else "http"
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def faults(self) -> Faults:
        return self.releases.faults

    def start(self) -> ReleaseServer:
        # A short poll: stop() waits for the loop to see the request (0.5 s by default).
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, args=(STOP_POLL,), name="release-server", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> ReleaseServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
