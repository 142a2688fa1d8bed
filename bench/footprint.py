"""The store's footprint: bytes under ``install_dir`` at rest and at peak during an update.

Each case installs release A with the real ``connhex-edge-ota run`` (check, download,
verify, unpack, ``update.sh``), then measures the next update to release B while a
sampler reads the store every 20 ms:

- ``bytes``: what ``du -sb`` counts (apparent sizes of every file under ``install_dir``);
- ``blocks``: what the filesystem lost (``statvfs``), where ``install_dir`` is a
  loop-mounted filesystem of its own (as root): on XFS and Btrfs a reflinked copy is
  free, so this column shows what the disk really pays.

The bounds (issue 21): at rest ``U + D + 1 MiB``, at peak
``U_old + U_new + D_old + D_new + 1 MiB``, where U is a release's unpacked bytes and D
the compressed bytes of its deflated members. ``update.sh`` copies its payload to a
folder outside the store, which is not counted. The update's wall time is printed
beside the same update from a server that ignores ``Range`` (the whole-release path,
measured in the same run), so a saving of space that costs time shows.

Cases: one 256 MiB stored file, every byte changed; 20 stored members of which one
changes (a delta); 10,000 small deflated files, every one changed. Each on a plain
folder of ``/var/tmp`` and, as root, on loop-mounted ext4, XFS and Btrfs where their
``mkfs`` can be had. Usage: ``python bench/footprint.py [--size-mib 256] [--fs ext4,xfs]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from common import (
    MIB,
    agent_command,
    bare_agent_env,
    ensure,
    installing_config,
    settle,
    wait_recorded,
)

from connhex_edge_ota.natsserver import NatsServer, free_port, wait_listening

FILESYSTEMS = {"ext4": "e2fsprogs", "xfs": "xfsprogs", "btrfs": "btrfs-progs"}
"""Loop-mounted filesystems and the Debian package of each one's ``mkfs``."""


@dataclass(frozen=True)
class Release:
    path: Path
    version: str
    unpacked: int
    """U: the bytes of its unpacked tree."""
    deflated: int
    """D: the compressed bytes of its deflated members."""


def describe(path: Path, version: str) -> Release:
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
    return Release(
        path,
        version,
        sum(i.file_size for i in infos),
        sum(i.compress_size for i in infos if i.compress_type == zipfile.ZIP_DEFLATED),
    )


def build(folder: Path, version: str, members: dict[str, bytes], dest: Path) -> Release:
    """A release of ``members`` whose ``update.sh`` copies ``payload*`` out of the store."""
    update = textwrap.dedent(
        f"""\
        mkdir -p "{dest}"
        for f in payload*; do [ -e "$f" ] && cp -r "$f" "{dest}/"; done
        sync
        """
    )
    path = folder / f"fw-{version}.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("update.sh", update, compress_type=zipfile.ZIP_DEFLATED)
        for name, data in members.items():
            # Random bytes are stored, as pack stores what deflate would barely shrink.
            method = zipfile.ZIP_DEFLATED if name.startswith("payload/") else zipfile.ZIP_STORED
            archive.writestr(name, data, compress_type=method)
    return describe(path, version)


def single_file(size_mib: int, seed: int) -> dict[str, bytes]:
    return {"payload.bin": os.urandom(size_mib * MIB - seed)}


def twenty_members(size_mib: int, changed: bool) -> Iterator[tuple[str, bytes]]:
    part = size_mib * MIB // 20
    for n in range(20):
        yield f"payload-{n:02}.bin", os.urandom(part) if changed or n else b""


def small_files(count: int, version: str) -> dict[str, bytes]:
    words = b"firmware configuration table entry value checksum offset block "
    return {
        f"payload/{n // 100:03}/file-{n:05}.txt": (words * 32) + f"{version} {n}\n".encode()
        for n in range(count)
    }


def cases(size_mib: int, count: int) -> list[tuple[str, dict[str, bytes], dict[str, bytes]]]:
    """(name, members of A, members of B) for each case."""
    base = dict(twenty_members(size_mib, True))
    changed = dict(base)
    changed["payload-07.bin"] = os.urandom(len(base["payload-07.bin"]))
    return [
        (f"{size_mib} MiB, one stored file, all changed", single_file(size_mib, 0),
         single_file(size_mib, 1)),
        (f"{size_mib} MiB in 20 members, 1 changed", base, changed),
        (f"{count} small deflated files, all changed", small_files(count, "a"),
         small_files(count, "b")),
    ]  # fmt: skip


class Sampler:
    """The store's bytes (apparent sizes) and its filesystem's used bytes, every 20 ms."""

    def __init__(self, root: Path, own_fs: bool) -> None:
        self.root = root
        self.own_fs = own_fs
        self.peak_bytes = 0
        self.peak_blocks = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._empty = used_bytes(root) if own_fs else 0

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.sample()

    def sample(self) -> None:
        self.peak_bytes = max(self.peak_bytes, apparent_bytes(self.root))
        if self.own_fs:
            self.peak_blocks = max(self.peak_blocks, used_bytes(self.root) - self._empty)


def apparent_bytes(root: Path) -> int:
    """What ``du -sb`` counts: the sizes of every file and folder under ``root``."""
    total = 0
    stack = [root]
    while stack:
        with (
            contextlib.suppress(FileNotFoundError, NotADirectoryError),
            os.scandir(stack.pop()) as entries,
        ):
            for entry in entries:
                with contextlib.suppress(FileNotFoundError):
                    total += entry.stat(follow_symlinks=False).st_size
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(Path(entry.path))
    return total


def used_bytes(root: Path) -> int:
    stats = os.statvfs(root)
    return (stats.f_blocks - stats.f_bfree) * stats.f_frsize


@contextlib.contextmanager
def filesystem(kind: str, scratch: Path, size_mib: int) -> Iterator[Path | None]:
    """A mount point of a fresh loop-mounted ``kind`` filesystem; a plain folder for
    ``"folder"``; None when it cannot be had here (not root, no mkfs, no loop device)."""
    mount = scratch / f"mnt-{kind}"
    mount.mkdir()
    if kind == "folder":
        yield mount
        return
    if os.geteuid() != 0 or ensure(f"mkfs.{kind}", FILESYSTEMS[kind]) is None:
        yield None
        return
    image = scratch / f"{kind}.img"
    with image.open("wb") as file:
        file.truncate(size_mib * MIB)
    made = subprocess.run([f"mkfs.{kind}", "-q", str(image)], capture_output=True, text=True)
    if made.returncode != 0:
        made = subprocess.run([f"mkfs.{kind}", str(image)], capture_output=True, text=True)
    mounted = (
        made.returncode == 0
        and (
            subprocess.run(["mount", "-o", "loop", str(image), str(mount)], capture_output=True)
        ).returncode
        == 0
    )
    if not mounted:
        print(f"bench: {kind} could not be made or mounted here; left out")
        yield None
        return
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)
        image.unlink()


@contextlib.contextmanager
def release_server(folder: Path, ignore_range: bool) -> Iterator[str]:
    """The project's release server on 127.0.0.1 in a child process, serving the newest
    zip of ``folder``; with ``ignore_range`` it answers every ``Range`` with the whole
    release (200), as a proxy that strips ranges would."""
    port = free_port()
    code = textwrap.dedent(
        """\
        import sys, threading
        from pathlib import Path
        from connhex_edge_ota.server import ReleaseServer
        server = ReleaseServer(Path(sys.argv[1]), port=int(sys.argv[2]))
        server.faults.ignore_range = sys.argv[3] == "1"
        server.start()
        threading.Event().wait()
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code, str(folder), str(port), "1" if ignore_range else "0"],
        stderr=subprocess.DEVNULL,  # a transfer the stopped agent cut is no news here
    )
    try:
        wait_listening(port, process, "the release server")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait()


def update(root: Path, install_dir: Path, url: str, nats_url: str, version: str) -> float:
    """The real agent from its start until ``state.json`` records ``version``; wall seconds."""
    config = installing_config(root, url, nats_url, install_dir, "0.0.0")
    settle()
    started = time.perf_counter()
    with (root / "agent.log").open("ab") as log:
        agent = subprocess.Popen(agent_command(config), stderr=log, env=bare_agent_env())
    try:
        wait_recorded(agent, install_dir, version)
        return time.perf_counter() - started
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(30)


@dataclass(frozen=True)
class Figures:
    rest: int
    rest_blocks: int
    peak: int
    peak_blocks: int
    wall: float


def run_case(
    root: Path, mount: Path, own_fs: bool, a: Release, b: Release, nats_url: str, whole: bool
) -> Figures:
    """Install A, then measure the update to B (from a server that ignores ranges when
    ``whole``); the store at rest after B and at peak during it."""
    install_dir = mount / "opt"
    shutil.rmtree(install_dir, ignore_errors=True)
    install_dir.mkdir()
    served = root / ("served-whole" if whole else "served")
    shutil.rmtree(served, ignore_errors=True)
    served.mkdir()
    with release_server(served, ignore_range=whole) as url:
        shutil.copyfile(a.path, served / a.path.name)
        update(root, install_dir, url, nats_url, a.version)
        (served / a.path.name).unlink()
        shutil.copyfile(b.path, served / b.path.name)
        with Sampler(install_dir, own_fs) as sampler:
            wall = update(root, install_dir, url, nats_url, b.version)
    rest = Sampler(install_dir, own_fs)
    rest.sample()
    return Figures(rest.peak_bytes, rest.peak_blocks, sampler.peak_bytes, sampler.peak_blocks, wall)


def cell(value: int, bound: int, size: int) -> str:
    """``value`` as a multiple of the release's size, and whether it keeps its bound."""
    return f"{value / size:.2f}x {'ok' if value <= bound else 'OVER'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--small-files", type=int, default=10_000)
    parser.add_argument("--fs", default="folder,ext4,xfs,btrfs")
    args = parser.parse_args()
    rows: list[str] = []
    with (
        tempfile.TemporaryDirectory(prefix="ota-bench-footprint-", dir="/var/tmp") as tmp,
        NatsServer() as nats,
    ):
        scratch = Path(tmp)
        for n, (name, members_a, members_b) in enumerate(cases(args.size_mib, args.small_files)):
            folder = scratch / f"case-{n}"
            folder.mkdir()
            dest = scratch / "dest"
            a = build(folder, "1.0.0", members_a, dest)
            b = build(folder, "1.0.1", members_b, dest)
            del members_a, members_b
            size = b.path.stat().st_size
            rest_bound = b.unpacked + b.deflated + MIB
            peak_bound = a.unpacked + b.unpacked + a.deflated + b.deflated + MIB
            for kind in args.fs.split(","):
                fs_size = max(4 * (a.unpacked + b.unpacked) + 256 * MIB, 1024 * MIB) // MIB
                with filesystem(kind, folder, fs_size) as mount:
                    if mount is None:
                        continue
                    own = kind != "folder"
                    ours = run_case(folder, mount, own, a, b, nats.url, whole=False)
                    whole = run_case(folder, mount, own, a, b, nats.url, whole=True)
                shutil.rmtree(dest, ignore_errors=True)

                rows.append(
                    f"| {name} | {kind} | {ours.rest:,} | {rest_bound:,} | "
                    f"{cell(ours.rest, rest_bound, size)} | {ours.peak:,} | {peak_bound:,} | "
                    f"{cell(ours.peak, peak_bound, size)} | "
                    + (f"{ours.peak_blocks / size:.2f}x | " if own else "n/a | ")
                    + f"{ours.wall:.2f} s | {ours.wall / whole.wall:.2f}x |"
                )
                print(rows[-1], flush=True)
    print()
    print("store footprint (bytes as du -sb; x = multiple of the release zip's size):")
    print(
        "| case | fs | at rest | bound U+D+1MiB | rest | peak | bound | peak | "
        "peak blocks | wall | vs whole-release path |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
