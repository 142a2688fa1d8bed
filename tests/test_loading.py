"""Loading plugins: each checked before it is registered, refused by name with the reason."""

from __future__ import annotations

import asyncio
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pluggy
import pytest

import connhex_edge_ota.plugin
from connhex_edge_ota import hookimpl, hookspec
from connhex_edge_ota.agent import StepHost, configure_each, plugin_manager
from connhex_edge_ota.bus import Bus
from connhex_edge_ota.hooks import Hooks
from connhex_edge_ota.lifecycle import MessageBus
from connhex_edge_ota.loading import LoadedPlugin, load_plugins
from connhex_edge_ota.natsserver import NatsServer
from connhex_edge_ota.release import Release

RELEASE = Release(version="2", size=1, digest="sha-256=:x:")


class Deny:
    @hookimpl
    def ota_pre_install(self, release: Release) -> str | None:
        return "battery low"


def load(*plugins: tuple[str, object]) -> tuple[pluggy.PluginManager, dict[str, LoadedPlugin]]:
    pm, loaded = plugin_manager(
        installed=False, plugins=[("ota", connhex_edge_ota.plugin), *plugins]
    )
    return pm, {p.name: p for p in loaded}


def traces(pm: pluggy.PluginManager, plugin: object) -> list[str]:
    """Every hook where ``plugin`` left an implementation."""
    callers = [c for c in vars(pm.hook).values() if isinstance(c, pluggy.HookCaller)]
    return [c.name for c in callers for i in c.get_hookimpls() if i.plugin is plugin]


def test_misspelled_hook_is_refused_by_name_with_a_hint_and_leaves_no_trace() -> None:
    class Typo:
        @hookimpl
        def ota_pre_install(self, release: Release) -> str | None:
            return "never asked"

        @hookimpl
        def ota_pre_instal(self, release: Release) -> str | None:
            return "never asked"

    typo = Typo()
    pm, loaded = load(("typo", typo), ("deny", Deny()))
    assert loaded["typo"].error == "unknown hook ota_pre_instal (did you mean ota_pre_install?)"
    assert loaded["typo"].failed and not loaded["deny"].error
    assert pm.get_plugin("typo") is None and traces(pm, typo) == []
    assert asyncio.run(Hooks(pm, 5).veto_install(RELEASE)) == ["deny: battery low"]


def test_wrong_argument_name_is_refused() -> None:
    class WrongArgs:
        @hookimpl
        def ota_pre_install(self, rel: Release) -> str | None:
            return None

    pm, loaded = load(("wrong", WrongArgs()))
    assert loaded["wrong"].error == (
        "ota_pre_install: argument rel is not in the hookspec (ota_pre_install(release))"
    )
    assert pm.get_plugin("wrong") is None


@pytest.mark.parametrize("old_style", [False, True])
def test_wrapper_on_an_ota_hook_is_refused_not_skipped(old_style: bool) -> None:
    class Wrapper:
        @hookimpl(wrapper=not old_style, hookwrapper=old_style)
        def ota_pre_install(self, release: Release) -> Generator[None, Any, Any]:
            return (yield)

    pm, loaded = load(("wrapper", Wrapper()))
    assert loaded["wrapper"].error == (
        "ota_pre_install is a wrapper; OTA hooks take plain implementations only"
    )
    assert pm.get_plugin("wrapper") is None


def test_a_wrapper_let_in_by_another_host_fails_closed() -> None:
    class Wrapper:
        @hookimpl(wrapper=True)
        def ota_pre_install(self, release: Release) -> Generator[None, Any, Any]:
            return (yield)

    pm, _ = load()
    pm.register(Wrapper(), name="sneaked-in")  # around load_plugins' checks
    assert asyncio.run(Hooks(pm, 5).veto_install(RELEASE)) == [
        "sneaked-in: a wrapper on ota_pre_install cannot be honoured"
    ]


def test_async_hook_is_refused() -> None:
    class Async:
        @hookimpl
        async def ota_pre_install(self, release: Release) -> str | None:
            return None

    _pm, loaded = load(("async", Async()))
    assert loaded["async"].error == "ota_pre_install is async; hooks must be synchronous"


def test_wrapper_on_agent_start_is_refused_it_starts_each_plugin_on_its_own() -> None:
    class Around:
        @hookimpl(wrapper=True)
        def agent_start(self, agent: Any) -> Generator[None, Any, Any]:
            return (yield)

    _pm, loaded = load(("around", Around()))
    assert loaded["around"].error == (
        "agent_start is a wrapper; agent_start takes plain implementations only"
    )


def test_wrapper_on_a_host_hook_is_pluggy_business_and_accepted() -> None:
    class Around:
        @hookimpl(wrapper=True)
        def agent_stop(self, agent: Any) -> Generator[None, Any, Any]:
            return (yield)

    _pm, loaded = load(("around", Around()))
    assert loaded["around"].error == ""


def test_multi_line_pluggy_errors_are_one_line() -> None:
    class HistoricWrapper:  # pluggy refuses wrappers on historic hooks, over several lines
        @hookimpl(hookwrapper=True)
        def agent_addhooks(self, pluginmanager: Any) -> Generator[None, Any, Any]:
            yield

    _pm, loaded = load(("historic", HistoricWrapper()))
    assert loaded["historic"].failed
    assert "\n" not in loaded["historic"].error and "historic" in loaded["historic"].error


def test_a_hook_declared_by_a_plugin_loaded_later_is_known() -> None:
    class Specs:
        @staticmethod
        @hookspec
        def ota_extra_gate(release: Release) -> str | None:
            """A hook another plugin adds."""

    class Implementer:
        @hookimpl
        def ota_extra_gate(self, release: Release) -> str | None:
            return None

    class Declarer:
        @hookimpl
        def agent_addhooks(self, pluginmanager: pluggy.PluginManager) -> None:
            pluginmanager.add_hookspecs(Specs)

    pm, loaded = load(("implementer", Implementer()), ("declarer", Declarer()))
    assert loaded["implementer"].error == "" and loaded["declarer"].error == ""
    assert len(pm.hook.ota_extra_gate.get_hookimpls()) == 1


def test_agent_addhooks_runs_once_per_plugin() -> None:
    calls: list[str] = []

    class Counter:
        @hookimpl
        def agent_addhooks(self, pluginmanager: pluggy.PluginManager) -> None:
            calls.append("agent_addhooks")

    load(("counter", Counter()))
    assert calls == ["agent_addhooks"]


def test_a_host_with_its_own_project_name_embeds_the_addon(tmp_path: Path) -> None:
    host_hookimpl = pluggy.HookimplMarker("myagent")
    restarts: list[str] = []

    class MyAgentPlugin:
        @host_hookimpl
        def agent_restart(self, agent: Any, reason: str) -> bool:
            restarts.append(reason)
            return True

    pm = pluggy.PluginManager("myagent")
    loaded = load_plugins(
        pm, installed=False, plugins=[("ota", connhex_edge_ota.plugin), ("deny", Deny())]
    )
    assert [p.error for p in loaded] == ["", ""]
    pm.register(MyAgentPlugin(), name="my-agent")
    assert asyncio.run(Hooks(pm, 5).veto_install(RELEASE)) == ["deny: battery low"]
    assert pm.hook.agent_restart(agent=None, reason="exit 10") is True
    assert restarts == ["exit 10"]
    config = tmp_path / "agent.toml"
    config.write_text("[ota]\nserver_url = 'http://127.0.0.1:1'\ninit_id = 'x'\n")
    assert configure_each(StepHost(config, pm)) == {}


def test_each_plugin_table_is_checked_on_its_own(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        "[ota]\nserver_url = 'http://127.0.0.1:1'\ninit_id = 'x'\n"
        "[maintenance_window]\nwindows = ['Mon-Fri 02:00']\n"
    )
    pm, _ = plugin_manager(blocked=["dummy-broken"])
    failures = configure_each(StepHost(config, pm))
    assert list(failures) == ["maintenance-window"]
    assert failures["maintenance-window"].startswith("config error: [maintenance_window] windows")


def test_the_reference_bus_is_a_message_bus_with_request(nats_server: NatsServer) -> None:
    async def roundtrip() -> bytes:
        bus: MessageBus = Bus()  # mypy checks the protocol here
        assert isinstance(bus, Bus)
        stop = asyncio.Event()

        async def echo(_subject: str, body: bytes) -> bytes:
            return b"echo:" + body

        await bus.serve("test.echo", echo)  # before connecting: applied once connected
        await bus.connect(nats_server.url, "test", stop)
        try:
            return await bus.request("test.echo", b"hi", timeout=5)
        finally:
            await bus.close()

    assert asyncio.run(roundtrip()) == b"echo:hi"


def test_a_plugin_whose_agent_addhooks_raises_is_refused() -> None:
    class Broken:
        @hookimpl
        def agent_addhooks(self, pluginmanager: pluggy.PluginManager) -> None:
            raise RuntimeError("spec module missing\nsee the docs")

    broken = Broken()
    pm, loaded = load(("broken-specs", broken), ("deny", Deny()))
    assert loaded["broken-specs"].error == (
        "agent_addhooks raised RuntimeError: spec module missing | see the docs"
    )
    assert pm.get_plugin("broken-specs") is None and traces(pm, broken) == []
    assert loaded["deny"].error == ""


def test_a_plugin_whose_attributes_raise_does_not_stop_loading() -> None:
    class Haunted:
        @property
        def ota_pre_install(self) -> Any:
            raise RuntimeError("boo")

    pm, loaded = load(("haunted", Haunted()), ("deny", Deny()))  # loading goes on
    assert "haunted" in loaded and loaded["deny"].error == ""
    assert asyncio.run(Hooks(pm, 5).veto_install(RELEASE)) == ["deny: battery low"]
