"""Wall-clock limits on HTTP exchanges: a deadline that shuts a request's sockets, and a rate floor.

requests' timeouts apply to each read, so a server that sends one byte every
half second never trips them. A :class:`Deadline` counts wall-clock time
instead: when it passes, a watchdog thread shuts down every socket the request
opened or used, and the blocked read returns at once. A :class:`RateFloor`
cuts a body that arrives slower than a minimum average rate.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import DecodeError, ProtocolError, ReadTimeoutError, SSLError
from urllib3.poolmanager import ProxyManager

_current = threading.local()


class Deadline:
    """``with Deadline(seconds):`` shuts the sockets of requests made inside once it passes.

    Only requests sent through a session with :class:`WatchedAdapter` mounted
    are watched, and only on the thread that entered the block.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        """True once the deadline passed (the request then failed because of it)."""
        self._sockets: list[socket.socket] = []
        self._owned: list[socket.socket] = []
        """Duplicates made for the watch: closed when the block ends."""
        self._lock = threading.Lock()
        self._active = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> Deadline:
        self._active = True
        _current.deadline = self
        self._timer.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._timer.cancel()
        with self._lock:
            self._active = False
            self._sockets.clear()
            owned, self._owned = self._owned, []
        for sock in owned:
            sock.close()
        _current.deadline = None

    def watch(self, sock: socket.socket | None, owned: bool = False) -> None:
        """Shut ``sock`` when the deadline passes (at once when it already has).

        ``owned``: ``sock`` is a duplicate made for the watch, closed when the block ends.
        """
        if sock is None:
            return
        with self._lock:
            if not self._active:
                if owned:
                    sock.close()
                return
            if owned:
                self._owned.append(sock)
            if self.expired:
                _shut(sock)
            else:
                self._sockets.append(sock)

    def _expire(self) -> None:
        with self._lock:
            if not self._active:
                return
            self.expired = True
            for sock in self._sockets:
                _shut(sock)


def _shut(sock: socket.socket) -> None:
    # The plain socket's shutdown, also for TLS sockets: it only touches the
    # file descriptor, which another thread is blocked reading.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _watch(sock: socket.socket | None) -> None:
    deadline: Deadline | None = getattr(_current, "deadline", None)
    if deadline is not None:
        deadline.watch(sock)


def _watch_new(sock: socket.socket) -> None:
    deadline: Deadline | None = getattr(_current, "deadline", None)
    if deadline is not None:
        # A duplicate: TLS takes the original's descriptor over (leaving the object
        # empty) before its handshake, which a trickling server can stretch too.
        # Shutting a duplicate down shuts the connection itself.
        deadline.watch(sock.dup(), owned=True)


class _WatchedHTTPConnection(HTTPConnection):
    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _watch_new(sock)
        return sock

    def getresponse(self) -> Any:  # the status line and headers are read here
        _watch(self.sock)
        return super().getresponse()


class _WatchedHTTPSConnection(HTTPSConnection):
    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _watch_new(sock)
        return sock

    def getresponse(self) -> Any:
        _watch(self.sock)
        return super().getresponse()


class _WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


_POOLS: dict[str, type[HTTPConnectionPool]] = {
    "http": _WatchedHTTPPool,
    "https": _WatchedHTTPSPool,
}


class WatchedAdapter(HTTPAdapter):
    """A requests adapter whose connections hand their sockets to the current :class:`Deadline`."""

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
    ) -> None:
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)
        self.poolmanager.pool_classes_by_scheme = dict(_POOLS)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if isinstance(manager, ProxyManager):  # not SOCKS: it has connection classes of its own
            manager.pool_classes_by_scheme = dict(_POOLS)
        return manager


class TooSlow(Exception):
    """The body arrived slower than the rate floor; ``str()`` says by how much."""


class RateFloor:
    """Cuts a transfer whose average rate over a window falls below ``rate`` bytes per second.

    Measured over consecutive windows of ``window`` seconds (the first one
    starting when the body starts); ``rate`` 0 disables it.
    """

    def __init__(self, rate: float, window: float) -> None:
        self.rate = rate
        self.window = window
        self._start = time.monotonic()
        self._start_bytes = 0

    def update(self, received: int) -> None:
        """Record that ``received`` bytes have arrived so far; TooSlow when too few did."""
        if self.rate <= 0:
            return
        now = time.monotonic()
        elapsed = now - self._start
        if elapsed < self.window:
            return
        got = received - self._start_bytes
        if got < self.rate * elapsed:
            raise TooSlow(
                f"{got / elapsed:.0f} bytes/s over the last {elapsed:.0f}s, "
                f"below min_transfer_rate {self.rate:.0f}"
            )
        self._start, self._start_bytes = now, received


def chunks_as_they_come(raw: Any, size: Callable[[], int]) -> Iterator[bytes]:
    """The body of a streamed urllib3 response in pieces of at most ``size()`` bytes
    (asked before each read, so a caller can stop pieces at a boundary of its own).

    Unlike ``iter_content``, which waits for ``size`` bytes, each piece is what
    one read of the socket gave, so a trickle is seen (and measured) as it comes.
    Errors are requests' own, as ``iter_content`` raises them.
    """
    # urllib3 < 2.3 has no read1: whole pieces are the best it can do.
    read = getattr(raw, "read1", None) or raw.read
    try:
        while chunk := read(size(), decode_content=True):
            yield chunk
    except ProtocolError as exc:
        raise requests.exceptions.ChunkedEncodingError(exc) from None
    except DecodeError as exc:
        raise requests.exceptions.ContentDecodingError(exc) from None
    except ReadTimeoutError as exc:
        raise requests.exceptions.ConnectionError(exc) from None
    except SSLError as exc:
        raise requests.exceptions.SSLError(exc) from None
