"""The typed hook caller: bounded workers, ordered statuses, newest progress, never a delay."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pluggy

import connhex_edge_ota.plugin
from connhex_edge_ota import hookimpl
from connhex_edge_ota.agent import plugin_manager
from connhex_edge_ota.hooks import STATUS_BACKLOG, Hooks
from connhex_edge_ota.release import Release
from connhex_edge_ota.status import Status

RELEASE = Release(version="2", size=100, digest="sha-256=:x:")


def manager(*plugins: tuple[str, object]) -> pluggy.PluginManager:
    pm, loaded = plugin_manager(
        installed=False, plugins=[("ota", connhex_edge_ota.plugin), *plugins]
    )
    assert all(not p.error for p in loaded), loaded
    return pm


def status(n: int) -> Status:
    return Status(current_version=str(n), status="checking")


class Hung:
    """Never returns from the notifications until ``release`` is set; answers gates at once."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.statuses: list[str] = []
        self.progress: list[int] = []

    @hookimpl
    def ota_on_status(self, status: Status) -> None:
        self.entered.set()
        self.release.wait()
        self.statuses.append(status.current_version)

    @hookimpl
    def ota_on_progress(self, release: Release, downloaded: int, total: int) -> None:
        self.entered.set()
        self.release.wait()
        self.progress.append(downloaded)

    @hookimpl
    def ota_pre_install(self, release: Release) -> str | None:
        return None


class Recorder:
    def __init__(self) -> None:
        self.statuses: list[str] = []
        self.all_seen = threading.Event()

    @hookimpl
    def ota_on_status(self, status: Status) -> None:
        self.statuses.append(status.current_version)
        if status.current_version == "last":
            self.all_seen.set()


def test_a_hung_plugin_holds_its_threads_whatever_the_number_of_calls() -> None:
    hung = Hung()
    pm = manager(("hung", hung))

    async def flood() -> tuple[int, list[str]]:
        hooks = Hooks(pm, 0.2)
        hooks.status(status(0))
        assert await asyncio.to_thread(hung.entered.wait, 5)
        before = threading.active_count()
        vetoes: list[str] = []
        for n in range(200):
            hooks.status(status(n))
            hooks.progress(RELEASE, n, 100)
        for _ in range(5):
            vetoes += await hooks.veto_install(RELEASE)
        after = threading.active_count()
        hooks.close()
        return after - before, vetoes

    grown, vetoes = asyncio.run(flood())
    hung.release.set()
    assert grown <= 1  # the gate lane, once
    assert vetoes == []  # stuck forwarding statuses, it still answers its gates


def test_statuses_arrive_in_order_and_a_slow_plugin_delays_no_one() -> None:
    hung, recorder = Hung(), Recorder()
    pm = manager(("hung", hung), ("recorder", recorder))

    async def tell() -> None:
        hooks = Hooks(pm, 5.0)
        for n in range(50):
            hooks.status(status(n))  # returns at once, the hung plugin notwithstanding
        hooks.status(Status(current_version="last"))
        assert await asyncio.to_thread(recorder.all_seen.wait, 5)
        hooks.close()

    asyncio.run(tell())
    hung.release.set()
    assert recorder.statuses == [*map(str, range(50)), "last"]


def test_drain_delivers_the_last_status_before_shutdown() -> None:
    recorder = Recorder()

    class Slow:
        def __init__(self) -> None:
            self.seen: list[str] = []

        @hookimpl
        def ota_on_status(self, status: Status) -> None:
            threading.Event().wait(0.01)
            self.seen.append(status.current_version)

    slow = Slow()
    pm = manager(("recorder", recorder), ("slow", slow))

    async def shutdown() -> bool:
        hooks = Hooks(pm, 5.0)
        for n in range(20):
            hooks.status(status(n))
        hooks.status(Status(current_version="last"))
        drained = await hooks.drain()
        hooks.close()
        return drained

    assert asyncio.run(shutdown())
    assert slow.seen[-1] == "last" and len(slow.seen) == 21
    assert recorder.statuses[-1] == "last"


def test_drain_abandons_a_hung_plugin_after_the_timeout() -> None:
    hung = Hung()
    pm = manager(("hung", hung))

    async def shutdown() -> bool:
        hooks = Hooks(pm, 0.2)
        hooks.status(status(1))
        hooks.status(status(2))
        drained = await hooks.drain()
        hooks.close()
        return drained

    assert asyncio.run(shutdown()) is False
    hung.release.set()


def test_progress_not_taken_is_replaced_by_the_newest() -> None:
    hung = Hung()
    pm = manager(("hung", hung))

    async def download() -> None:
        hooks = Hooks(pm, 5.0)
        hooks.progress(RELEASE, 1, 100)
        assert await asyncio.to_thread(hung.entered.wait, 5)
        for downloaded in range(2, 101):
            hooks.progress(RELEASE, downloaded, 100)
        hung.release.set()
        assert await hooks.drain()
        hooks.close()

    asyncio.run(download())
    assert hung.progress == [1, 100]


def test_a_stuck_plugin_keeps_the_newest_statuses() -> None:
    hung = Hung()
    pm = manager(("hung", hung))

    async def flood() -> None:
        hooks = Hooks(pm, 5.0)
        hooks.status(status(0))
        assert await asyncio.to_thread(hung.entered.wait, 5)
        for n in range(1, 3 * STATUS_BACKLOG):
            hooks.status(status(n))
        hung.release.set()
        assert await hooks.drain()
        hooks.close()

    asyncio.run(flood())
    assert len(hung.statuses) == 1 + STATUS_BACKLOG
    assert hung.statuses[-1] == str(3 * STATUS_BACKLOG - 1)
    assert hung.statuses[1:] == sorted(hung.statuses[1:], key=int)


def test_a_gate_stuck_in_another_gate_is_a_veto_naming_why() -> None:
    release = threading.Event()

    class StuckGate:
        @hookimpl
        def ota_pre_download(self, release: Release) -> str | None:
            gate_release.wait()
            return None

        @hookimpl
        def ota_pre_install(self, release: Release) -> str | None:
            return None

    gate_release = release
    pm = manager(("stuck", StuckGate()))

    async def ask() -> tuple[list[str], list[str]]:
        hooks = Hooks(pm, 0.2)
        first = await hooks.veto_download(RELEASE)
        second = await hooks.veto_install(RELEASE)
        hooks.close()
        return first, second

    first, second = asyncio.run(ask())
    release.set()
    assert first == ["stuck: no answer within 0.2s"]
    assert len(second) == 1
    assert second[0].startswith("stuck: no answer within 0.2s (busy in ota_pre_download for ")


def test_vetoes_name_their_plugin_and_strange_answers_veto() -> None:
    class Odd:
        @hookimpl
        def ota_pre_install(self, release: Release) -> Any:
            return 42

    class MultiLine:
        @hookimpl
        def ota_pre_install(self, release: Release) -> str | None:
            return "first line\nsecond line"

    pm = manager(("odd", Odd()), ("multi", MultiLine()))
    found = asyncio.run(Hooks(pm, 5.0).veto_install(RELEASE))
    assert sorted(found) == [
        "multi: first line | second line",
        "odd: returned 42 (expected None or a reason)",
    ]
