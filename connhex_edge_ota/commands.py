"""NATS commands ``commands.ota.<verb>``: request/reply with a JSON answer.

The service listens on ``commands.ota.>``. Every reply is ``{"ok": bool,
"error": str, "status": {<the five payload keys>}}``. ``status`` answers at
once. ``check``, ``download`` and ``install`` queue the step (or join the same
step already queued or running) and answer when it is done, or after
``REPLY_WITHIN`` seconds with ``"accepted": true`` while it goes on (its
progress follows on ``heartbeat.ota.service``). An unknown verb, a payload that
is not a JSON object, an option the verb does not take, or a full queue get
``"ok": false`` and an error saying so, and nothing runs.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from connhex_edge_ota.bus import Handler
from connhex_edge_ota.lifecycle import MessageBus
from connhex_edge_ota.loop import UpdateLoop

COMMAND_PREFIX = "commands.ota."
COMMAND_SUBJECTS = COMMAND_PREFIX + ">"
VERBS = ("check", "download", "install", "status")
OPTIONS: dict[str, frozenset[str]] = {verb: frozenset() for verb in VERBS}
"""The options each verb takes in its JSON payload (none yet); any other key is refused."""
REPLY_WITHIN = 1.5


class BadRequest(ValueError):
    """A request that cannot run; ``str()`` is the reply's error."""


def subject(verb: str) -> str:
    return COMMAND_PREFIX + verb


def _reply(loop: UpdateLoop, ok: bool, error: str = "", **extra: object) -> bytes:
    body = {"ok": ok, "error": error, **extra, "status": loop.service.status().payload()}
    return json.dumps(body).encode()


async def serve(bus: MessageBus, loop: UpdateLoop) -> None:
    """Answer ``commands.ota.>`` on ``bus`` for the service ``loop`` runs."""
    await bus.serve(COMMAND_SUBJECTS, _handler(loop))


def parse_request(verb: str, payload: bytes) -> dict[str, Any]:
    """The options of a ``verb`` request: {} for an empty payload; BadRequest otherwise."""
    if verb not in OPTIONS:
        shown = verb if len(verb) <= 64 else verb[:64] + "…"
        raise BadRequest(f"unknown command {shown!r}; known commands: {', '.join(VERBS)}")
    if not payload.strip():
        return {}
    try:
        options = json.loads(payload)
    except (ValueError, RecursionError):
        raise BadRequest(
            f"{verb}: the payload is not JSON; send a JSON object of options, or nothing"
        ) from None
    if not isinstance(options, dict):
        raise BadRequest(
            f"{verb}: the payload must be a JSON object of options (or empty), "
            f"not {type(options).__name__}"
        )
    unknown = sorted(set(options) - OPTIONS[verb])
    if unknown:
        known = ", ".join(sorted(OPTIONS[verb])) or "none"
        names = ", ".join(repr(name[:64]) for name in unknown[:5])
        raise BadRequest(f"{verb}: unknown option {names}; options it takes: {known}")
    return options


def _handler(loop: UpdateLoop) -> Handler:
    async def handle(request_subject: str, payload: bytes) -> bytes:
        verb = request_subject.removeprefix(COMMAND_PREFIX)
        try:
            options = parse_request(verb, payload)
        except BadRequest as exc:
            error = str(exc)
            if "known commands" not in error:  # every refusal names what can be asked
                error += f"; known commands: {', '.join(VERBS)}"
            return _reply(loop, False, error)
        if verb == "status":
            return _reply(loop, True)
        job = loop.submit(verb, options)
        if job is None:
            return _reply(
                loop,
                False,
                f"busy: the queue of {loop.max_queued} steps is full; try again later",
            )
        try:
            result = await asyncio.wait_for(asyncio.shield(job.done), REPLY_WITHIN)
        except TimeoutError:
            return _reply(loop, True, accepted=True)
        return _reply(loop, result.ok, result.error)

    return handle
