"""``connhex-edge-ota demo``: the whole update cycle on this machine, with real parts.

It starts a ``nats-server``, signs and publishes a sample release on a local
release server, runs the real service (``connhex-edge-ota run``) with
``auto_install`` against them, prints each status read off NATS, and ends
after ``updated``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from connhex_edge_ota.natsserver import NatsServer
from connhex_edge_ota.pack import pack
from connhex_edge_ota.server import ReleaseServer
from connhex_edge_ota.signing import keygen
from connhex_edge_ota.status import HEARTBEAT_SUBJECT

DEMO_VERSION = "1.0.1"

UPDATE_SH = """\
#!/bin/sh
set -e
echo "----------------------------------"
echo "FW Update version $CHX_OTA_VERSION_TARGET (from $CHX_OTA_VERSION_CURRENT)"
echo "----------------------------------"
echo "copying new service file..."
mkdir -p "$DEMO_SERVICES"
cp ./new_service.py "$DEMO_SERVICES/"
echo "update complete"
"""


def make_sample_release(
    root: Path, version: str = DEMO_VERSION, services: Path | None = None
) -> Path:
    """A signed sample release ``fw-<version>.zip`` under ``root``; returns its path."""
    source = root / "release-src"
    source.mkdir(parents=True)
    target = services or root / "custom_services"
    script = UPDATE_SH.replace('"$DEMO_SERVICES"', f'"{target}"').replace(
        "$DEMO_SERVICES", str(target)
    )
    (source / "update.sh").write_text(script)
    (source / "rollback.sh").write_text(f'#!/bin/sh\nrm -f "{target}/new_service.py"\n')
    (source / "new_service.py").write_text(f'print("hello from firmware {version}")\n')
    key = root / "release.key"
    keygen(key)
    releases = root / "releases"
    releases.mkdir()
    return pack(source, releases / f"fw-{version}.zip", key, version)


def write_config(
    path: Path, server_url: str, nats_url: str, install_dir: Path, public_key: Path
) -> None:
    path.write_text(
        textwrap.dedent(
            f"""\
            # OTA service configuration (written by the demo).
            [ota]
            auto_download = true
            auto_install = true
            check_interval = '24h0m0s'
            startup_delay = '0s'
            heartbeat_interval = '2s'
            server_url = '{server_url}'
            init_id = 'demo-device'
            install_dir = '{install_dir}'
            nats_url = '{nats_url}'
            initial_version = '1.0.0'
            public_key = '{public_key}'
            """
        )
    )


async def _follow(nats_url: str, agent: subprocess.Popen[bytes], timeout: float) -> int:
    import nats

    nc = await nats.connect(nats_url)
    updated = asyncio.Event()
    last = [""]

    async def on_status(msg: object) -> None:
        payload = json.loads(msg.data)  # type: ignore[attr-defined]
        line = json.dumps(payload)
        if line != last[0]:  # heartbeats repeat the same status: show changes
            last[0] = line
            print(f"{time.strftime('%H:%M:%S')} {HEARTBEAT_SUBJECT} {line}", flush=True)
        if payload["status"] == "updated" and payload["current_version"] == DEMO_VERSION:
            updated.set()
        if payload["status"] in ("update_failed",):
            updated.set()

    await nc.subscribe(HEARTBEAT_SUBJECT, cb=on_status)
    await nc.flush()
    try:
        await asyncio.wait_for(updated.wait(), timeout)
    except TimeoutError:
        print(f"demo: no 'updated' within {timeout:g}s", file=sys.stderr)
        return 1
    finally:
        await nc.close()
    return 0 if last[0] and json.loads(last[0])["status"] == "updated" else 1


def run_demo(timeout: float = 30.0) -> int:
    with tempfile.TemporaryDirectory(prefix="connhex-ota-demo-") as tmp:
        root = Path(tmp)
        release = make_sample_release(root)
        install_dir = root / "opt-connhex"
        install_dir.mkdir()
        config = root / "agent.toml"
        with NatsServer() as nats_server, ReleaseServer(release.parent) as release_server:
            write_config(
                config, release_server.url, nats_server.url, install_dir, root / "release.key.pub"
            )
            print(f"demo: nats-server at {nats_server.url}, release server at {release_server.url}")
            print(f"demo: publishing {release.name}; the device runs 1.0.0; config {config}")
            agent = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "connhex_edge_ota",
                    "--log-level",
                    "WARNING",
                    "run",
                    "--config",
                    str(config),
                ],
            )
            try:
                code = asyncio.run(_follow(nats_server.url, agent, timeout))
            finally:
                agent.send_signal(signal.SIGTERM)
                try:
                    agent.wait(10)
                except subprocess.TimeoutExpired:
                    agent.kill()
            installed = root / "custom_services" / "new_service.py"
            log = install_dir / ".store" / "ota" / "logs" / f"{DEMO_VERSION}.log"
            if log.is_file():
                print(f"demo: output of update.sh (kept in {log.relative_to(root)}):")
                for line in log.read_text().splitlines():
                    print(f"    {line}")
            if code == 0 and installed.is_file():
                print(f"demo: update.sh installed {installed.name}; the device runs {DEMO_VERSION}")
                return 0
            print("demo: the update did not complete", file=sys.stderr)
            return 1
