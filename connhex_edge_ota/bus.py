"""The agent's NATS bus: publish, and serve request/reply subjects, across reconnects.

The bus accepts subscriptions before the first connection exists and applies
them when it does, and drops publications while disconnected (statuses are
republished by the next heartbeat), so nothing in the update loop waits on NATS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

from connhex_edge_ota.natsauth import NatsAuth, redact

log = logging.getLogger(__name__)

MAX_ERRORS_LOGGED = 10
"""Distinct errors (refused credentials, TLS ...) logged as warnings while down, at most."""

Handler = Callable[[str, bytes], Awaitable[bytes]]
"""A request handler: takes the request's subject and body, returns the reply body."""


class Bus:
    """A NATS connection that may not exist yet."""

    def __init__(self, nc: Client | None = None) -> None:
        self._nc = nc
        self._handlers: dict[str, Handler] = {}
        self._subscribed: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._link: _Link | None = None

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    async def connect(
        self, url: str, name: str, stop: asyncio.Event, auth: NatsAuth | None = None
    ) -> None:
        """Connect to ``url`` with ``auth``, retrying until connected or ``stop`` is set.

        The first failure is logged as a warning, then one line when the bus is
        lost and one when it is back; each distinct other error (refused
        credentials, TLS) once. Logs show the URL without its password.
        """
        shown = redact(url)
        link = self._link = _Link(shown)
        try:
            options = auth.connect_options() if auth is not None else {}
        except (OSError, ssl.SSLError) as exc:  # unreadable TLS files: no bus, the loop goes on
            log.error("NATS at %s: TLS files not usable (%s); not connecting", shown, exc)
            return
        delay = 0.1
        while not stop.is_set():
            try:
                nc = await nats.connect(
                    url,
                    name=name,
                    connect_timeout=2,
                    reconnect_time_wait=1,
                    max_reconnect_attempts=-1,
                    allow_reconnect=True,
                    error_cb=link.error,
                    disconnected_cb=link.disconnected,
                    reconnected_cb=link.reconnected,
                    **options,
                )
            except Exception as exc:
                await link.error(exc)
                log.debug("retrying NATS in %.1fs", delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, 5.0)
                continue
            self._nc = nc
            link.up = True
            link.errors_logged.clear()
            # After "not reachable", the pair's second line, at the same level.
            log.log(
                logging.WARNING if link.told_down else logging.INFO,
                "connected to NATS at %s",
                shown,
            )
            link.told_down = False
            for subject in list(self._handlers):
                await self._subscribe(subject)
            return

    async def publish(self, subject: str, payload: bytes) -> bool:
        """Publish ``payload``; ``False`` when there is no connection to publish on."""
        if not self.connected:
            return False
        assert self._nc is not None
        try:
            await self._nc.publish(subject, payload)
        except Exception as exc:
            log.debug("publish on %s failed: %s", subject, exc)
            return False
        return True

    async def serve(self, subject: str, handler: Handler) -> None:
        """Answer requests on ``subject`` (wildcards allowed) with ``handler``, now or once
        connected."""
        self._handlers[subject] = handler
        if self.connected:
            await self._subscribe(subject)

    async def request(self, subject: str, payload: bytes, timeout: float) -> bytes:
        """Send a request and return the reply's body; ConnectionError while disconnected."""
        if not self.connected:
            raise ConnectionError("not connected to NATS")
        assert self._nc is not None
        reply = await self._nc.request(subject, payload, timeout=timeout)
        return reply.data

    async def flush(self, timeout: int = 2) -> None:
        if self.connected:
            assert self._nc is not None
            try:
                await self._nc.flush(timeout=timeout)
            except Exception as exc:
                log.debug("flush failed: %s", exc)

    async def close(self) -> None:
        """Drain and close; safe to call twice."""
        nc, self._nc = self._nc, None
        if self._link is not None:
            self._link.closing = True
        if nc is not None and not nc.is_closed:
            try:
                await asyncio.wait_for(nc.drain(), 2.0)
            except Exception as exc:
                log.debug("drain failed: %s", exc)
                await nc.close()

    async def _subscribe(self, subject: str) -> None:
        if subject in self._subscribed or self._nc is None:
            return
        handler = self._handlers[subject]

        async def on_msg(msg: Msg) -> None:
            # Each request in its own task: a slow command never delays another.
            task = asyncio.create_task(_answer(msg, handler))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        await self._nc.subscribe(subject, cb=on_msg)
        self._subscribed.add(subject)


async def _answer(msg: Msg, handler: Handler) -> None:
    try:
        reply = await handler(msg.subject, msg.data)
    except Exception:
        log.exception("handler for %s failed", msg.subject)
        reply = b'{"ok": false, "error": "internal error"}'
    if msg.reply:
        await msg.respond(reply)


_CONNECTION_ERRORS = (
    OSError,
    TimeoutError,
    nats.errors.UnexpectedEOF,
    nats.errors.StaleConnectionError,
    nats.errors.ConnectionClosedError,
    nats.errors.NoServersError,
)


class _Link:
    """The NATS connection's state for the log: one line when it is lost, one when it is back.

    nats-py retries by itself and reports each failed attempt; only the first
    one after a change is worth an operator's attention.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.up = False
        self.told_down = False
        self.closing = False
        """Closed on purpose: the disconnect is not news."""
        self.errors_logged: set[str] = set()
        """Other errors logged since the last connection: each once, not at every retry."""

    async def error(self, exc: Exception) -> None:
        if not isinstance(exc, _CONNECTION_ERRORS):
            reason = redact(_reason(exc))
            if reason in self.errors_logged or len(self.errors_logged) >= MAX_ERRORS_LOGGED:
                log.debug("NATS at %s: %s (again)", self.url, reason)
                return
            self.errors_logged.add(reason)
            log.warning("NATS at %s: %s; retrying", self.url, reason)
        elif not self.up and not self.told_down:
            self.told_down = True
            log.warning("NATS at %s not reachable (%s); retrying", self.url, _reason(exc))
        else:
            log.debug("NATS at %s: %s", self.url, _reason(exc))

    async def disconnected(self) -> None:
        if self.up and not self.closing:
            log.warning("NATS connection to %s lost; reconnecting", self.url)
            self.told_down = True
        self.up = False

    async def reconnected(self) -> None:
        self.up = True
        self.errors_logged.clear()
        self.told_down = False
        log.warning("NATS connection to %s back", self.url)


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
