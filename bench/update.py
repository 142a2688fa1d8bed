"""A whole update, against Mender standalone and a curl + unzip + cp pipeline; peak RSS.

The same payload (``payload.bin``, random bytes) ends up in a destination folder,
copied there with ``cp``, ``sync``, ``mv`` as Mender's single-file update module does:

- connhex-edge-ota: the real ``connhex-edge-ota run`` (``auto_install``, a real
  nats-server) from its start until ``state.json`` records the new version: check,
  download, verify, unpack, ``update.sh``. Then it is stopped; CPU and peak RSS are
  the whole process tree's (GNU time).
- Mender 3.4 standalone (Debian's mender-client, installed with apt-get when
  possible): ``mender install URL`` then ``mender commit`` of a single-file
  artifact made with mender-artifact, served by the same nginx.
- a shell pipeline: ``curl -o``, ``sha256sum -c``, ``unzip``, ``sh update.sh``.

Also the agent's peak RSS for a whole update of a 10 MiB and of a 1 GiB release.
Usage: ``python bench/update.py [--size-mib 256] [--rss-sizes 10,1024]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

from common import (
    RUNS,
    TIME,
    Usage,
    agent_command,
    bare_agent_env,
    endpoint,
    ensure,
    installing_config,
    interleaved,
    make_release,
    measure,
    ratio,
    settle,
    sha256_of,
    wait_recorded,
    write_payload,
)

from connhex_edge_ota.natsserver import NatsServer

VERSION = "2.0.0"


def agent_update(root: Path, url: str, nats_url: str, dest: Path) -> Usage:
    """The real agent from start until the new version is recorded; then stopped."""
    install_dir = root / "opt"
    shutil.rmtree(install_dir, ignore_errors=True)
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    config = installing_config(root, url, nats_url, install_dir, "1.0.0")
    report = root / "time.txt"
    settle()
    started = time.perf_counter()
    with (root / "agent.log").open("ab") as log:
        timer = subprocess.Popen(
            [TIME, "-o", str(report), "-f", "%U %S %M", *agent_command(config)],
            stderr=log,
            env=bare_agent_env(),
        )
    try:
        wait_recorded(timer, install_dir, VERSION)
        wall = time.perf_counter() - started
    finally:
        children = Path(f"/proc/{timer.pid}/task/{timer.pid}/children").read_text().split()
        for child in children:
            os.kill(int(child), signal.SIGTERM)
        timer.wait(30)
    user, system, rss_kib = report.read_text().split()[-3:]
    if not (dest / "payload.bin").is_file():
        raise SystemExit("bench: update.sh did not put the payload in place")
    return Usage(wall, float(user) + float(system), int(rss_kib) / 1024)


def mender_setup(root: Path, payload: Path, dest: Path) -> tuple[Path, list[str]] | None:
    """A single-file Mender artifact of ``payload`` and the mender command prefix; None
    when Mender cannot be installed."""
    mender = ensure("mender", "mender-client")
    artifact_tool = ensure("mender-artifact", "mender-artifact")
    if mender is None or artifact_tool is None:
        return None
    work = root / "mender"
    (work / "data").mkdir(parents=True)
    (work / "data" / "device_type").write_text("device_type=bench\n")
    (work / "dest_dir").write_text(str(dest))
    (work / "filename").write_text("payload.bin")
    config = work / "mender.conf"
    config.write_text(
        json.dumps(
            {
                "ModulesPath": "/usr/share/mender/modules",
                "ModulesWorkPath": str(work / "modules"),
                "ArtifactScriptsPath": str(work / "data" / "scripts"),
                "RootfsScriptsPath": str(work / "data" / "scripts"),
            }
        )
    )
    staged = work / "payload.bin"
    os.link(payload, staged)
    artifact = work / "bench.mender"
    subprocess.run(
        [
            artifact_tool, "write", "module-image", "-T", "single-file", "-n", f"bench-{VERSION}",
            "-t", "bench", "-o", str(artifact), "-f", str(staged), "-f", str(work / "dest_dir"),
            "-f", str(work / "filename"),
        ],
        check=True,
        cwd=work,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return artifact, [mender, "--config", str(config), "--data", str(work / "data")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--rss-sizes", default="10,1024")
    args = parser.parse_args()
    curl = ensure("curl", "curl")
    unzip = ensure("unzip", "unzip")
    with (
        tempfile.TemporaryDirectory(prefix="ota-bench-update-", dir="/var/tmp") as tmp,
        NatsServer() as nats,
    ):
        root = Path(tmp)
        dest = root / "dest"
        payload = write_payload(root / "payload.bin", args.size_mib)
        release = make_release(root, args.size_mib, dest, payload)
        mender = mender_setup(root, payload, dest)
        # Mender reads the running artifact's name from this file when its store is new.
        info = Path("/etc/mender/artifact_info")
        made_info = mender is not None and not info.exists()
        if made_info:
            info.write_text("artifact_name=bench-1.0.0\n")
        try:
            contenders: dict[str, Callable[[], Usage]] = {}
            with contextlib.ExitStack() as servers:
                url, served_by = servers.enter_context(endpoint(release, VERSION))
                contenders["connhex-edge-ota run"] = lambda: agent_update(root, url, nats.url, dest)
                if curl and unzip:
                    digest = sha256_of(release).hex()
                    pipeline = textwrap.dedent(
                        f"""\
                        set -e
                        rm -rf "$1/work" && mkdir -p "$1/work" && cd "$1/work"
                        {curl} -s -o fw.zip "$2"
                        echo "{digest}  fw.zip" | sha256sum -c --quiet
                        {unzip} -q fw.zip -d current
                        cd current && CHX_OTA_PAYLOAD_DIR=$PWD sh update.sh
                        """
                    )

                    def shell() -> Usage:
                        shutil.rmtree(dest, ignore_errors=True)
                        dest.mkdir()
                        return measure(
                            ["sh", "-c", pipeline, "sh", str(root), f"{url}/iot/ota/bench"]
                        )

                    contenders["curl+sha256sum+unzip+cp"] = shell
                if mender is not None:
                    artifact, command = mender
                    murl, _ = servers.enter_context(endpoint(artifact, VERSION))

                    def mender_update() -> Usage:
                        shutil.rmtree(dest, ignore_errors=True)
                        shutil.rmtree(root / "mender" / "data" / "mender-store", True)
                        shutil.rmtree(root / "mender" / "modules", True)
                        install = measure(
                            [*command, "install", f"{murl}/iot/ota/bench"], quiet=True
                        )
                        commit = measure([*command, "commit"], quiet=True)
                        if not (dest / "payload.bin").is_file():
                            raise SystemExit("bench: Mender did not put the payload in place")
                        return Usage(
                            install.wall + commit.wall,
                            install.cpu + commit.cpu,
                            max(install.rss, commit.rss),
                        )

                    contenders["Mender 3.4 install+commit"] = mender_update
                else:
                    print(
                        "bench: Mender could not be installed; compared with the shell "
                        "pipeline only"
                    )
                results = interleaved(contenders)
            rss = {}
            for size in (int(s) for s in args.rss_sizes.split(",")):
                folder = root / f"rss-{size}"
                folder.mkdir()
                sized = make_release(folder, size, dest)
                with endpoint(sized, VERSION) as (sized_url, _):
                    rss[size] = agent_update(folder, sized_url, nats.url, dest)
                sized.unlink()
        finally:
            if made_info:
                info.unlink()
    print(
        f"whole update of a {args.size_mib} MiB single-file payload from {served_by}, "
        f"median of {RUNS}:"
    )
    print(f"  {'':<28} {'wall s':>8} {'CPU s':>8} {'peak RSS MiB':>13}")
    for name, usage in results.items():
        print(f"  {name:<28} {usage.wall:>8.2f} {usage.cpu:>8.2f} {usage.rss:>13.1f}")
    ours = results["connhex-edge-ota run"]
    for name, base in results.items():
        if base is not ours:
            print(
                f"  vs {name}: wall {ratio(ours.wall, base.wall)}, "
                f"CPU {ratio(ours.cpu, base.cpu)}, peak RSS {ratio(ours.rss, base.rss)}"
            )
    print("peak RSS of `run` for a whole update (goal 42 MiB, 1 GiB within 2 MiB of 10 MiB):")
    for size, usage in rss.items():
        print(f"  {size:>5} MiB release: {usage.rss:.1f} MiB (wall {usage.wall:.2f} s)")
    if len(rss) > 1:
        sizes = sorted(rss)
        print(f"  growth: {rss[sizes[-1]].rss - rss[sizes[0]].rss:+.1f} MiB")


if __name__ == "__main__":
    main()
