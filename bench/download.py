"""Download speed and peak memory of the OTA client, against curl on the same server.

Prints, for a 10 MiB and a 1 GiB release: wall time and peak RSS of
``Server.download`` (streaming, hashing, fsync checkpoints) in a child process,
and of ``curl -o`` fetching the same URL, with the ratios. Peak memory must not
grow with the release size. Usage: ``python bench/download.py [--sizes 10,1024]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from connhex_edge_ota.natsserver import free_port

MIB = 1024 * 1024

CLIENT = """
import sys, threading, time
from pathlib import Path
from connhex_edge_ota.client import Server
from connhex_edge_ota.config import load_settings
from connhex_edge_ota.store import Partial, Store

url, install_dir = sys.argv[1], sys.argv[2]
settings = load_settings(None, server_url=url, init_id="bench", install_dir=install_dir,
                         free_space_margin=0)
store = Store(settings.store_dir)
store.create()
server = Server(settings)
release = store.release(server.check(""))
partial = Partial(version=release.version, etag=release.etag, digest=release.digest,
                  size=release.size)
server.download(release, partial, lambda p: None, lambda n: None, threading.Event())
"""


def make_release(folder: Path, size_mib: int) -> Path:
    path = folder / f"fw-{size_mib}.zip"
    block = os.urandom(MIB)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("update.sh", "true\n")
        with archive.open("payload.bin", "w", force_zip64=True) as payload:
            for _ in range(size_mib):
                payload.write(block)
    return path


def measure(command: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of ``command``."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _pid, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{command[0]} failed")
    return elapsed, usage.ru_maxrss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="10,1024", help="release sizes in MiB")
    args = parser.parse_args()
    curl = shutil.which("curl")
    with tempfile.TemporaryDirectory(prefix="ota-bench-") as tmp:
        root = Path(tmp)
        results = []
        for size in (int(s) for s in args.sizes.split(",")):
            releases = root / f"releases-{size}"
            releases.mkdir()
            release = make_release(releases, size)
            port = free_port()
            server = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "connhex_edge_ota",
                    "--log-level",
                    "ERROR",
                    "serve",
                    str(releases),
                    "--port",
                    str(port),
                ],
                stdout=subprocess.DEVNULL,
            )
            url = f"http://127.0.0.1:{port}"
            try:
                time.sleep(1.0)
                ours = measure([sys.executable, "-c", CLIENT, url, str(root / f"opt-{size}")])
                base = (
                    measure(
                        [curl, "-sf", "-o", str(root / f"curl-{size}.zip"), f"{url}/iot/ota/bench"]
                    )
                    if curl
                    else (float("nan"), 0)
                )
            finally:
                server.terminate()
                server.wait()
            results.append((size, release.stat().st_size, ours, base))
            shutil.rmtree(releases)
        print(
            f"{'size':>8} {'ours s':>8} {'curl s':>8} {'time ratio':>10} "
            f"{'ours MiB/s':>10} {'ours peak RSS':>14} {'curl peak RSS':>14}"
        )
        for size, nbytes, (t, rss), (bt, brss) in results:
            print(
                f"{size:>5}MiB {t:>8.2f} {bt:>8.2f} {t / bt:>10.2f} {nbytes / MIB / t:>10.1f} "
                f"{rss / 1024:>11.1f}MiB {brss / 1024:>11.1f}MiB"
            )
        if len(results) > 1:
            small, large = results[0][2][1], results[-1][2][1]
            print(
                f"peak RSS growth from {results[0][0]} MiB to {results[-1][0]} MiB: "
                f"{(large - small) / 1024:+.1f} MiB ({large / small:.2f}x)"
            )


if __name__ == "__main__":
    main()
