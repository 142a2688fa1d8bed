"""When to check next: each device at its own stable phase of the interval; backoff on failure."""

from __future__ import annotations

import hashlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from connhex_edge_ota.config import OtaSettings

JITTER_SHARE = 0.1
"""Jitter never exceeds this share of the check interval."""

_PHASE_SALT = b"connhex-edge-ota/check-phase\0"


def phase_of(init_id: str) -> float:
    """The device's stable fraction of the check interval, in [0, 1).

    The first 64 bits of SHA-256 over a fixed salt and ``init_id``: the same on
    every start of the same device, uniformly spread over a fleet, and not
    something a device can drift out of (systemd's ``FixedRandomDelay=true``).
    """
    digest = hashlib.sha256(_PHASE_SALT + init_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass
class Schedule:
    """Delays between checks for one device.

    The device's moments are ``phase * interval + k * interval`` seconds since
    the Unix epoch (wall clock), for every whole ``k``: with ``phase`` from
    :func:`phase_of`, a fleet's checks are spread evenly over the interval
    whenever its devices booted and however long the server was down.

    - The first check comes ``phase * startup_delay`` after start-up (at most
      ``interval``), so a fleet that powers up together spreads over that window.
    - After a success: the device's next moment at least ``min(floor, interval / 2)``
      away, plus a random jitter of at most ``min(jitter, interval / 10)``. A device
      always returns to its own phase, so neither a reboot nor an outage lines a
      fleet up.
    - After the n-th failure in a row: a uniform draw in
      ``[floor, min(interval, floor * 2**n)]`` (full jitter above a floor), at
      least the server's ``Retry-After``, and never more than ``interval``.
      Failures retrying cannot fix (401, 403, 404) wait the whole interval.
    """

    interval: float
    jitter: float
    floor: float
    phase: float = 0.0
    startup_delay: float = 0.0
    clock: Callable[[], float] = time.time
    rng: random.Random = field(default_factory=random.Random)
    failures: int = 0

    @classmethod
    def for_device(cls, settings: OtaSettings) -> Schedule:
        """The schedule ``settings`` ask for, at the phase of the device's ``init_id``."""
        return cls(
            settings.check_interval,
            settings.check_jitter,
            settings.retry_floor,
            phase=phase_of(settings.init_id),
            startup_delay=settings.startup_delay,
        )

    def first(self) -> float:
        """The delay from start-up to the first check."""
        return min(self.phase * self.startup_delay, self.interval)

    def next_moment(self, after: float) -> float:
        """The device's first moment strictly after ``after`` (wall-clock seconds)."""
        offset = self.phase * self.interval
        moment = offset + (math.floor((after - offset) / self.interval) + 1) * self.interval
        # Float rounding on epoch-sized numbers can land a hair early.
        return moment if moment > after else moment + self.interval

    def after_success(self) -> float:
        self.failures = 0
        now = self.clock()
        gap = min(self.floor, self.interval / 2)
        jitter = self.rng.uniform(0, min(self.jitter, self.interval * JITTER_SHARE))
        return self.next_moment(now + gap) - now + jitter

    def after_failure(self, retry_after: float | None = None, permanent: bool = False) -> float:
        if permanent:
            self.failures = 0
            return self.interval
        self.failures += 1
        floor = min(self.floor, self.interval)
        ceiling = min(self.interval, floor * 2 ** min(self.failures, 32))
        delay = self.rng.uniform(floor, max(floor, ceiling))
        if retry_after is not None:
            delay = max(delay, retry_after)
        return min(delay, self.interval)
