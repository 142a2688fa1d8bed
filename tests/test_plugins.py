"""The plugin model: entry points, blocking, and vetoes that do not depend on order."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pluggy
import pytest

from connhex_edge_ota import hookimpl
from connhex_edge_ota.agent import BLOCKED_ENV, blocked_plugins, plugin_manager
from connhex_edge_ota.hooks import Hooks
from connhex_edge_ota.release import Release

RELEASE = Release(version="2", size=1, digest="sha-256=:x:")


class Allow:
    @hookimpl
    def ota_pre_install(self, release: Release) -> str | None:
        return None


class Deny:
    @hookimpl
    def ota_pre_install(self, release: Release) -> str | None:
        return "battery low"


class Raises:
    @hookimpl
    def ota_pre_install(self, release: Release) -> str | None:
        raise RuntimeError("boom")


class Slow:
    @hookimpl
    def ota_pre_install(self, release: Release) -> str | None:
        time.sleep(5)
        return None


class Async:
    @hookimpl
    async def ota_pre_install(self, release: Release) -> str | None:  # a mistake authors make
        return None


def manager(*plugins: tuple[str, object]) -> pluggy.PluginManager:
    pm, _ = plugin_manager(blocked=["dummy-veto", "dummy-broken"], plugins=plugins)
    return pm


@pytest.mark.parametrize(
    "order", [[("allow", Allow()), ("deny", Deny())], [("deny", Deny()), ("allow", Allow())]]
)
def test_any_veto_wins_whatever_the_order(order: list[tuple[str, object]]) -> None:
    pm = manager(*order)
    assert asyncio.run(Hooks(pm, 5.0).veto_install(RELEASE)) == ["deny: battery low"]


def test_every_plugin_is_asked_and_failures_veto() -> None:
    pm = manager(("raises", Raises()), ("slow", Slow()), ("allow", Allow()))
    started = time.monotonic()
    found = asyncio.run(Hooks(pm, 0.5).veto_install(RELEASE))
    assert time.monotonic() - started < 3  # the slow plugin did not hold the others up
    assert sorted(found) == ["raises: raised RuntimeError: boom", "slow: no answer within 0.5s"]


def test_notify_isolates_failures() -> None:
    seen: list[str] = []

    class Broken:
        @hookimpl
        def ota_on_status(self, status: Any) -> None:
            raise RuntimeError("broken forwarder")

    class Good:
        @hookimpl
        def ota_on_status(self, status: Any) -> None:
            seen.append(status)

    pm = manager(("broken", Broken()), ("good", Good()))

    async def tell() -> bool:
        hooks = Hooks(pm, 5.0)
        hooks.status("s")  # type: ignore[arg-type]
        return await hooks.drain()

    assert asyncio.run(tell())
    assert seen == ["s"]


def test_entry_points_load_skip_broken_and_honour_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    pm, loaded = plugin_manager()
    by_name = {p.name: p for p in loaded}
    assert by_name["ota"].error == "" and pm.get_plugin("ota") is not None
    assert by_name["dummy-broken"].error.startswith("ImportError")
    assert pm.get_plugin("dummy-broken") is None
    assert by_name["dummy-veto"].distribution == "connhex-dummy-plugins"

    monkeypatch.setenv(BLOCKED_ENV, "dummy-veto")
    pm, loaded = plugin_manager(blocked=blocked_plugins(None))
    assert pm.get_plugin("dummy-veto") is None
    assert {p.name: p.error for p in loaded}["dummy-veto"] == "blocked"


def test_blocked_plugins_from_agent_table(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("[agent]\nblocked_plugins = ['a', 'b']\n")
    assert blocked_plugins(path) >= {"a", "b"}


def test_plugin_with_unknown_hook_is_dropped_not_fatal() -> None:
    class Typo:
        @hookimpl
        def ota_pre_instal(self, release: Release) -> None:
            return None

    pm = manager(("typo", Typo()), ("allow", Allow()))
    assert pm.get_plugin("typo") is None and pm.get_plugin("allow") is not None


RECORDER = """
import json, os
from connhex_edge_ota import hookimpl

def _record(name):
    with open(os.environ["RECORDER_LOG"], "a") as f:
        f.write(name + "\\n")

@hookimpl
def agent_addhooks(pluginmanager):
    _record("agent_addhooks")

@hookimpl
def agent_configure(agent):
    _record("agent_configure")

@hookimpl
def agent_start(agent):
    _record("agent_start")

@hookimpl
def agent_stop(agent):
    _record("agent_stop")

@hookimpl
def agent_restart(agent, reason):
    _record("agent_restart")
    return None  # let the reference host restart
"""


def test_lifecycle_hooks_fire_in_order_across_a_self_restart(
    ota_agent: Any,
    release_server: Any,
    make_release: Any,
    statuses: Any,
    tmp_path: Path,
) -> None:
    (tmp_path / "recorder.py").write_text(RECORDER)
    log = tmp_path / "lifecycle.log"
    release_server.releases.publish(make_release("2.0.0", update_sh="exit 10\n"))
    agent = ota_agent(
        auto_install=True,
        extra_tables={"agent": {"plugins": ["recorder"]}},
        env={"PYTHONPATH": str(tmp_path), "RECORDER_LOG": str(log)},
    )
    updated = statuses.wait_updated("2.0.0")
    # The re-executed agent checks first thing: wait for that round to end.
    again = statuses.wait_status("checking", after=statuses.statuses.index(updated))
    statuses.wait_status("updated", after=statuses.statuses.index(again))
    agent.stop()
    once = ["agent_addhooks", "agent_configure", "agent_start"]
    assert log.read_text().split() == [*once, "agent_restart", "agent_stop", *once, "agent_stop"]
