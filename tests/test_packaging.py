"""What a distribution would check: license, the shipped manifest, and a lean run path."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path

from connhex_edge_ota.natsserver import NatsServer
from connhex_edge_ota.server import ReleaseServer
from connhex_edge_ota.testing import StatusWatcher, write_agent_toml

ROOT = Path(__file__).resolve().parent.parent
DEVELOPMENT_TOOLS = {
    "connhex_edge_ota.server",  # local release server
    "connhex_edge_ota.natsserver",  # embedded NATS launcher
    "connhex_edge_ota.nginxserver",  # nginx as the device endpoint (bench, delta tests)
    "connhex_edge_ota.demo",
    "connhex_edge_ota.testing",  # pytest fixtures
    "connhex_edge_ota.pack",  # release building (pack, verify)
    "pytest",
    "trustme",
    "hypothesis",
}


def test_the_run_path_imports_no_development_tool(
    tmp_path: Path,
    nats_server: NatsServer,
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
    statuses: StatusWatcher,
) -> None:
    """A whole cycle of ``run`` (check, download, install), then the modules it had loaded."""
    release_server.releases.publish(make_release("2.0.0"))
    config = write_agent_toml(
        tmp_path / "agent.toml",
        {
            "ota": {
                "server_url": release_server.url,
                "init_id": "dev",
                "install_dir": str(tmp_path / "opt"),
                "nats_url": nats_server.url,
                "initial_version": "1.0.0",
                "auto_install": True,
                "free_space_margin": 0,
            }
        },
    )
    dump = tmp_path / "modules.json"
    program = (
        "import atexit, json, sys\n"
        f"dump = open({str(dump)!r}, 'w')\n"
        "atexit.register(lambda: dump.write(json.dumps(sorted(sys.modules))))\n"
        "from connhex_edge_ota.cli import main\n"
        f"sys.exit(main(['run', '--config', {str(config)!r}]))\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", program], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        statuses.wait_updated("2.0.0")
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    loaded = set(json.loads(dump.read_text()))
    assert "connhex_edge_ota.installer" in loaded  # the cycle ran in this process
    assert not loaded & DEVELOPMENT_TOOLS


def test_plugin_toml_ships_in_the_package() -> None:
    shipped = files("connhex_edge_ota").joinpath("plugin.toml").read_text()
    assert shipped == (ROOT / "plugin.toml").read_text()


def test_the_wheel_has_an_spdx_license_and_the_manifest(tmp_path: Path) -> None:
    source = tmp_path / "src"
    shutil.copytree(
        ROOT,
        source,
        symlinks=True,
        ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__"),
    )
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    assert built.returncode == 0, built.stderr
    assert "deprecat" not in (built.stdout + built.stderr).lower()
    (wheel,) = (tmp_path / "dist").glob("connhex_edge_ota-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA")))
        manifest = archive.read("connhex_edge_ota/plugin.toml")
    assert manifest == (ROOT / "plugin.toml").read_bytes()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    text = metadata.decode()
    assert "License-Expression: Apache-2.0" in text
    assert "Classifier: Operating System :: POSIX :: Linux" in text
    assert "Author: " in text
