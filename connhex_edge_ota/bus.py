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
"""Distinct connection errors logged as warnings between two connections, at most."""

Handler = Callable[[str, bytes], Awaitable[bytes]]
"""A request handler: takes the request's subject and body, returns the reply body."""


class Bus:
    """A NATS connection that may not exist yet."""

    def __init__(self, nc: Client | None = None) -> None:
        self._nc = nc
        self._handlers: dict[str, Handler] = {}
        self._subscribed: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._shown_url = ""
        self._errors_logged: set[str] = set()
        """Connection errors logged since the last connection: each once, not at every retry."""

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    async def connect(
        self, url: str, name: str, stop: asyncio.Event, auth: NatsAuth | None = None
    ) -> None:
        """Connect to ``url`` with ``auth``, retrying until connected or ``stop`` is set.

        Each distinct failure (unreachable, refused credentials, TLS) is logged
        once as a warning, not at every retry; logs show the URL without its password.
        """
        self._shown_url = redact(url)
        try:
            options = auth.connect_options() if auth is not None else {}
        except (OSError, ssl.SSLError) as exc:  # unreadable TLS files: no bus, the loop goes on
            log.error("NATS at %s: TLS files not usable (%s); not connecting", self._shown_url, exc)
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
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    **options,
                )
            except Exception as exc:
                await self._on_error(exc)
                log.debug("retrying NATS in %.1fs", delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, 5.0)
                continue
            self._nc = nc
            self._errors_logged.clear()
            log.info("connected to NATS at %s", self._shown_url)
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
        if nc is not None and not nc.is_closed:
            try:
                await asyncio.wait_for(nc.drain(), 2.0)
            except Exception as exc:
                log.debug("drain failed: %s", exc)
                await nc.close()

    async def _on_error(self, exc: Exception) -> None:
        reason = redact(str(exc) or type(exc).__name__)
        if reason in self._errors_logged or len(self._errors_logged) >= MAX_ERRORS_LOGGED:
            log.debug("NATS at %s: %s (again)", self._shown_url, reason)
            return
        self._errors_logged.add(reason)
        log.warning("NATS at %s: %s; retrying", self._shown_url, reason)

    async def _on_disconnected(self) -> None:
        if self._nc is not None:
            log.warning("disconnected from NATS at %s", self._shown_url)

    async def _on_reconnected(self) -> None:
        self._errors_logged.clear()
        log.info("reconnected to NATS at %s", self._shown_url)

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
