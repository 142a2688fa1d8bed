"""The reference host: a pluggy plugin manager and an asyncio agent that runs plugins.

``connhex-edge-ota run`` is this host. An existing agent embeds the addon with
:func:`plugin_manager` and the lifecycle hooks of :mod:`connhex_edge_ota.lifecycle`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import signal
import sys
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pluggy

from connhex_edge_ota import PROJECT, __version__, hookimpl, lifecycle
from connhex_edge_ota.bus import Bus
from connhex_edge_ota.config import ConfigError, load_settings, read_toml
from connhex_edge_ota.natsauth import nats_auth
from connhex_edge_ota.store import Busy

log = logging.getLogger(__name__)

BLOCKED_ENV = "CONNHEX_AGENT_BLOCKED_PLUGINS"
STOP_GRACE = 1.5
"""Seconds spawned tasks get to finish on shutdown before they are cancelled."""


@dataclass(frozen=True)
class LoadedPlugin:
    name: str
    distribution: str
    version: str
    error: str = ""
    """Why it was not loaded ("" when it was)."""


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
) -> tuple[pluggy.PluginManager, list[LoadedPlugin]]:
    """A plugin manager for the ``connhex_edge`` project, built in a fixed order.

    Specs first, then blocked names, then the group's entry points (each on its
    own: one that fails to import is logged and skipped), then ``modules`` by
    import name (the same way), then ``plugins`` given by the caller, then a
    check that every hook implemented is known.
    """
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(lifecycle)
    # Historic: every plugin registered from now on adds its specs as it arrives.
    pm.hook.agent_addhooks.call_historic(kwargs={"pluginmanager": pm})
    for name in blocked:
        pm.set_blocked(name)
    loaded: list[LoadedPlugin] = []
    for ep in entry_points(group=PROJECT):
        dist = ep.dist.name if ep.dist else "?"
        dist_version = ep.dist.version if ep.dist else "?"
        if pm.is_blocked(ep.name):
            loaded.append(LoadedPlugin(ep.name, dist, dist_version, "blocked"))
            continue
        if pm.get_plugin(ep.name) is not None:
            continue
        try:
            pm.register(ep.load(), name=ep.name)
        except Exception as exc:
            log.error("plugin %s (%s %s) not loaded: %s", ep.name, dist, dist_version, exc)
            loaded.append(LoadedPlugin(ep.name, dist, dist_version, f"{type(exc).__name__}: {exc}"))
            continue
        loaded.append(LoadedPlugin(ep.name, dist, dist_version))
    for module in modules:
        if pm.is_blocked(module) or pm.get_plugin(module) is not None:
            continue
        try:
            pm.register(importlib.import_module(module), name=module)
        except Exception as exc:
            log.error("plugin module %s not loaded: %s", module, exc)
            loaded.append(LoadedPlugin(module, "(module)", "", f"{type(exc).__name__}: {exc}"))
            continue
        loaded.append(LoadedPlugin(module, "(module)", ""))
    for name, plugin in plugins:
        pm.register(plugin, name=name)
    _drop_invalid(pm, loaded)
    for plugin in loaded:
        if not plugin.error:
            log.info(
                "plugin %s loaded from %s %s", plugin.name, plugin.distribution, plugin.version
            )
    return pm, loaded


def _drop_invalid(pm: pluggy.PluginManager, loaded: list[LoadedPlugin]) -> None:
    """Unregister plugins that implement hooks nobody declared (typos), instead of failing."""
    for name, hook in list(pm.hook.__dict__.items()):
        if not isinstance(hook, pluggy.HookCaller) or hook.spec is not None:
            continue
        for impl in hook.get_hookimpls():
            if impl.optionalhook:
                continue
            plugin_name = pm.get_name(impl.plugin) or "?"
            log.error("plugin %s implements unknown hook %s; not loaded", plugin_name, name)
            pm.unregister(impl.plugin)
            for i, entry in enumerate(loaded):
                if entry.name == plugin_name:
                    loaded[i] = LoadedPlugin(
                        entry.name, entry.distribution, entry.version, f"unknown hook {name}"
                    )
    pm.check_pending()


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
        self.pluginmanager.hook.agent_configure(agent=self)

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
            await asyncio.wait_for(asyncio.shield(connecting), 3.0)
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
