"""NATS commands ``commands.ota.<verb>``: request/reply with a JSON answer.

Every reply is ``{"ok": bool, "error": str, "status": {<the five payload keys>}}``.
``status`` answers at once. ``check``, ``download`` and ``install`` queue the
step and answer when it is done, or after ``REPLY_WITHIN`` seconds with
``"accepted": true`` while it goes on (its progress follows on
``heartbeat.ota.service``).
"""

from __future__ import annotations

import asyncio
import json

from connhex_edge_ota.bus import Handler
from connhex_edge_ota.lifecycle import MessageBus
from connhex_edge_ota.loop import UpdateLoop

COMMAND_PREFIX = "commands.ota."
VERBS = ("check", "download", "install", "status")
REPLY_WITHIN = 1.5


def subject(verb: str) -> str:
    return COMMAND_PREFIX + verb


def _reply(loop: UpdateLoop, ok: bool, error: str = "", **extra: object) -> bytes:
    body = {"ok": ok, "error": error, **extra, "status": loop.service.status().payload()}
    return json.dumps(body).encode()


async def serve(bus: MessageBus, loop: UpdateLoop) -> None:
    """Answer the four command subjects on ``bus`` for the service ``loop`` runs."""
    for verb in VERBS:
        await bus.serve(subject(verb), _handler(loop, verb))


def _handler(loop: UpdateLoop, verb: str) -> Handler:
    async def handle(_request: bytes) -> bytes:
        if verb == "status":
            return _reply(loop, True)
        job = loop.submit(verb)
        try:
            result = await asyncio.wait_for(asyncio.shield(job.done), REPLY_WITHIN)
        except TimeoutError:
            return _reply(loop, True, accepted=True)
        return _reply(loop, result.ok, result.error)

    return handle
