"""Statuses forwarded from a running agent to another NATS subject and to a file."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from connhex_status_forwarder import load_config, senml

from connhex_edge_ota.config import ConfigError
from connhex_edge_ota.natsserver import NatsServer
from connhex_edge_ota.server import ReleaseServer
from connhex_edge_ota.status import Status
from connhex_edge_ota.testing import OtaAgent, StatusWatcher


def test_statuses_are_forwarded_as_senml_and_to_a_file(
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
    statuses: StatusWatcher,
    nats_server: NatsServer,
    tmp_path: Path,
) -> None:
    forwarded = StatusWatcher(nats_server.url, subject="events.data")
    raw: list[bytes] = []
    forwarded.start()
    try:
        lines = tmp_path / "ota-status.jsonl"
        release_server.releases.publish(make_release("2.0.0"))
        ota_agent(
            auto_install=True,
            plugins=["status-forwarder"],
            extra_tables={"status_forwarder": {"subject": "events.data", "file": str(lines)}},
        )
        statuses.wait_updated("2.0.0")
        # Status hooks run after the publication: wait for the forwarder's last message.
        forwarded.wait_raw(lambda body: b'"vs": "updated"' in body)
        raw = forwarded.raw_messages()
        # The forwarder saw the same sequence, in order, without heartbeat repeats.
        written = [json.loads(line)["status"] for line in lines.read_text().splitlines()]
        assert written == [
            "checking",
            "update_available",
            "downloading",
            "update_ready",
            "updating",
            "updated",
        ]
    finally:
        forwarded.close()
    packs = [json.loads(message) for message in raw]
    assert packs and all(pack[0]["bn"] == "ota:" for pack in packs)
    assert [next(r["vs"] for r in pack if r["n"] == "status") for pack in packs][-1] == "updated"


def test_senml_pack_shape() -> None:
    pack = senml(Status("1", "2", "updating", "", ""), "ota", 10.0)
    assert pack[0] == {"bn": "ota:", "bt": 10.0, "n": "current_version", "vs": "1"}
    assert [r["n"] for r in pack] == [
        "current_version",
        "latest_version",
        "status",
        "error",
        "last_checked",
    ]


def test_bad_config_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"\[status_forwarder\] format"):
        load_config({"format": "xml"})


@pytest.mark.parametrize("name", ["", ":ota", "ota device", "-ota", "ota\u00e9"])
def test_name_must_be_a_senml_name(name: str) -> None:
    with pytest.raises(ConfigError, match=r"\[status_forwarder\] name = .*RFC 8428"):
        load_config({"name": name})


@pytest.mark.parametrize("name", ["ota", "urn:dev:ow:10e2073a01080063", "site-1/gw_2.ota"])
def test_valid_senml_names_are_taken(name: str) -> None:
    assert load_config({"name": name}).name == name


def test_records_carry_the_time_of_the_status_not_of_the_forwarding() -> None:
    from connhex_status_forwarder import StatusForwarder

    forwarder = StatusForwarder()
    status = Status("1", "2", "updating", "", "", at=1_700_000_000.5)
    pack = json.loads(forwarder.encode(status))
    assert pack[0]["bt"] == 1_700_000_000.5
