"""``max_download_rate`` measured against a real server, for full and delta downloads.

The server side is what a metered link sees: the release server's connections get a
small send buffer (``Faults.send_buffer``) so that what it counts as sent is what left
for the device, not what its kernel swallowed. A sampler thread reads the server's
counters every 10 ms (a measurement, not a synchronisation: the download call itself
is what the test waits on).
"""

from __future__ import annotations

import random
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from connhex_edge_ota.client import Pace, paced, receive_window
from connhex_edge_ota.server import ReleaseServer
from tests.test_delta import Device, build

KIB = 1024
RATE = 64 * KIB


def worst_second(samples: list[tuple[float, int]]) -> int:
    """The most bytes any one-second window of ``(time, bytes so far)`` samples holds."""
    worst, j = 0, 0
    for i, (start, before) in enumerate(samples):
        j = max(j, i)
        while j + 1 < len(samples) and samples[j + 1][0] - start <= 1.0:
            j += 1
        worst = max(worst, samples[j][1] - before)
    return worst


@contextmanager
def server_samples(server: ReleaseServer) -> Iterator[list[tuple[float, int]]]:
    """(time, bytes the server has sent in GET bodies) every 10 ms while in the block."""
    samples: list[tuple[float, int]] = []
    done = threading.Event()

    def sample() -> None:
        while True:
            sent = sum(r.sent for r in list(server.releases.requests) if r.method == "GET")
            samples.append((time.monotonic(), sent))
            if done.wait(0.01):
                return

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        done.set()
        thread.join()
        sent = sum(r.sent for r in server.releases.requests if r.method == "GET")
        samples.append((time.monotonic(), sent))


def timed_progress(device: Device) -> list[tuple[float, int]]:
    """Client-side (time, bytes fetched) at every progress call of ``device``."""
    stamps: list[tuple[float, int]] = [(time.monotonic(), 0)]

    def record(done_total: tuple[int, int]) -> None:
        stamps.append((time.monotonic(), done_total[0]))

    device.progress = _Recorder(record)
    return stamps


class _Recorder(list[tuple[int, int]]):
    def __init__(self, record: Callable[[tuple[int, int]], None]) -> None:
        super().__init__()
        self.record = record

    def append(self, item: tuple[int, int]) -> None:
        self.record(item)
        super().append(item)


def check_smooth(samples: list[tuple[float, int]], stamps: list[tuple[float, int]]) -> None:
    total = samples[-1][1]
    took = stamps[-1][0] - stamps[0][0]
    assert took >= 0.9 * total / RATE, f"{total} bytes in {took:.2f}s at a cap of {RATE}/s"
    client = worst_second(stamps)
    server = worst_second(samples)
    assert client <= 1.25 * RATE, f"client read {client} bytes in one second (cap {RATE})"
    assert server <= 1.25 * RATE, f"the server sent {server} bytes in one second (cap {RATE})"


@pytest.fixture
def capped_server(release_server: ReleaseServer) -> ReleaseServer:
    release_server.faults.send_buffer = 4096
    return release_server


def test_full_download_keeps_to_the_cap(tmp_path: Path, capped_server: ReleaseServer) -> None:
    """256 KiB at 64 KiB/s: at least ~4 s, and no second in which the server sent (or the
    client read) more than 1.25x the cap; without the small receive window the kernel
    takes the first 128 KiB at once (2x in the first second)."""
    path = tmp_path / "fw-2.0.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("payload.bin", random.Random(1).randbytes(4 * RATE))
    capped_server.releases.publish(path)
    device = Device(tmp_path, capped_server.url, max_download_rate=RATE)
    release = device.offer()
    stamps = timed_progress(device)
    with server_samples(capped_server) as samples:
        transfer = device.download(release)
    assert transfer.how == "full"
    assert release.path.read_bytes() == path.read_bytes()
    check_smooth(samples, stamps)


def test_delta_keeps_to_the_cap_across_its_requests(
    tmp_path: Path, capped_server: ReleaseServer
) -> None:
    """A delta of seven changed members makes eight requests; one clock paces them all."""
    changed = {1, 3, 5, 7, 9, 11, 13}
    old = build(tmp_path / "old.zip", count=16, size=32 * KIB, compression=zipfile.ZIP_STORED)
    new = build(
        tmp_path / "fw-2.0.zip",
        changed=changed,
        count=16,
        size=32 * KIB,
        compression=zipfile.ZIP_STORED,
    )
    capped_server.releases.publish(new)
    device = Device(tmp_path, capped_server.url, max_download_rate=RATE).installed(old)
    release = device.offer()
    stamps = timed_progress(device)
    with server_samples(capped_server) as samples:
        transfer = device.download(release)
    assert transfer.how == "delta"
    assert release.path.read_bytes() == new.read_bytes()
    assert len([r for r in capped_server.releases.requests if r.method == "GET"]) == 8
    check_smooth(samples, stamps)


def test_one_clock_paces_many_short_responses() -> None:
    """Twenty responses of a tenth of a second's worth each, through one Pace: two seconds,
    whereas a clock per response would let each start with a free piece."""
    rate = 100 * KIB
    pace = Pace(rate)
    began = time.monotonic()
    for _ in range(20):
        for _piece in paced([bytes(rate // 10)], rate, pace):
            pass
    assert time.monotonic() - began >= 1.9


def test_receive_window_is_an_eighth_of_a_second_and_bounded() -> None:
    assert receive_window(0) == 0
    assert receive_window(1000) == 4096
    assert receive_window(RATE) == RATE // 8
    assert receive_window(10**12) == 4 * 1024 * 1024
