"""Calling the OTA hooks: one typed method per hook, one bounded worker per plugin.

The service never calls a hook by name: :class:`Hooks` has a method for each
(``veto_download``, ``veto_install``, ``health``, ``status``, ``progress``), so
a misspelled hook is a type error, not a silent "no vetoes".

Each plugin gets one worker with two lanes, each a daemon thread started on
demand that runs its calls one at a time: one lane for the gates, one for the
notifications, so that a plugin stuck forwarding a status still answers its
gates. A plugin that hangs holds at most those two threads whatever the number
of calls, and never the event loop nor the process's exit.

- Gate calls (``ota_pre_*``, ``ota_post_install``): one not answered within
  ``hook_timeout`` is a veto (or a failed check) and, if it has not started
  yet, is dropped.
- Statuses, in order; at most ``STATUS_BACKLOG`` wait (the oldest are dropped
  first, so the newest always arrives).
- Progress waits in one slot: an event the plugin has not taken yet is
  replaced by the newest.

``status`` and ``progress`` only queue: a notification never delays a step.
:meth:`Hooks.drain` waits, at most ``hook_timeout``, for every plugin to take
the statuses queued so far (shutdown), then the rest is abandoned.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from connhex_edge_ota.release import Release
    from connhex_edge_ota.status import Status

log = logging.getLogger(__name__)

STATUS_BACKLOG = 100
"""Statuses that may wait for one slow plugin; older ones are dropped beyond that."""


@dataclass
class _Call:
    """One hook implementation to run, with its arguments and its result."""

    hook: str
    function: Callable[..., Any]
    kwargs: dict[str, Any]
    result: concurrent.futures.Future[Any] = field(default_factory=concurrent.futures.Future)


class PluginWorker:
    """One lane of a plugin's hook calls, run one at a time by one daemon thread (on demand)."""

    def __init__(self, name: str, lane: str) -> None:
        self.name = name
        self.lane = lane
        self._changed = threading.Condition()
        self._gates: deque[_Call] = deque()
        self._notices: deque[_Call] = deque()
        self._progress: _Call | None = None
        """The pending progress call (also in ``_notices``); replaced by newer events."""
        self._statuses_waiting = 0
        self._running: tuple[str, float] | None = None
        """The hook running now and since when (monotonic)."""
        self._thread: threading.Thread | None = None
        self._closed = False
        self._dropped_warned = False

    # queueing (any thread)

    def call(self, call: _Call) -> concurrent.futures.Future[Any]:
        """Queue a gate call ahead of notifications; its result arrives on the future."""
        with self._changed:
            # Calls abandoned behind a hung one must not pile up.
            self._gates = deque(c for c in self._gates if not c.result.cancelled())
            self._gates.append(call)
            self._wake()
        return call.result

    def notify_status(self, call: _Call) -> None:
        with self._changed:
            if self._statuses_waiting >= STATUS_BACKLOG:
                self._drop_oldest_status()
            self._notices.append(call)
            self._statuses_waiting += 1
            self._wake()

    def notify_progress(self, call: _Call) -> None:
        with self._changed:
            if self._progress is not None:
                self._progress.kwargs = call.kwargs  # not taken yet: the newest replaces it
                return
            self._progress = call
            self._notices.append(call)
            self._wake()

    def mark(self) -> concurrent.futures.Future[Any]:
        """A future that completes once every notification queued before it was taken."""
        marker = _Call("", _nothing, {})
        with self._changed:
            self._notices.append(marker)
            self._wake()
        return marker.result

    def busy_elsewhere(self, hook: str) -> str:
        """What keeps this plugin from answering ``hook`` ("" when idle or in ``hook``)."""
        with self._changed:
            if self._running is None or self._running[0] == hook:
                return ""
            other, since = self._running
        return f" (busy in {other} for {time.monotonic() - since:.0f}s)"

    def close(self) -> None:
        """Abandon what waits; the thread ends after its current call."""
        with self._changed:
            self._closed = True
            for call in (*self._gates, *self._notices):
                call.result.cancel()
            self._gates.clear()
            self._notices.clear()
            self._progress = None
            self._statuses_waiting = 0
            self._changed.notify_all()

    def _drop_oldest_status(self) -> None:
        for call in self._notices:
            if call.hook == "ota_on_status":
                self._notices.remove(call)
                self._statuses_waiting -= 1
                call.result.cancel()
                if not self._dropped_warned:
                    self._dropped_warned = True
                    log.warning("plugin %s is not taking statuses; dropping old ones", self.name)
                return

    def _wake(self) -> None:
        if self._closed:
            return
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._work, name=f"plugin-{self.name}-{self.lane}", daemon=True
            )
            self._thread.start()
        self._changed.notify()

    # the worker thread

    def _next(self) -> _Call | None:
        with self._changed:
            while not self._closed and not self._gates and not self._notices:
                self._changed.wait()
            if self._closed:
                return None
            call = self._gates.popleft() if self._gates else self._notices.popleft()
            if call is self._progress:
                self._progress = None
            elif call.hook == "ota_on_status":
                self._statuses_waiting -= 1
            self._running = (call.hook, time.monotonic())
            return call

    def _work(self) -> None:
        while (call := self._next()) is not None:
            try:
                if call.result.set_running_or_notify_cancel():
                    try:
                        value = call.function(**call.kwargs)
                    except BaseException as exc:  # handed to whoever waits for it
                        call.result.set_exception(exc)
                    else:
                        call.result.set_result(value)
            finally:
                with self._changed:
                    self._running = None


def _nothing() -> None:
    return None


def plugin_name(pm: pluggy.PluginManager, impl: pluggy.HookImpl) -> str:
    """The name a plugin is known by (its entry-point or registered name)."""
    return pm.get_name(impl.plugin) or impl.plugin_name


class Hooks:
    """The OTA hooks of one plugin manager, called safely from the async service."""

    def __init__(self, pm: pluggy.PluginManager, timeout: float) -> None:
        self.pm = pm
        self.timeout = timeout
        self._gate_lanes: dict[str, PluginWorker] = {}
        self._notice_lanes: dict[str, PluginWorker] = {}
        self._lock = threading.Lock()

    # gates: every plugin asked, each veto as "<plugin>: <reason>"

    async def veto_download(self, release: Release) -> list[str]:
        """``ota_pre_download``: the vetoes (empty: the download may start)."""
        return await self._gate(self.pm.hook.ota_pre_download, {"release": release})

    async def veto_install(self, release: Release) -> list[str]:
        """``ota_pre_install``: the vetoes (empty: the install may start)."""
        return await self._gate(self.pm.hook.ota_pre_install, {"release": release})

    async def health(self, release: Release) -> list[str]:
        """``ota_post_install``: the failed health checks (empty: healthy)."""
        return await self._gate(self.pm.hook.ota_post_install, {"release": release})

    # notifications: queued, never awaited

    def status(self, status: Status) -> None:
        """``ota_on_status``: queued for each plugin, delivered in order."""
        for impl in self._impls(self.pm.hook.ota_on_status):
            call = _Call("ota_on_status", impl.function, _args(impl, {"status": status}))
            self._lane(self._notice_lanes, impl, "notices").notify_status(call)
            _log_failure(call, plugin_name(self.pm, impl))

    def progress(self, release: Release, downloaded: int, total: int) -> None:
        """``ota_on_progress``: one pending event per plugin, the newest."""
        kwargs = {"release": release, "downloaded": downloaded, "total": total}
        for impl in self._impls(self.pm.hook.ota_on_progress):
            call = _Call("ota_on_progress", impl.function, _args(impl, kwargs))
            self._lane(self._notice_lanes, impl, "notices").notify_progress(call)
            _log_failure(call, plugin_name(self.pm, impl))

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait until every plugin took the notifications queued so far; ``False`` on timeout.

        At most ``timeout`` seconds (default ``hook_timeout``); what is left is
        abandoned by :meth:`close`.
        """
        with self._lock:
            markers = [asyncio.wrap_future(w.mark()) for w in self._notice_lanes.values()]
        if not markers:
            return True
        _done, pending = await asyncio.wait(
            markers, timeout=self.timeout if timeout is None else timeout
        )
        for marker in pending:
            marker.cancel()
        return not pending

    def close(self) -> None:
        """Abandon every queued call; hung plugins keep only their own thread (a daemon)."""
        with self._lock:
            workers = [*self._gate_lanes.values(), *self._notice_lanes.values()]
            self._gate_lanes, self._notice_lanes = {}, {}
        for worker in workers:
            worker.close()

    # the machinery

    def _impls(self, caller: pluggy.HookCaller) -> list[pluggy.HookImpl]:
        return [i for i in caller.get_hookimpls() if not (i.hookwrapper or i.wrapper)]

    def _lane(
        self, lanes: dict[str, PluginWorker], impl: pluggy.HookImpl, lane: str
    ) -> PluginWorker:
        name = plugin_name(self.pm, impl)
        with self._lock:
            worker = lanes.get(name)
            if worker is None:
                worker = lanes[name] = PluginWorker(name, lane)
            return worker

    async def _gate(self, caller: pluggy.HookCaller, kwargs: dict[str, Any]) -> list[str]:
        found: list[str] = []
        asked: list[tuple[str, PluginWorker, asyncio.Future[Any]]] = []
        broken = unconfigured(self.pm)
        for impl in caller.get_hookimpls():
            name = plugin_name(self.pm, impl)
            if name in broken:  # its gate cannot be trusted: it refuses, the agent goes on
                found.append(f"{name}: not configured ({broken[name]})")
                continue
            if impl.hookwrapper or impl.wrapper:
                # Refused at load by the reference host; a host that let one in fails closed.
                found.append(f"{name}: a wrapper on {caller.name} cannot be honoured")
                continue
            worker = self._lane(self._gate_lanes, impl, "gates")
            call = _Call(caller.name, impl.function, _args(impl, kwargs))
            asked.append((name, worker, asyncio.wrap_future(worker.call(call))))
        if asked:
            await asyncio.wait([f for _n, _w, f in asked], timeout=self.timeout)
        for name, worker, answer in asked:
            if not answer.done() or answer.cancelled():
                answer.cancel()  # dropped if it has not started
                busy = worker.busy_elsewhere(caller.name)
                found.append(f"{name}: no answer within {self.timeout:g}s{busy}")
            elif (exc := answer.exception()) is not None:
                log.warning("plugin %s raised in %s", name, caller.name, exc_info=exc)
                found.append(f"{name}: raised {type(exc).__name__}: {_one_line(str(exc))}")
            else:
                reason = _reason(answer.result())
                if reason:
                    found.append(f"{name}: {reason}")
        return found


_UNCONFIGURED: weakref.WeakKeyDictionary[pluggy.PluginManager, dict[str, str]] = (
    weakref.WeakKeyDictionary()
)


def mark_unconfigured(pm: pluggy.PluginManager, name: str, reason: str) -> None:
    """Plugin ``name`` could not be configured: each of its gates now refuses, with ``reason``."""
    _UNCONFIGURED.setdefault(pm, {})[name] = reason


def unconfigured(pm: pluggy.PluginManager) -> dict[str, str]:
    """The plugins of ``pm`` whose ``agent_configure`` raised, and why."""
    return dict(_UNCONFIGURED.get(pm, {}))


def _args(impl: pluggy.HookImpl, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments ``impl`` asks for (pluggy passes only those)."""
    return {arg: kwargs[arg] for arg in impl.argnames if arg in kwargs}


def _reason(result: object) -> str:
    """ "" for an allow (None); else the veto's reason."""
    if result is None:
        return ""
    if inspect.iscoroutine(result):
        result.close()
        return "returned a coroutine (hooks must be synchronous)"
    if isinstance(result, str) and result.strip():
        return _one_line(result)
    return f"returned {result!r} (expected None or a reason)"


def _one_line(text: str) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def _log_failure(call: _Call, name: str) -> None:
    def done(result: concurrent.futures.Future[Any]) -> None:
        if result.cancelled():
            return
        exc = result.exception()
        if exc is not None:
            log.warning("plugin %s raised in %s: %s", name, call.hook, exc, exc_info=exc)
        elif inspect.iscoroutine(value := result.result()):
            value.close()
            log.warning(
                "plugin %s: %s returned a coroutine (hooks must be synchronous)", name, call.hook
            )

    call.result.add_done_callback(done)
