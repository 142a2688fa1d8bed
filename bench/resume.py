"""Bytes fetched again after a download is cut at 90 %, with the real agent.

The project's release server (in this process, so it can cut on purpose) serves one
release; ``connhex-edge-ota run`` with ``auto_download`` fetches it:

- connection cut: the server closes the connection at 90 %; the agent retries
  after ``retry_floor`` and resumes with ``Range``;
- power cut: the server stalls at 90 %, the agent is killed with SIGKILL, then
  started again; after a restart only bytes up to the last durable checkpoint
  are trusted.

Prints the bytes sent twice against the bound (the bytes after the last durable
checkpoint, plus 1 MiB). Usage: ``python bench/resume.py [--size-mib 128]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from common import MIB, agent_command, agent_config, bare_agent_env, write_payload

from connhex_edge_ota.natsserver import NatsServer
from connhex_edge_ota.server import ReleaseServer
from connhex_edge_ota.testing import build_release

CHECKPOINT = 4 * MIB
"""The client's durable checkpoint spacing (client.py), for the bound printed."""


def wait(predicate: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: {what} did not happen within {timeout:.0f} s")
        time.sleep(0.01)


def ready(state: Path) -> bool:
    try:
        return bool(json.loads(state.read_text()).get("ready"))
    except (OSError, ValueError):
        return False


def refetched(server: ReleaseServer, size: int) -> int:
    return sum(r.sent for r in server.releases.requests if r.method == "GET") - size


def partial_state(state: Path) -> dict[str, int]:
    try:
        partial = json.loads(state.read_text()).get("partial") or {}
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in partial.items() if isinstance(v, int)}


def settled(path: Path) -> Callable[[], bool]:
    """True once ``path`` has kept its size for 0.3 s (the agent read what was sent)."""
    seen: list[tuple[int, float]] = []

    def check() -> bool:
        size = path.stat().st_size if path.exists() else -1
        if not seen or seen[-1][0] != size:
            seen.append((size, time.monotonic()))
            return False
        return time.monotonic() - seen[-1][1] >= 0.3

    return check


def scenario(root: Path, release: Path, nats_url: str, power_cut: bool) -> tuple[int, int, int]:
    """(bytes sent twice, release size, bound) for one cut at 90 %."""
    folder = root / ("power" if power_cut else "link")
    (folder / "releases").mkdir(parents=True)
    with ReleaseServer(folder / "releases") as server:
        server.releases.publish(release)
        size = release.stat().st_size
        cut = int(size * 0.9)
        bound = CHECKPOINT + MIB
        if power_cut:
            server.faults.stall_at = cut
        else:
            server.faults.cut_at = cut
        config = agent_config(
            folder / "agent.toml",
            server_url=server.url,
            init_id="bench-device",
            install_dir=folder / "opt",
            nats_url=nats_url,
            initial_version="1.0.0",
            auto_download=True,
            startup_delay="0s",
            retry_floor="100ms",
            free_space_margin=0,
        )
        store = folder / "opt" / ".store" / "ota"
        state = store / "state.json"
        env = bare_agent_env()
        agent = subprocess.Popen(agent_command(config), stderr=subprocess.DEVNULL, env=env)
        try:
            if power_cut:
                wait(lambda: sum(r.sent for r in server.releases.requests) >= cut, "the stall")
                part = store / "downloads" / "2.0.0.zip.part"
                wait(settled(part), "the partial file to settle")
                durable = partial_state(state).get("durable", 0)
                bound = cut - durable + MIB
                agent.kill()
                agent.wait()
                server.faults.stall_for = 0
                agent = subprocess.Popen(agent_command(config), stderr=subprocess.DEVNULL, env=env)
            wait(lambda: ready(state), "the download")
        finally:
            agent.terminate()
            agent.wait(10)
        return refetched(server, size), size, bound


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=int, default=128)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="ota-bench-resume-", dir="/var/tmp") as tmp,
        NatsServer() as nats,
    ):
        root = Path(tmp)
        payload = write_payload(root / "payload.bin", args.size_mib)
        release = build_release(root, "2.0.0", files={"payload.bin": payload.read_bytes()})
        os.unlink(payload)
        print(f"bytes fetched again after a cut at 90 % of a {args.size_mib} MiB download:")
        for label, power_cut in (("connection cut", False), ("power cut (SIGKILL)", True)):
            again, size, bound = scenario(root, release, nats.url, power_cut)
            print(
                f"  {label:<22} {again:>12,} bytes ({again / size:.2%} of the release); "
                f"goal: bytes after the last durable checkpoint + 1 MiB = {bound:,}: "
                f"{'within' if again <= bound else 'OVER'}"
            )


if __name__ == "__main__":
    main()
