"""The reference host: a pluggy plugin manager and an asyncio agent that runs plugins.

``connhex-edge-ota run`` is this host, and :class:`StepHost` the host of one
command-line step: both load, check and configure plugins the same way. An
existing agent embeds the addon with :func:`connhex_edge_ota.loading.load_plugins`
on its own plugin manager and the lifecycle hooks of :mod:`connhex_edge_ota.lifecycle`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Coroutine, Iterable
from pathlib import Path
from typing import Any

import pluggy

from connhex_edge_ota import PROJECT, __version__, hookimpl, lifecycle
from connhex_edge_ota.bus import Bus
from connhex_edge_ota.config import ConfigError, load_settings, read_toml
from connhex_edge_ota.hooks import mark_unconfigured
from connhex_edge_ota.loading import LoadedPlugin, load_plugins, one_line
from connhex_edge_ota.natsauth import nats_auth
from connhex_edge_ota.store import Busy

log = logging.getLogger(__name__)

BLOCKED_ENV = "CONNHEX_AGENT_BLOCKED_PLUGINS"
NATS_FIRST_WAIT = 3.0
"""Seconds the host waits for NATS before starting plugins: enough for a bus that is up
(the first statuses reach it, even on a loaded machine); a bus that is down delays
the first check by this much, no more."""
STOP_GRACE = 1.5
"""Seconds spawned tasks get to finish on shutdown before they are cancelled."""


def _names(config_path: Path | None, key: str) -> list[str]:
    """The list of names at ``[agent] <key>`` (empty when absent)."""
    if config_path is None:
        return []
    agent_table = read_toml(config_path).get("agent", {})
    listed = agent_table.get(key, []) if isinstance(agent_table, dict) else []
    if not isinstance(listed, list) or not all(isinstance(n, str) for n in listed):
        raise ConfigError(f"config error: [agent] {key}: expected a list of names")
    return listed


def blocked_plugins(config_path: Path | None) -> set[str]:
    """Names blocked by ``[agent] blocked_plugins`` and ``$CONNHEX_AGENT_BLOCKED_PLUGINS``."""
    env = os.environ.get(BLOCKED_ENV, "")
    return {n.strip() for n in env.split(",") if n.strip()} | set(
        _names(config_path, "blocked_plugins")
    )


def host_plugin_manager(
    config_path: Path | None,
) -> tuple[pluggy.PluginManager, list[LoadedPlugin]]:
    """The plugin manager the reference host builds from the ``[agent]`` table.

    ``[agent] plugins`` names modules to load besides the entry points (plugins
    not installed as distributions, e.g. during development); ``blocked_plugins``
    and ``$CONNHEX_AGENT_BLOCKED_PLUGINS`` keep plugins out by name.
    """
    return plugin_manager(
        blocked=blocked_plugins(config_path), modules=_names(config_path, "plugins")
    )


def plugin_manager(
    blocked: Iterable[str] = (),
    plugins: Iterable[tuple[str, object]] = (),
    modules: Iterable[str] = (),
    installed: bool = True,
) -> tuple[pluggy.PluginManager, list[LoadedPlugin]]:
    """A new plugin manager for the ``connhex_edge`` project, loaded by
    :func:`connhex_edge_ota.loading.load_plugins` (see there for the order and the checks)."""
    pm = pluggy.PluginManager(PROJECT)
    return pm, load_plugins(pm, blocked, plugins, modules, installed)


def configure_plugins(agent: lifecycle.Agent) -> None:
    """``agent_configure`` for every plugin, one by one: each reads and checks its own table.

    The same call on every path that runs hooks (``run``, each command-line
    step). A ConfigError (a bad table) propagates: one line, exit 2. A plugin
    that raises anything else is logged once at ERROR and stays registered with
    every gate it offers refusing (its vetoes and health checks cannot be
    trusted): one broken plugin never stops the agent, nor lets an update past it.
    """
    pm = agent.pluginmanager
    for impl in pm.hook.agent_configure.get_hookimpls():
        name = pm.get_name(impl.plugin) or impl.plugin_name
        others = [p for p in pm.get_plugins() if p is not impl.plugin]
        try:
            pm.subset_hook_caller("agent_configure", remove_plugins=others)(agent=agent)
        except ConfigError:
            raise
        except Exception as exc:
            if name == "ota":
                raise  # the addon itself: nothing can run without it
            reason = one_line(f"agent_configure raised {type(exc).__name__}: {exc}")
            log.error("plugin %s: %s; its gates refuse every update until fixed", name, reason)
            mark_unconfigured(pm, name, reason)


def configure_each(agent: lifecycle.Agent) -> dict[str, str]:
    """``agent_configure`` plugin by plugin: why each one's configuration fails, by name."""
    pm = agent.pluginmanager
    failures: dict[str, str] = {}
    for impl in pm.hook.agent_configure.get_hookimpls():
        name = pm.get_name(impl.plugin) or impl.plugin_name
        others = [p for p in pm.get_plugins() if p is not impl.plugin]
        try:
            pm.subset_hook_caller("agent_configure", remove_plugins=others)(agent=agent)
        except Exception as exc:
            failure = f"agent_configure raised {type(exc).__name__}: {exc}"
            failures[name] = one_line(str(exc) if isinstance(exc, ConfigError) else failure)
    return failures


class StepHost:
    """The host of one command-line step (``check``, ``download``, ``install``).

    Plugins are loaded, checked and configured exactly as ``run`` does, so a
    plugin's own table (a maintenance window, a health check) applies here too;
    no plugin is started (a step starts no long-lived work) and the bus is not
    connected (statuses go to the terminal).
    """

    def __init__(self, config_path: Path, pm: pluggy.PluginManager) -> None:
        self.config_path = config_path
        self.pluginmanager = pm
        self.bus = Bus()
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def configure(self) -> None:
        configure_plugins(self)


class ReferenceAgent:
    """The host behind ``connhex-edge-ota run``: NATS, signals, plugin lifecycle."""

    def __init__(self, config_path: Path, pm: pluggy.PluginManager) -> None:
        self.config_path = config_path
        self.pluginmanager = pm
        self.bus = Bus()
        self.stop_event = asyncio.Event()
        self.restart_requested = False
        self._tasks: set[asyncio.Task[None]] = set()
        pm.register(self, name="agent")

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    def stop(self) -> None:
        """Ask the agent to stop; safe to call twice and from a signal handler."""
        self.stop_event.set()

    @hookimpl(trylast=True)
    def agent_restart(self, agent: lifecycle.Agent, reason: str) -> bool | None:
        if agent is not self:
            return None
        log.warning("restarting: %s", reason)
        self.restart_requested = True
        self.stop()
        return True

    def configure(self) -> None:
        """Let every plugin read its configuration; ConfigError propagates."""
        configure_plugins(self)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop)
        settings = load_settings(self.config_path)
        connecting = asyncio.create_task(
            self.bus.connect(
                settings.nats_url, "connhex-agent", self.stop_event, nats_auth(settings)
            )
        )
        with contextlib.suppress(TimeoutError):  # go on without NATS; it connects later
            await asyncio.wait_for(asyncio.shield(connecting), NATS_FIRST_WAIT)
        try:
            self._start_plugins()
            await self.stop_event.wait()
        finally:
            self.pluginmanager.hook.agent_stop(agent=self)
            await self._wait_tasks()
            connecting.cancel()
            await self.bus.close()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    def _start_plugins(self) -> None:
        for impl in self.pluginmanager.hook.agent_start.get_hookimpls():
            name = self.pluginmanager.get_name(impl.plugin)
            try:
                impl.function(agent=self)
            except Busy:
                raise  # another process owns the store: running anyway would corrupt it
            except Exception:
                log.exception("plugin %s failed to start; left out", name)

    async def _wait_tasks(self) -> None:
        if not self._tasks:
            return
        _done, pending = await asyncio.wait(set(self._tasks), timeout=STOP_GRACE)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


def run_agent(config_path: Path) -> int:
    """Run the reference host until SIGTERM/SIGINT; the process exit code."""
    # The addon's own table first: a bad config is one line, before any plugin talks.
    load_settings(config_path).require_server()
    pm, _loaded = host_plugin_manager(config_path)
    agent = ReferenceAgent(config_path, pm)
    agent.configure()
    log.info("connhex-edge-ota %s running (config %s)", __version__, config_path)
    asyncio.run(agent.run())
    if agent.restart_requested:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, sys.orig_argv)  # noqa: S606 - re-execute ourselves, same argv
    return 0
