"""The agent's lifecycle hooks: how a pluggy-based host starts and stops its plugins.

Any host that embeds the addon gets these specs from
:func:`connhex_edge_ota.loading.load_plugins` (its own ``PluginManager``, any
project name) and calls them in this order:

1. ``agent_addhooks(pluginmanager=pm)``: plugins add their own specs (``load_plugins``
   calls it, before it checks and registers the plugins);
2. ``agent_configure(agent=agent)``: plugins read their tables of ``agent.toml``;
3. ``agent_start(agent=agent)``: from inside the running event loop;
4. ``agent_stop(agent=agent)``: on shutdown, from inside the event loop;
   the host then awaits the tasks plugins spawned.

``agent`` is anything shaped like :class:`Agent` below.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from connhex_edge_ota import hookspec

if TYPE_CHECKING:
    import asyncio

    import pluggy


class MessageBus(Protocol):
    """What the addon needs of the host's bus; :class:`connhex_edge_ota.bus.Bus` is one.

    A host may pass its own NATS wrapper: nothing in the update loop may wait
    on the bus, so ``publish`` drops what it cannot send while disconnected
    (statuses are republished by the next heartbeat), and ``serve`` must
    accept handlers before the first connection exists.
    """

    async def publish(self, subject: str, payload: bytes) -> object:
        """Publish ``payload`` on ``subject``; the result is ignored."""
        ...

    async def serve(self, subject: str, handler: Callable[[str, bytes], Awaitable[bytes]]) -> None:
        """Answer requests on ``subject``: ``handler(subject, body)`` returns the reply."""
        ...

    async def request(self, subject: str, payload: bytes, timeout: float) -> bytes:
        """Send a request and return the reply's body; raises when none comes in ``timeout``."""
        ...


class Agent(Protocol):
    """What a host hands to its plugins."""

    config_path: Path
    """The agent's ``agent.toml``; it may not exist."""
    pluginmanager: pluggy.PluginManager

    @property
    def bus(self) -> MessageBus:
        """The agent's NATS bus (publish, serve, request); any :class:`MessageBus`."""
        ...

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run ``coro`` as a task the host owns, awaits on stop and logs if it fails."""
        ...


@hookspec(historic=True)
def agent_addhooks(pluginmanager: pluggy.PluginManager) -> None:
    """Called once per plugin, before it is checked and registered: add specs here.

    :func:`connhex_edge_ota.loading.load_plugins` calls it for every plugin it
    loads before checking any, so a plugin may implement hooks that another
    plugin declares, whatever the loading order.

    :param pluginmanager: the host's manager; call ``pluginmanager.add_hookspecs(module)``.
    """


@hookspec
def agent_configure(agent: Agent) -> None:
    """Called before any hook, on every path: ``run``, each command-line step, ``plugins``.

    Read and check the plugin's own table here (``config.plugin_table`` and
    ``config.load_table``), so it applies wherever an update can happen. Take no
    lock and start no work: a one-shot command-line step configures plugins
    while the service may hold the store, and ``plugins`` configures each
    plugin on its own to find bad tables.

    :param agent: the host (:class:`Agent`); ``agent.config_path`` is its ``agent.toml``.
    :raises connhex_edge_ota.config.ConfigError: for a bad configuration; the
        reference host prints its one-line message and exits with code 2.
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
