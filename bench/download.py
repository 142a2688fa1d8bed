"""Download + verify of a release from nginx emulating the device endpoint, against curl.

nginx serves one zip at ``/iot/ota/<id>`` with the headers of the device API
(``Version``, ``Content-Digest``, its own ``ETag`` and ``Range``). Measured as whole
processes, medians of ``BENCH_RUNS`` (3): the OTA client's ``Server.check`` +
``Server.download`` (HEAD, streaming GET with ``If-Match``, hashing, fsync
checkpoints, size and digest verified, atomic rename) in a fresh Python, and
``curl -s -o`` of the same URL (no verification, no fsync), then ``curl`` followed by
``sync`` (the file durable, as the agent's is) and by ``sha256sum`` (verified).
Prints wall, CPU, peak RSS and the ratios; the commands run in turns, each run once per round.
Falls back to the project's own release server when nginx cannot be installed (and says so).
Usage: ``python bench/download.py [--size-mib 1024]``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from common import MIB, RUNS, Usage, endpoint, ensure, interleaved, make_release, measure, ratio

CLIENT = """
import sys, threading
from connhex_edge_ota.client import Server
from connhex_edge_ota.config import load_settings
from connhex_edge_ota.state import Journal, Partial
from connhex_edge_ota.store import Store

url, install_dir = sys.argv[1], sys.argv[2]
settings = load_settings(None, server_url=url, init_id="bench", install_dir=install_dir,
                         free_space_margin=0)
store = Store(settings.store_dir)
store.create()
server = Server(settings)
journal = Journal(store)
journal.take_offer(server.check(""))
release = journal.release()
partial = Partial(version=release.version, etag=release.etag, digest=release.digest,
                  size=release.size)
server.download(release, partial, lambda p: None, lambda n, t: None, threading.Event())
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=int, default=1024)
    args = parser.parse_args()
    curl = ensure("curl", "curl")
    with tempfile.TemporaryDirectory(prefix="ota-bench-dl-", dir="/var/tmp") as tmp:
        root = Path(tmp)
        releases = root / "releases"
        releases.mkdir()
        release = make_release(releases, args.size_mib)
        with endpoint(release, "2.0.0") as (url, served_by):

            def ours() -> Usage:
                shutil.rmtree(root / "opt", ignore_errors=True)
                return measure([sys.executable, "-c", CLIENT, url, str(root / "opt")])

            def plain_curl() -> Usage:
                assert curl
                return measure([curl, "-s", "-o", str(root / "curl.zip"), f"{url}/iot/ota/b"])

            def curl_then(command: str) -> Usage:
                script = f'{curl} -s -o "$1" "$2" && {command} "$1" >/dev/null'
                return measure(
                    ["sh", "-c", script, "sh", str(root / "curl.zip"), f"{url}/iot/ota/b"]
                )

            contenders = {"ours": ours}
            if curl:
                contenders["curl"] = plain_curl
                contenders["sync"] = lambda: curl_then("sync")
                contenders["sha256sum"] = lambda: curl_then("sha256sum")
            results = interleaved(contenders)
            mine = results["ours"]
            base, durable, base_sha = (results.get(k) for k in ("curl", "sync", "sha256sum"))
    size = release_size = args.size_mib
    print(f"download + verify {size} MiB from {served_by}, median of {RUNS}:")
    print(f"  {'':<28} {'wall s':>8} {'CPU s':>8} {'peak RSS MiB':>13} {'MiB/s':>8}")
    rows = [
        ("connhex-edge-ota", mine),
        ("curl -s -o", base),
        ("curl -s -o + sync", durable),
        ("curl -s -o + sha256sum", base_sha),
    ]
    for name, usage in rows:
        if usage is not None:
            print(
                f"  {name:<28} {usage.wall:>8.2f} {usage.cpu:>8.2f} {usage.rss:>13.1f} "
                f"{release_size / usage.wall:>8.0f}"
            )
    if base is not None and base_sha is not None and durable is not None:
        print(
            f"  ratio of wall time: {ratio(mine.wall, base.wall)} curl -s -o (goal 1.0x), "
            f"{ratio(mine.wall, durable.wall)} curl + sync (what is on disk for sure), "
            f"{ratio(mine.wall, base_sha.wall)} curl + sha256sum; "
            f"peak RSS {ratio(mine.rss, base.rss)} curl's"
        )
    print(f"  (release of {size * MIB} bytes)")


if __name__ == "__main__":
    main()
