"""Calling plugins from the async service: one implementation at a time, off the loop, time-limited.

pluggy calls every implementation in one go and cannot say which one raised or
how long each took, so the service calls each ``HookImpl`` by itself in a
daemon thread. A plugin that hangs keeps its thread, never the event loop nor
the process's exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import pluggy

log = logging.getLogger(__name__)

T = TypeVar("T")


async def in_thread(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``function`` in a daemon thread and await its result.

    Unlike ``asyncio.to_thread``, an abandoned call never delays the process's
    exit (the default executor's threads are joined at shutdown).
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not future.done():
            outcome()

    def hand_over(outcome: Callable[[], None]) -> None:
        # A closed loop raises RuntimeError: nobody waits for this call any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, outcome)

    def work() -> None:
        try:
            result = function(*args, **kwargs)
        except BaseException as exc:  # handed to the awaiting task
            error = exc
            hand_over(lambda: future.set_exception(error))
        else:
            hand_over(lambda: future.set_result(result))

    threading.Thread(target=work, name=getattr(function, "__name__", "call"), daemon=True).start()
    return await future


def plugin_name(pm: pluggy.PluginManager, impl: pluggy.HookImpl) -> str:
    return pm.get_name(impl.plugin) or impl.plugin_name


async def _call_one(
    pm: pluggy.PluginManager, impl: pluggy.HookImpl, timeout: float, kwargs: dict[str, Any]
) -> tuple[str, Any, str]:
    """(plugin name, result, failure text) of one implementation."""
    name = plugin_name(pm, impl)
    call_args = {arg: kwargs[arg] for arg in impl.argnames if arg in kwargs}
    try:
        result = await asyncio.wait_for(in_thread(impl.function, **call_args), timeout)
    except TimeoutError:
        return name, None, f"no answer within {timeout:g}s"
    except Exception as exc:
        log.warning("plugin %s raised in %s", name, impl.function.__qualname__, exc_info=True)
        return name, None, f"raised {type(exc).__name__}: {exc}"
    if asyncio.iscoroutine(result):
        result.close()
        return name, None, "returned a coroutine (hooks must be synchronous)"
    return name, result, ""


def _impls(pm: pluggy.PluginManager, hook: str) -> list[pluggy.HookImpl]:
    caller = getattr(pm.hook, hook, None)
    if caller is None:
        return []
    return [i for i in caller.get_hookimpls() if not (i.hookwrapper or i.wrapper)]


async def vetoes(pm: pluggy.PluginManager, hook: str, timeout: float, **kwargs: Any) -> list[str]:
    """Ask every implementation of ``hook``; each veto as ``"<plugin>: <reason>"``.

    ``None`` allows; a string (or an exception, a timeout, a non-string value)
    vetoes. Every plugin is asked, whatever the others answer.
    """
    calls = [_call_one(pm, impl, timeout, kwargs) for impl in _impls(pm, hook)]
    found: list[str] = []
    for name, result, failure in await asyncio.gather(*calls):
        if failure:
            found.append(f"{name}: {failure}")
        elif result is None:
            continue
        elif isinstance(result, str) and result.strip():
            found.append(f"{name}: {result.strip()}")
        else:
            found.append(f"{name}: returned {result!r} (expected None or a reason)")
    return found


async def notify(pm: pluggy.PluginManager, hook: str, timeout: float, **kwargs: Any) -> None:
    """Tell every implementation of ``hook``; failures are logged, results ignored."""
    calls = [_call_one(pm, impl, timeout, kwargs) for impl in _impls(pm, hook)]
    for name, _result, failure in await asyncio.gather(*calls):
        if failure:
            log.warning("plugin %s in %s: %s", name, hook, failure)
