"""What `run` pays for at start: agent.toml parsed once, no development tools imported."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from connhex_edge_ota.agent import blocked_plugins
from connhex_edge_ota.config import load_settings, plugin_table, read_toml

NOT_FOR_RUN = [
    "cryptography",
    "connhex_edge_ota.pack",
    "connhex_edge_ota.server",
    "connhex_edge_ota.demo",
    "connhex_edge_ota.natsserver",
    "connhex_edge_ota.signing",
    "connhex_edge_ota.testing",
]


def test_run_imports_no_development_tool_and_no_cryptography() -> None:
    probe = (
        "import sys\n"
        "import connhex_edge_ota.cli, connhex_edge_ota.plugin, connhex_edge_ota.installer\n"
        f"print([m for m in {NOT_FOR_RUN!r} if m in sys.modules])\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_agent_toml_is_parsed_once_for_every_look(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        '[ota]\nserver_url = "https://apis.example.com"\ninit_id = "a1"\n'
        '[agent]\nblocked_plugins = ["x"]\n[mine]\nkey = 1\n'
    )
    parses: list[str] = []
    real_loads = tomllib.loads

    def counting_loads(text: str) -> dict[str, object]:
        parses.append(text)
        return real_loads(text)

    monkeypatch.setattr(tomllib, "loads", counting_loads)
    for _ in range(3):  # what a start does: the addon, the host, each plugin
        assert load_settings(config).init_id == "a1"
        assert blocked_plugins(config) == {"x"}
        assert plugin_table(config, "mine") == {"key": 1}
    assert len(parses) == 1


def test_an_edited_agent_toml_is_seen_and_callers_cannot_change_the_cache(
    tmp_path: Path,
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('[ota]\ncheck_interval = "1h"\n')
    assert load_settings(config).check_interval == 3600.0
    read_toml(config)["ota"]["check_interval"] = "5s"  # a caller editing its copy
    assert load_settings(config).check_interval == 3600.0
    config.write_text('[ota]\ncheck_interval = "2h"\n')  # same size, same second
    assert load_settings(config).check_interval == 7200.0
