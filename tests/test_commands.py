"""The command surface on NATS: verbs, payloads, joined requests and the bounded queue."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats
import pluggy
import pytest

from connhex_edge_ota import PROJECT
from connhex_edge_ota.bus import Bus
from connhex_edge_ota.commands import BadRequest, parse_request, serve
from connhex_edge_ota.config import load_settings
from connhex_edge_ota.loop import UpdateLoop
from connhex_edge_ota.natsserver import NatsServer
from connhex_edge_ota.server import ReleaseServer
from connhex_edge_ota.service import OtaService
from connhex_edge_ota.store import Store
from connhex_edge_ota.testing import OtaAgent, StatusWatcher


async def _ask_all(url: str, requests: list[tuple[str, bytes]], timeout: float) -> list[Any]:
    nc = await nats.connect(url)
    try:
        replies = await asyncio.gather(
            *(nc.request(subject, payload, timeout=timeout) for subject, payload in requests)
        )
        return [json.loads(reply.data) for reply in replies]
    finally:
        await nc.close()


def ask(url: str, subject: str, payload: bytes = b"", timeout: float = 10.0) -> dict[str, Any]:
    """One request on ``subject``; the JSON reply."""
    reply: dict[str, Any] = asyncio.run(_ask_all(url, [(subject, payload)], timeout))[0]
    return reply


def test_payloads_are_options_objects() -> None:
    assert parse_request("install", b"") == {}
    assert parse_request("install", b"  \n") == {}
    assert parse_request("install", b"{}") == {}
    for payload, message in [
        (b"[1]", "must be a JSON object of options"),
        (b'"install"', "must be a JSON object"),
        (b"null", "must be a JSON object"),
        (b"{not json", "not JSON"),
        (b"\xff\xfe\x00", "not JSON"),
        (b"[" * 100_000, "not JSON"),
        (b'{"force": true}', "install: unknown option 'force'; options it takes: none"),
    ]:
        with pytest.raises(BadRequest, match=message):
            parse_request("install", payload)
    with pytest.raises(BadRequest, match="known commands: check, download, install, status"):
        parse_request("frobnicate", b"")


def test_unknown_verbs_and_bad_payloads_get_an_error_and_run_nothing(
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
    statuses: StatusWatcher,
    nats_server: NatsServer,
    tmp_path: Path,
) -> None:
    runs = tmp_path / "update-runs"
    release_server.releases.publish(make_release("2.0.0", update_sh=f"echo run >> {runs}\n"))
    ota_agent()
    statuses.wait_status("update_available")
    reply = ask(nats_server.url, "commands.ota.frobnicate")
    assert reply["ok"] is False
    assert reply["error"] == (
        "unknown command 'frobnicate'; known commands: check, download, install, status"
    )
    assert reply["status"]["status"] == "update_available"
    assert ask(nats_server.url, "commands.ota.install.now")["ok"] is False
    for payload in (b"[]", b"{oops", b'{"version": "9.9.9"}'):
        reply = ask(nats_server.url, "commands.ota.install", payload)
        assert reply["ok"] is False and reply["error"].startswith("install: ")
        assert set(reply) == {"ok", "error", "status"}
    assert not runs.exists()
    assert [r for r in release_server.releases.requests if r.method == "GET"] == []
    # An empty payload means no options: the step runs.
    reply = ask(nats_server.url, "commands.ota.install", b"", timeout=20)
    assert reply["ok"] is True or reply.get("accepted") is True
    statuses.wait_updated("2.0.0")
    assert runs.read_text() == "run\n"


def test_twenty_identical_installs_run_update_sh_once(
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
    statuses: StatusWatcher,
    nats_server: NatsServer,
    tmp_path: Path,
) -> None:
    runs = tmp_path / "update-runs"
    # A failing update keeps the offer, so each separate install would run it again.
    update_sh = f"echo run >> {runs}\nexit 3\n"
    release_server.releases.publish(make_release("2.0.0", update_sh=update_sh))
    ota_agent()
    statuses.wait_status("update_available")
    replies = asyncio.run(
        _ask_all(nats_server.url, [("commands.ota.install", b"{}")] * 20, timeout=20)
    )
    failed = statuses.wait_status("update_failed")
    finished = [r for r in replies if not r.get("accepted")]
    assert all(r["ok"] is False and r["error"] == failed.error for r in finished)
    # A check queued now runs after every install still waiting: once it is seen,
    # no install is left to run.
    mark = statuses.mark()
    statuses.request("check")
    statuses.wait_status("checking", after=mark)
    assert runs.read_text() == "run\n"
    assert statuses.names().count("updating") == 1


def test_beyond_the_bound_the_reply_is_busy_with_the_status(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    settings = load_settings(
        None, server_url="http://127.0.0.1:9", init_id="dev", install_dir=str(tmp_path)
    )
    store = Store(settings.store_dir)
    store.create()
    service = OtaService(settings, pluggy.PluginManager(PROJECT), store)
    service.open()

    async def scenario() -> list[dict[str, Any]]:
        bus = Bus()
        stop = asyncio.Event()
        await bus.connect(nats_server.url, "test-commands", stop)
        # The loop's worker is not running: whatever is submitted stays queued.
        loop = UpdateLoop(service, max_queued=1)
        await serve(bus, loop)
        try:
            return await _ask_all(
                nats_server.url,
                [("commands.ota.check", b""), ("commands.ota.download", b"")],
                timeout=10,
            )
        finally:
            await bus.close()

    queued, refused = asyncio.run(scenario())
    assert queued == {"ok": True, "error": "", "accepted": True, "status": queued["status"]}
    assert refused["ok"] is False
    assert refused["error"] == "busy: the queue of 1 steps is full; try again later"
    assert set(refused["status"]) == {
        "current_version",
        "latest_version",
        "status",
        "error",
        "last_checked",
    }
