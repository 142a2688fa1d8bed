"""The agent's lifecycle hooks: how a pluggy-based host starts and stops its plugins.

Any host that embeds the addon declares these specs (or uses
:func:`connhex_edge_ota.agent.plugin_manager`) and calls them in this order:

1. ``agent_addhooks(pluginmanager=pm)`` (historic): plugins add their own specs;
2. ``agent_configure(agent=agent)``: plugins read their tables of ``agent.toml``;
3. ``agent_start(agent=agent)``: from inside the running event loop;
4. ``agent_stop(agent=agent)``: on shutdown, from inside the event loop;
   the host then awaits the tasks plugins spawned.

``agent`` is anything shaped like :class:`Agent` below.
"""

from __future__ import annotations

from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from connhex_edge_ota import hookspec

if TYPE_CHECKING:
    import asyncio

    import pluggy

    from connhex_edge_ota.bus import Bus


class Agent(Protocol):
    """What a host hands to its plugins."""

    config_path: Path
    """The agent's ``agent.toml``; it may not exist."""
    pluginmanager: pluggy.PluginManager
    bus: Bus
    """The agent's NATS bus (publish, subscribe, request/reply)."""

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run ``coro`` as a task the host owns, awaits on stop and logs if it fails."""
        ...


@hookspec(historic=True)
def agent_addhooks(pluginmanager: pluggy.PluginManager) -> None:
    """Called once per plugin at registration: add specs with ``pluginmanager.add_hookspecs``."""


@hookspec
def agent_configure(agent: Agent) -> None:
    """Called once before the event loop work starts: read and check configuration.

    Raise :class:`connhex_edge_ota.config.ConfigError` for a bad configuration;
    the reference host prints its one-line message and exits with code 2.
    """


@hookspec
def agent_start(agent: Agent) -> None:
    """Called once from inside the running event loop: start work with ``agent.spawn``.

    Must not block. An exception is logged with the plugin's name and the plugin
    is left out; the agent goes on.
    """


@hookspec
def agent_stop(agent: Agent) -> None:
    """Called once on shutdown from inside the event loop: ask spawned work to end.

    Must not block; the host then waits a short grace period for spawned tasks
    and cancels what is left.
    """


@hookspec(firstresult=True)
def agent_restart(agent: Agent, reason: str) -> bool | None:
    """A plugin asks the host to restart the agent process (e.g. ``update.sh`` exited 10).

    The host implements this: return ``True`` once the restart is arranged.
    The reference host stops cleanly and re-executes itself. ``None`` from
    every implementation means no one could restart; the caller logs it.
    """
