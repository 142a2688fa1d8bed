"""Loading plugins into a plugin manager of any project name: each checked, then registered.

A plugin is checked against every hookspec (the addon's, the host's, and those
other plugins add) on a throwaway manager before it touches the real one, so it
is either registered whole or refused by name with the reason, never half-loaded.
Refused: an unknown hook name (with a "did you mean"), an argument name the
hookspec does not have, a wrapper on an OTA hook or on ``agent_start`` (those
ask each plugin on its own, so a wrapper could not wrap anything), an
``async def`` hook, and
whatever else pluggy's own ``register`` rejects.

:func:`load_plugins` is also how another pluggy host embeds the addon: it works
on the host's own ``PluginManager``, whatever its project name.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any

import pluggy

from connhex_edge_ota import PROJECT, hookspecs, lifecycle

log = logging.getLogger(__name__)

OTA_HOOK_PREFIX = "ota_"
ONE_BY_ONE = frozenset({"agent_start"})
"""Host hooks that hosts call plugin by plugin (each failure isolated), like the OTA hooks."""


@dataclass(frozen=True)
class LoadedPlugin:
    """One plugin the host tried to load, and how it went."""

    name: str
    distribution: str
    version: str
    error: str = ""
    """Why it was not loaded ("" when it was); one line."""

    @property
    def origin(self) -> str:
        """Where it came from, for logs: ``"dist 1.2"``, ``"module"`` or ``"given"``."""
        return f"{self.distribution.strip('()')} {self.version}".strip()

    @property
    def failed(self) -> bool:
        """Refused or broken (a blocked plugin is neither)."""
        return bool(self.error) and self.error != "blocked"


@dataclass
class _Candidate:
    name: str
    plugin: object
    distribution: str
    version: str


def one_line(text: str) -> str:
    """``text`` with its lines joined by " | " (pluggy's errors span several lines)."""
    return " | ".join(line.strip() for line in str(text).strip().splitlines() if line.strip())


def load_plugins(
    pm: pluggy.PluginManager,
    blocked: Iterable[str] = (),
    plugins: Iterable[tuple[str, object]] = (),
    modules: Iterable[str] = (),
    installed: bool = True,
) -> list[LoadedPlugin]:
    """Add the host hookspecs to ``pm`` and load plugins into it, in a fixed order.

    Specs first, then blocked names, then (when ``installed``) the entry points
    of the ``connhex_edge`` group, the addon (``ota``) among them, then
    ``modules`` by import name, then ``plugins`` given by the caller. Each is
    imported on its own (a failing import is logged and skipped), checked, and
    registered or refused. ``pm`` may have any project name: the addon's
    markers are given to it. Returns one :class:`LoadedPlugin` per plugin tried.
    """
    project = pm.project_name
    for module in (lifecycle, hookspecs):
        _mark_specs(module, project)
    if not hasattr(pm.hook, "agent_configure"):
        pm.add_hookspecs(lifecycle)
    for name in blocked:
        pm.set_blocked(name)
    loaded: list[LoadedPlugin] = []
    candidates: list[_Candidate] = []
    seen: set[str] = set()

    def take(name: str, distribution: str, version: str, load: Any) -> None:
        if name in seen or pm.get_plugin(name) is not None:
            return
        seen.add(name)
        if pm.is_blocked(name):
            loaded.append(LoadedPlugin(name, distribution, version, "blocked"))
            return
        try:
            plugin = load()
        except Exception as exc:
            failed = LoadedPlugin(
                name, distribution, version, one_line(f"{type(exc).__name__}: {exc}")
            )
            log.error("plugin %s (%s) not loaded: %s", name, failed.origin, failed.error)
            loaded.append(failed)
            return
        candidates.append(_Candidate(name, plugin, distribution, version))

    if installed:
        for ep in entry_points(group=PROJECT):
            dist = ep.dist.name if ep.dist else "?"
            take(ep.name, dist, ep.dist.version if ep.dist else "?", ep.load)
    for module_name in modules:
        take(module_name, "(module)", "", lambda m=module_name: importlib.import_module(m))
    for name, plugin in plugins:
        take(name, "(given)", "", lambda p=plugin: p)

    for candidate in candidates:
        _mark_impls(candidate.plugin, project)
    refusals = _check_all(pm, candidates)
    for candidate in candidates:
        reason = refusals.get(candidate.name, "")
        if not reason:
            try:
                pm.register(candidate.plugin, name=candidate.name)
            except Exception as exc:
                reason = one_line(f"{type(exc).__name__}: {exc}")
                if pm.get_plugin(candidate.name) is candidate.plugin:  # a pluggy without
                    pm.unregister(name=candidate.name)  # atomic register left a part
        entry = LoadedPlugin(candidate.name, candidate.distribution, candidate.version, reason)
        loaded.append(entry)
        if reason:
            log.error("plugin %s (%s) refused: %s", entry.name, entry.origin, reason)
        else:
            log.info("plugin %s loaded (%s)", entry.name, entry.origin)
    pm.check_pending()
    return loaded


def _check_all(pm: pluggy.PluginManager, candidates: list[_Candidate]) -> dict[str, str]:
    """Why each candidate cannot be honoured, by name (absent: it can).

    Every candidate's ``agent_addhooks`` runs first (once, on ``pm``), so that
    each plugin is judged against all specs whatever the loading order; then
    each is checked, and registered on a throwaway manager with the same specs
    (pluggy's own checks) before it may touch ``pm``.
    """
    refusals: dict[str, str] = {}
    for candidate in candidates:
        try:
            add_hooks = _impl_named(pm, candidate.plugin, "agent_addhooks")
            if add_hooks is not None:
                add_hooks(pluginmanager=pm)
        except Exception as exc:
            failure = f"agent_addhooks raised {type(exc).__name__}: {exc}"
            refusals[candidate.name] = one_line(failure)
    probe = pluggy.PluginManager(pm.project_name)
    namespaces = {id(c.spec.namespace): c.spec.namespace for c in _callers(pm) if c.spec}
    for namespace in namespaces.values():
        probe.add_hookspecs(namespace)
    known = sorted(c.name for c in _callers(probe) if c.spec is not None)
    for candidate in candidates:
        if candidate.name in refusals:
            continue
        try:
            problems = _problems(probe, candidate.plugin, known)
            if not problems:  # pluggy's own checks, on the throwaway manager
                probe.register(candidate.plugin, name=candidate.name)
        except Exception as exc:
            problems = [one_line(f"{type(exc).__name__}: {exc}")]
        if problems:
            refusals[candidate.name] = "; ".join(problems)
    return refusals


def _problems(probe: pluggy.PluginManager, plugin: object, known: list[str]) -> list[str]:
    problems: list[str] = []
    for attr in dir(plugin):
        opts = probe.parse_hookimpl_opts(plugin, attr)
        if opts is None:
            continue
        hook = opts.get("specname") or attr
        caller: pluggy.HookCaller | None = getattr(probe.hook, hook, None)
        if caller is None or caller.spec is None:
            if opts.get("optionalhook"):
                continue
            hint = difflib.get_close_matches(hook, known, n=1)
            problems.append(
                f"unknown hook {hook}" + (f" (did you mean {hint[0]}?)" if hint else "")
            )
            continue
        function = getattr(plugin, attr)
        one_by_one = hook.startswith(OTA_HOOK_PREFIX) or hook in ONE_BY_ONE
        if one_by_one and (opts.get("wrapper") or opts.get("hookwrapper")):
            rule = "OTA hooks take" if hook.startswith(OTA_HOOK_PREFIX) else f"{hook} takes"
            problems.append(f"{hook} is a wrapper; {rule} plain implementations only")
        if inspect.iscoroutinefunction(function) or inspect.isasyncgenfunction(function):
            problems.append(f"{hook} is async; hooks must be synchronous")
        argnames = pluggy.HookImpl(plugin, "", function, opts).argnames
        unknown = [a for a in argnames if a not in caller.spec.argnames]
        if unknown:
            problems.append(
                f"{hook}: argument {', '.join(unknown)} is not in the hookspec "
                f"({hook}({', '.join(caller.spec.argnames)}))"
            )
    return problems


def _callers(pm: pluggy.PluginManager) -> list[pluggy.HookCaller]:
    return [c for c in vars(pm.hook).values() if isinstance(c, pluggy.HookCaller)]


def _impl_named(pm: pluggy.PluginManager, plugin: object, hook: str) -> Any:
    for attr in dir(plugin):
        opts = pm.parse_hookimpl_opts(plugin, attr)
        if opts is not None and (opts.get("specname") or attr) == hook:
            return getattr(plugin, attr)
    return None


def _mark_specs(module: ModuleType, project: str) -> None:
    """Give the ``connhex_edge`` hookspec marks of ``module`` to ``project`` too."""
    if project == PROJECT:
        return
    for function in vars(module).values():
        opts = getattr(function, f"{PROJECT}_spec", None)
        if inspect.isfunction(function) and opts is not None:
            setattr(function, f"{project}_spec", opts)


def _mark_impls(plugin: object, project: str) -> None:
    """Give the ``connhex_edge`` hookimpl marks of ``plugin`` to ``project`` too."""
    if project == PROJECT:
        return
    for attr in dir(plugin):
        try:
            routine = getattr(plugin, attr)
        except Exception:  # noqa: S112 - a property that raises is not a hook
            continue
        opts = getattr(routine, f"{PROJECT}_impl", None)
        if not inspect.isroutine(routine) or not isinstance(opts, dict):
            continue
        function = getattr(routine, "__func__", routine)
        if getattr(function, f"{project}_impl", None) is None:
            setattr(function, f"{project}_impl", opts)
