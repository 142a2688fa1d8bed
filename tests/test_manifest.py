"""plugin.toml says what the code declares: entry point, config defaults, subjects, hooks."""

from __future__ import annotations

import inspect
import tomllib
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest

from connhex_edge_ota import hookspecs, plugin
from connhex_edge_ota.commands import VERBS, subject
from connhex_edge_ota.config import ENV_PREFIX, TABLE, OtaSettings
from connhex_edge_ota.duration import format_duration, parse_duration
from connhex_edge_ota.status import HEARTBEAT_SUBJECT

ROOT = Path(__file__).resolve().parent.parent
MANIFEST: dict[str, Any] = tomllib.loads((ROOT / "plugin.toml").read_text())


def test_entry_point_is_installed_as_declared() -> None:
    declared = MANIFEST["plugin"]
    found = [
        ep
        for ep in entry_points(group=declared["entry_point_group"])
        if ep.name == declared["name"]
    ]
    assert [ep.value for ep in found] == [declared["entry_point"]]
    assert found[0].dist is not None and found[0].dist.name == declared["distribution"]


def test_config_table_and_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NATS_URL", raising=False)
    config = MANIFEST["config"]
    assert (config["table"], config["env_prefix"]) == (TABLE, ENV_PREFIX)
    settings = OtaSettings()
    fields = set(OtaSettings.model_fields)
    unset = {"server_url", "init_id", "init_key", "ca_file", "cert_file", "key_file", "public_key"}
    unset |= {key for key in fields if key.startswith("nats_") and key != "nats_url"}
    assert set(config["defaults"]) == fields - unset
    for key, declared in config["defaults"].items():
        actual = getattr(settings, key)
        if isinstance(declared, str) and key.endswith(
            ("interval", "timeout", "jitter", "floor", "delay", "grace")
        ):
            assert parse_duration(declared) == actual, key
            assert format_duration(actual) == declared, key
        else:
            assert str(actual) == str(declared), key
    for key in unset:
        assert not getattr(settings, key) or key == "init_key"


def test_subjects() -> None:
    assert MANIFEST["nats"]["publishes"] == [HEARTBEAT_SUBJECT]
    assert MANIFEST["nats"]["serves"] == [
        subject(v) for v in ("check", "download", "install", "status")
    ]
    assert set(VERBS) == {"check", "download", "install", "status"}


def test_hooks_offered_and_implemented() -> None:
    offered = [
        n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("ota_")
    ]
    assert sorted(MANIFEST["hooks"]["offered"]) == sorted(offered)
    implemented = [
        n for n, f in inspect.getmembers(plugin, inspect.isfunction) if n.startswith("agent_")
    ]
    assert sorted(MANIFEST["hooks"]["implemented"]) == sorted(implemented)
