"""The OTA addon's registration into a host: its hookspecs, config, and start/stop.

Registered through the ``connhex_edge`` entry-point group as ``ota``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import pluggy

from connhex_edge_ota import hookimpl, hookspecs
from connhex_edge_ota.commands import serve
from connhex_edge_ota.config import OtaSettings, load_settings
from connhex_edge_ota.lifecycle import Agent
from connhex_edge_ota.loop import UpdateLoop
from connhex_edge_ota.service import OtaService
from connhex_edge_ota.status import HEARTBEAT_SUBJECT, Status
from connhex_edge_ota.store import Store

log = logging.getLogger(__name__)


@dataclass
class Addon:
    """The addon's life inside one agent."""

    settings: OtaSettings
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    service: OtaService | None = None


_addons: dict[int, Addon] = {}
"""Per agent: a process may host more than one (tests do)."""


@hookimpl
def agent_addhooks(pluginmanager: pluggy.PluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)


@hookimpl
def agent_configure(agent: Agent) -> None:
    settings = load_settings(agent.config_path)
    settings.require_server()
    _addons[id(agent)] = Addon(settings)


@hookimpl
def agent_start(agent: Agent) -> None:
    addon = _addons[id(agent)]
    store = Store(addon.settings.store_dir)
    store.lock()  # Busy propagates: two services on one store must never run

    async def publish(status: Status) -> None:
        await agent.bus.publish(HEARTBEAT_SUBJECT, status.to_json())

    async def restart(reason: str) -> None:
        handled = agent.pluginmanager.hook.agent_restart(agent=agent, reason=reason)
        if not handled:
            log.warning("restart requested (%s) but the host cannot restart", reason)

    service = OtaService(
        addon.settings, agent.pluginmanager, store, reporters=[publish], on_restart=restart
    )
    service.open()
    addon.service = service

    loop = UpdateLoop(service)

    async def run() -> None:
        try:
            await serve(agent.bus, loop)
            await loop.run(addon.stop)
        finally:
            store.unlock()

    agent.spawn(run(), name="ota")


@hookimpl
def agent_stop(agent: Agent) -> None:
    addon = _addons.pop(id(agent), None)
    if addon is not None:
        addon.stop.set()
