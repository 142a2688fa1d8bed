"""Deadlines on every transfer: a raw-socket server that trickles headers or a body."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from connhex_edge_ota.client import Server, ServerError
from connhex_edge_ota.config import load_settings
from connhex_edge_ota.server import ReleaseServer
from connhex_edge_ota.state import Offer, Partial
from connhex_edge_ota.store import Store
from connhex_edge_ota.testing import OtaAgent, StatusWatcher
from tests.conftest import offered_release

BODY = bytes(range(256)) * 64  # 16 KiB
TRICKLE_FOR = 20.0
"""How long the server keeps trickling before it hangs up: a client without the
defence sees the connection end after this, with another error than "too slow"."""


class TrickleServer:
    """Answers the OTA API on 127.0.0.1, sending headers or body one byte at a time."""

    def __init__(
        self,
        trickle: str,
        interval: float = 0.05,
        step: int = 1,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.trickle = trickle
        self.tls = tls
        """"head": the headers of every answer; "body": the body of a GET."""
        self.interval = interval
        self.step = step
        """Bytes per write."""
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.stopping = threading.Event()
        self.gave_up = threading.Event()
        """Set when a trickle lasted TRICKLE_FOR and the server hung up: the client
        had not cut it."""
        self._threads: list[threading.Thread] = []
        accept = threading.Thread(target=self._accept, daemon=True)
        accept.start()
        self._threads.append(accept)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._answer, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _answer(self, conn: socket.socket) -> None:
        if self.trickle == "relay":
            self._relay(conn)
            return
        if self.tls is not None:
            try:
                conn = self.tls.wrap_socket(conn, server_side=True)
            except OSError:
                conn.close()
                return
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                data = conn.recv(4096)
                if not data:
                    return
                request += data
            method = request.split(b" ", 1)[0]
            digest = base64.b64encode(hashlib.sha256(BODY).digest()).decode()
            head = (
                "HTTP/1.1 200 OK\r\n"
                "Version: 2.0.0\r\n"
                'ETag: "trickle"\r\n'
                f"Content-Length: {len(BODY)}\r\n"
                f"Content-Digest: sha-256=:{digest}:\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
            if self.trickle == "head":
                self._drip(conn, head)
                return
            conn.sendall(head)
            if method == b"GET":
                self._drip(conn, BODY)

    upstream: tuple[str, int] = ("127.0.0.1", 0)
    """For "relay": the server whose answers (TLS handshake included) are trickled."""

    def _relay(self, conn: socket.socket) -> None:
        with conn, socket.create_connection(self.upstream) as upstream:

            def forward() -> None:
                with contextlib.suppress(OSError):
                    while data := conn.recv(4096):
                        upstream.sendall(data)
                with contextlib.suppress(OSError):  # the client left: so does the relay
                    upstream.shutdown(socket.SHUT_RDWR)

            threading.Thread(target=forward, daemon=True).start()
            with contextlib.suppress(OSError):
                while (data := upstream.recv(4096)) and self._drip(conn, data):
                    pass

    def _drip(self, conn: socket.socket, data: bytes) -> bool:
        """Send ``data`` a step at a time; False when it stopped before the end."""
        until = time.monotonic() + TRICKLE_FOR
        for i in range(0, len(data), self.step):
            if self.stopping.is_set():
                return False
            if time.monotonic() > until:
                self.gave_up.set()
                return False
            try:
                conn.sendall(data[i : i + self.step])
            except OSError:
                return False
            self.stopping.wait(self.interval)
        return True

    def close(self) -> None:
        self.stopping.set()
        self.listener.close()


@pytest.fixture
def trickle_server() -> Iterator[Callable[[str], TrickleServer]]:
    servers: list[TrickleServer] = []

    def start(trickle: str) -> TrickleServer:
        servers.append(TrickleServer(trickle))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def client(tmp_path: Path, url: str, **overrides: object) -> Server:
    options: dict[str, object] = {
        "server_url": url,
        "init_id": "dev",
        "install_dir": str(tmp_path / "opt"),
        "stall_timeout": "2s",  # each byte comes much sooner: the read timeout never trips
        "check_timeout": "1s",
        "free_space_margin": 0,
    }
    options.update(overrides)
    return Server(load_settings(None, **options))


def test_a_check_whose_headers_trickle_is_cut_at_check_timeout(
    tmp_path: Path, trickle_server: Callable[[str], TrickleServer]
) -> None:
    server = trickle_server("head")
    with pytest.raises(ServerError, match=r"^server too slow: no complete answer within 1s"):
        client(tmp_path, server.url).check("1.0.0")


def test_a_check_over_tls_whose_headers_trickle_is_cut_too(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server = TrickleServer("head", tls=context)
    try:
        device = client(tmp_path, server.url, ca_file=str(ca_file))
        with pytest.raises(ServerError, match=r"^server too slow: no complete answer"):
            device.check("1.0.0")
    finally:
        server.close()


def test_a_trickled_tls_handshake_is_cut_too(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    folder = tmp_path / "releases"
    folder.mkdir()
    with ReleaseServer(folder, tls=context) as real:
        relay = TrickleServer("relay")
        relay.upstream = ("127.0.0.1", real.port)
        try:
            device = client(
                tmp_path,
                f"https://127.0.0.1:{relay.port}",
                ca_file=str(ca_file),
                connect_timeout="1m",  # longer than the relay trickles: only the deadline cuts
            )
            with pytest.raises(ServerError, match=r"^server too slow: no complete answer"):
                device.check("1.0.0")
            assert not relay.gave_up.is_set()
        finally:
            relay.close()


def test_a_download_whose_body_trickles_is_cut_and_keeps_what_came(
    tmp_path: Path, trickle_server: Callable[[str], TrickleServer]
) -> None:
    server = trickle_server("body")
    device = client(tmp_path, server.url, min_transfer_rate=1024, stall_timeout="1s")
    offer = device.check("1.0.0")
    assert offer is not None
    store = Store(device.settings.store_dir)
    store.create()
    release = offered_release(store, offer)
    partial = Partial(version="2.0.0", etag=offer.etag, digest=offer.digest, size=offer.size)
    with pytest.raises(ServerError, match=r"^server too slow: .* below min_transfer_rate 1024"):
        device.download(release, partial, lambda _p: None, lambda _n, _t: None, threading.Event())
    kept = release.part_path.stat().st_size
    assert 0 < kept < 1024  # what came is kept for the resume
    assert BODY.startswith(release.part_path.read_bytes())


def test_a_download_whose_headers_trickle_is_cut(
    tmp_path: Path, trickle_server: Callable[[str], TrickleServer]
) -> None:
    server = trickle_server("head")
    device = client(tmp_path, server.url)
    store = Store(device.settings.store_dir)
    store.create()
    digest = "sha-256=:" + base64.b64encode(hashlib.sha256(BODY).digest()).decode() + ":"
    offer = Offer(version="2.0.0", size=len(BODY), digest=digest, etag='"trickle"')
    release = offered_release(store, offer)
    partial = Partial(version="2.0.0", etag=offer.etag, digest=offer.digest, size=offer.size)
    with pytest.raises(ServerError, match=r"^server too slow: no complete answer"):
        device.download(release, partial, lambda _p: None, lambda _n, _t: None, threading.Event())


def test_a_zero_rate_floor_lets_a_slow_body_finish(
    tmp_path: Path, trickle_server: Callable[[str], TrickleServer]
) -> None:
    server = trickle_server("body")
    server.interval, server.step = 0.01, 64  # 16 KiB in under 3 s, 64 bytes at a time
    device = client(tmp_path, server.url, min_transfer_rate=10**9, stall_timeout="1s")
    offer = device.check("1.0.0")
    assert offer is not None
    store = Store(device.settings.store_dir)
    store.create()
    release = offered_release(store, offer)
    saved: list[Partial] = []
    partial = Partial(version="2.0.0", etag=offer.etag, digest=offer.digest, size=offer.size)
    with pytest.raises(ServerError, match="too slow"):
        device.download(release, partial, saved.append, lambda _n, _t: None, threading.Event())
    relaxed = client(tmp_path, server.url, min_transfer_rate=0, stall_timeout="1s")
    relaxed.download(release, saved[-1], saved.append, lambda _n, _t: None, threading.Event())
    assert release.path.read_bytes() == BODY


def test_the_service_reports_a_trickling_server_as_too_slow(
    ota_agent: Callable[..., OtaAgent],
    trickle_server: Callable[[str], TrickleServer],
    statuses: StatusWatcher,
) -> None:
    heads = trickle_server("head")
    agent = ota_agent(server_url=heads.url, check_timeout="1s", stall_timeout="2s")
    failed = statuses.wait_status("check_failed")
    assert failed.error.startswith("server too slow: no complete answer within 1s")
    agent.stop()
    bodies = trickle_server("body")
    mark = statuses.mark()
    ota_agent(
        server_url=bodies.url,
        auto_download=True,
        stall_timeout="1s",
        min_transfer_rate=4096,
        retry_floor="1h",
    )
    failed = statuses.wait_status("download_failed", after=mark)
    assert failed.error.startswith("server too slow: ")
    assert "below min_transfer_rate 4096" in failed.error
