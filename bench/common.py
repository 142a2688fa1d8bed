"""What the bench scripts share: installing tools, nginx as the device endpoint, measuring."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from connhex_edge_ota.natsserver import free_port, wait_listening
from connhex_edge_ota.nginxserver import nginx_endpoint as serve_with_nginx

MIB = 1024 * 1024
TIME = "/usr/bin/time"
"""GNU time: a small parent whose child's peak RSS is the command's own."""
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
"""Runs per figure; the median is printed."""


def ensure(binary: str, package: str) -> str | None:
    """The path of ``binary``, installing Debian's ``package`` first when missing (as root).

    ``BENCH_WITHOUT=nginx,mender`` pretends those are missing, to try the fallbacks.
    """
    if binary in os.environ.get("BENCH_WITHOUT", "").split(","):
        print(f"bench: {binary} left out (BENCH_WITHOUT)")
        return None
    found = shutil.which(binary) or next(
        (p for p in (f"/usr/sbin/{binary}", f"/usr/bin/{binary}") if os.access(p, os.X_OK)), None
    )
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        print(f"bench: {binary} is missing and cannot be installed here (needs root and apt-get)")
        return None
    print(f"bench: installing {package} with apt-get ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    done = subprocess.run(
        ["apt-get", "install", "-y", "-q", package], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:]
        print(f"bench: apt-get install {package} failed: {' '.join(last)}")
        return None
    return shutil.which(binary) or (f"/usr/sbin/{binary}" if binary == "nginx" else None)


@dataclass(frozen=True)
class Usage:
    """One whole process: wall seconds, CPU seconds (user + system) and peak RSS in MiB."""

    wall: float
    cpu: float
    rss: float


def measure(command: list[str], env: dict[str, str] | None = None, quiet: bool = False) -> Usage:
    """Run ``command`` to its end under GNU ``time``; wall, CPU and peak RSS of the command.

    Through ``time`` because a child forked by this (large) Python process would
    count this process's memory in its own peak RSS.
    """
    if not os.access(TIME, os.X_OK) and ensure("time", "time") is None:
        raise SystemExit("bench: GNU time is needed (apt-get install time)")
    settle()
    with tempfile.NamedTemporaryFile("r", prefix="ota-bench-time-") as report:
        done = subprocess.run(
            [TIME, "-o", report.name, "-f", "%e %U %S %M", *command],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL if quiet else None,
            env=env,
        )
        if done.returncode != 0:
            raise SystemExit(f"bench: {' '.join(command)[:120]} failed")
        wall, user, system, rss_kib = report.read().split()[-4:]
    return Usage(float(wall), float(user) + float(system), int(rss_kib) / 1024)


def settle() -> None:
    """Write back what earlier runs left dirty, before a measured run starts: otherwise
    a command that does not sync (``curl -s -o``) pays for its predecessor's writeback,
    and one that does pays for everybody's."""
    os.sync()


def interleaved(contenders: dict[str, Callable[[], Usage]], runs: int = RUNS) -> dict[str, Usage]:
    """The median usage of each contender, run in turns (A, B, C, A, B, C ...) so that
    a shared machine's slow minute falls on all of them, not on whoever ran then."""
    results: dict[str, list[Usage]] = {name: [] for name in contenders}
    for _ in range(runs):
        for name, run in contenders.items():
            results[name].append(run())
    return {name: _median(usages) for name, usages in results.items()}


def _median(results: list[Usage]) -> Usage:
    return Usage(
        statistics.median(r.wall for r in results),
        statistics.median(r.cpu for r in results),
        statistics.median(r.rss for r in results),
    )


def median_usage(run: Callable[[], Usage], runs: int = RUNS) -> Usage:
    return _median([run() for _ in range(runs)])


def write_payload(path: Path, size_mib: int) -> Path:
    block = os.urandom(MIB)
    with path.open("wb") as file:
        for _ in range(size_mib):
            file.write(block)
    return path


def make_release(
    folder: Path, size_mib: int, dest: Path | None = None, payload: Path | None = None
) -> Path:
    """A stored zip of ``payload.bin`` whose ``update.sh`` copies it into ``dest`` with sync.

    The copy is the one Mender's single-file module makes: ``cp``, ``sync``, ``mv``.
    """
    path = folder / f"fw-{size_mib}.zip"
    target = dest or folder / "dest"
    update = textwrap.dedent(
        f"""\
        cp "$CHX_OTA_PAYLOAD_DIR/payload.bin" "{target}/payload.bin.tmp"
        sync "{target}/payload.bin.tmp"
        mv "{target}/payload.bin.tmp" "{target}/payload.bin"
        sync "{target}"
        """
    )
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("update.sh", update)
        if payload is not None:
            archive.write(payload, "payload.bin")
            return path
        block = os.urandom(MIB)
        with archive.open("payload.bin", "w", force_zip64=True) as member:
            for _ in range(size_mib):
                member.write(block)
    return path


def sha256_of(path: Path) -> bytes:
    hasher = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(MIB):
            hasher.update(block)
    return hasher.digest()


@contextmanager
def nginx_endpoint(release: Path, version: str) -> Iterator[str | None]:
    """nginx answering ``/iot/ota/<id>`` with ``release`` as the device API does; its URL.

    HEAD and GET return the file with ``Version``, ``Content-Digest`` and nginx's own
    ``ETag`` (which it honours in ``If-Match``) and ``Range``. None when nginx is missing.
    """
    nginx = ensure("nginx", "nginx")
    if nginx is None:
        yield None
        return
    with (
        tempfile.TemporaryDirectory(prefix="ota-bench-nginx-") as tmp,
        serve_with_nginx(nginx, release, version, Path(tmp), access_log=False) as url,
    ):
        yield url


@contextmanager
def endpoint(release: Path, version: str) -> Iterator[tuple[str, str]]:
    """(URL, which server) of ``release`` at ``/iot/ota/<id>``: nginx when it can be had,
    else the project's own release server in a child process (and the output says so)."""
    with nginx_endpoint(release, version) as url:
        if url is not None:
            yield url, "nginx"
            return
    with tempfile.TemporaryDirectory(prefix="ota-bench-serve-") as tmp:
        folder = Path(tmp)
        shutil.copyfile(release, folder / "release.zip")
        (folder / "release.zip.version").write_text(version)
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "connhex_edge_ota", "--log-level", "ERROR", "serve",
             str(folder), "--port", str(port)],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_listening(port, process, "the release server")
            yield f"http://127.0.0.1:{port}", "the project's release server (no nginx)"
        finally:
            process.terminate()
            process.wait()


def agent_config(path: Path, **ota: object) -> Path:
    """An ``agent.toml`` with an ``[ota]`` table of ``ota``."""
    lines = ["[ota]"]
    for key, value in ota.items():
        shown = ("true" if value else "false") if isinstance(value, bool) else repr(value)
        if isinstance(value, (str, Path)):
            shown = f'"{value}"'
        lines.append(f"{key} = {shown}")
    path.write_text("\n".join(lines) + "\n")
    return path


def installing_config(
    root: Path, url: str, nats_url: str, install_dir: Path, initial_version: str
) -> Path:
    """An ``agent.toml`` for an agent that installs whatever ``url`` offers, at once."""
    return agent_config(
        root / "agent.toml",
        server_url=url,
        init_id="bench-device",
        install_dir=install_dir,
        nats_url=nats_url,
        initial_version=initial_version,
        auto_install=True,
        startup_delay="0s",
        free_space_margin=0,
    )


def wait_recorded(agent: subprocess.Popen[bytes], install_dir: Path, version: str) -> None:
    """Return once ``state.json`` under ``install_dir`` records ``version`` as running."""
    state = install_dir / ".store" / "ota" / "state.json"
    while True:
        if agent.poll() is not None:
            raise SystemExit(f"bench: the agent exited before {version} was installed")
        try:
            if json.loads(state.read_text()).get("current_version") == version:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.005)


def agent_command(config: Path, level: str = "WARNING") -> list[str]:
    return [
        sys.executable,
        "-m",
        "connhex_edge_ota",
        "--log-level",
        level,
        "run",
        "--config",
        str(config),
    ]


def bare_agent_env() -> dict[str, str]:
    """The environment for an agent with only the OTA addon: other installed plugins blocked.

    ``make bench`` runs in the test environment, which holds example and dummy plugins.
    """
    from importlib.metadata import entry_points

    others = sorted({ep.name for ep in entry_points(group="connhex_edge")} - {"ota"})
    return {**os.environ, "CONNHEX_AGENT_BLOCKED_PLUGINS": ",".join(others)}


def cpu_seconds(pid: int) -> float:
    """CPU seconds a running process's threads have used so far (ns resolution)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):  # a thread that just ended
            continue
    return total / 1e9


def ratio(ours: float, base: float) -> str:
    return f"{ours / base:.2f}x" if base else "n/a"
