"""Zip deltas against a full download of the same release, in the same run.

nginx (else the project's release server, and the output says so) serves each new
release; the client (``client.Server.download``, as the service calls it) fetches it
once with ``delta = "off"`` and once with the old release as ``installed.zip``:

- 200 MiB of 20 members of 10 MiB, one changed: bytes (goal: at most 12 % of a full
  download) and time, unlimited and with ``max_download_rate`` = 10 MiB/s (goal:
  faster than the full download);
- the same where every member changed: bytes (goal: at most 1 % over a full download;
  the 70 % rule makes it a full download plus the first probe);
- 2,000 small files (4 to 28 KiB) where 20 changed: requests and bytes.

Usage: ``python bench/delta.py [--size-mib 200]``. Takes about a minute and a half,
most of it the two capped 200 MiB transfers.
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import shutil
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import requests
from common import MIB, endpoint

from connhex_edge_ota import delta
from connhex_edge_ota.client import Server
from connhex_edge_ota.config import load_settings
from connhex_edge_ota.state import Journal, Partial
from connhex_edge_ota.store import Store


def write_release(path: Path, members: list[tuple[str, int, int]]) -> Path:
    """A stored zip of ``(name, size, seed)`` members with reproducible random bytes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("update.sh", "true\n")
        for name, size, seed in members:
            rng = random.Random(seed)
            with archive.open(name, "w", force_zip64=size >= 2**31) as out:
                left = size
                while left:
                    block = min(left, 4 * MIB)
                    out.write(rng.randbytes(block))
                    left -= block
    return path


@dataclass(frozen=True)
class Run:
    how: str
    fetched: int
    requests: int
    seconds: float
    fallback: str


def fetch(url: str, root: Path, base: Path | None, rate: int = 0) -> Run:
    """One download of the release at ``url`` into a fresh store under ``root``."""
    shutil.rmtree(root, ignore_errors=True)
    settings = load_settings(
        None,
        server_url=url,
        init_id="bench",
        install_dir=str(root),
        free_space_margin=0,
        delta="auto" if base is not None else "off",
        max_download_rate=rate,
    )
    store = Store(settings.store_dir)
    store.create()
    if base is not None:
        os.link(base, store.installed_zip)  # no copy: the device already has it
    server = Server(settings)
    counted = [0]

    def count(response: requests.Response, *args: object, **kwargs: object) -> None:
        if response.request.method == "GET":
            counted[0] += 1

    server.session.hooks["response"].append(count)
    offer = server.check("")
    assert offer is not None
    journal = Journal(store)
    journal.take_offer(offer)
    release = journal.release()
    assert release is not None
    partial = Partial(
        version=release.version, etag=release.etag, digest=release.digest, size=release.size
    )
    began = time.monotonic()
    transfer = server.download(
        release,
        partial,
        lambda _p: None,
        lambda _d, _t: None,
        threading.Event(),
        base and store.installed_zip,
    )
    seconds = time.monotonic() - began
    server.close()
    return Run(transfer.how, transfer.fetched, counted[0], seconds, transfer.fallback)


def share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.2f} %"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=200)
    parser.add_argument("--cap-mib", type=int, default=10, help="max_download_rate, MiB/s")
    args = parser.parse_args()
    member = args.size_mib * MIB // 20
    with tempfile.TemporaryDirectory(prefix="ota-bench-delta-") as tmp:
        folder = Path(tmp)
        names = [f"payload/part{i:02d}.bin" for i in range(20)]
        old = write_release(folder / "old.zip", [(n, member, i) for i, n in enumerate(names)])
        one = write_release(
            folder / "one.zip",
            [(n, member, i + (100 if i == 7 else 0)) for i, n in enumerate(names)],
        )
        every = write_release(
            folder / "all.zip", [(n, member, i + 100) for i, n in enumerate(names)]
        )
        small_names = [f"files/f{i:04d}.dat" for i in range(2000)]
        sizes = [random.Random(i).randrange(4096, 28 * 1024) for i in range(2000)]
        changed = set(random.Random(7).sample(range(2000), 20))
        small_old = write_release(
            folder / "small-old.zip",
            [(n, s, i) for i, (n, s) in enumerate(zip(small_names, sizes, strict=True))],
        )
        small_new = write_release(
            folder / "small-new.zip",
            [
                (n, s, i + (10_000 if i in changed else 0))
                for i, (n, s) in enumerate(zip(small_names, sizes, strict=True))
            ],
        )
        cap = args.cap_mib * MIB
        for label, new, base, rates, fetched_headers in (
            (f"{args.size_mib} MiB, 1 of 20 members changed", one, old, (0, cap), False),
            (f"{args.size_mib} MiB, every member changed", every, old, (0,), False),
            ("2,000 small files, 20 changed", small_new, small_old, (0,), True),
        ):
            size = new.stat().st_size
            with endpoint(new, "2.0") as (url, which):
                for rate in rates:
                    full = fetch(url, folder / "device", None, rate)
                    part = fetch(url, folder / "device", base, rate)
                    limit = f"capped at {rate // MIB} MiB/s" if rate else "no cap"
                    lines = [
                        f"{label}, {limit} ({which}): release {size / MIB:.1f} MiB",
                        f"  full:  {full.fetched / MIB:9.2f} MiB in {full.requests:4d} requests, "
                        f"{full.seconds:6.2f} s",
                        f"  delta: {part.fetched / MIB:9.2f} MiB in {part.requests:4d} requests, "
                        f"{part.seconds:6.2f} s ({part.how}"
                        f"{'; ' + part.fallback if part.fallback else ''})",
                    ]
                    if fetched_headers:  # A/B: every local header fetched, none rebuilt
                        real = delta.plan
                        delta.plan = functools.partial(real, guess=False)
                        try:
                            ab = fetch(url, folder / "device", base, rate)
                        finally:
                            delta.plan = real
                        lines.append(
                            f"  delta, local headers fetched (before): {ab.fetched / MIB:.2f} MiB "
                            f"in {ab.requests} requests, {ab.seconds:.2f} s"
                        )
                    lines.append(
                        f"  bytes {share(part.fetched, full.fetched)} of full "
                        f"({part.fetched - full.fetched:+d} bytes), "
                        f"time {part.seconds / full.seconds:.2f}x"
                    )
                    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
