"""When to check next: the interval with a little jitter, or capped backoff after failures."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

JITTER_SHARE = 0.1
"""Jitter never exceeds this share of the check interval."""


@dataclass
class Schedule:
    """Delays between checks for one device.

    After a success: ``interval`` plus a random jitter of at most
    ``min(jitter, interval / 10)``, so a fleet started together spreads out.
    After the n-th failure in a row: a uniform draw in
    ``[floor, min(interval, floor * 2**n)]`` (full jitter above a floor), at
    least the server's ``Retry-After``, and never more than ``interval``.
    Failures retrying cannot fix (401, 403, 404) wait the whole interval.
    """

    interval: float
    jitter: float
    floor: float
    rng: random.Random = field(default_factory=random.Random)
    failures: int = 0

    def after_success(self) -> float:
        self.failures = 0
        return self.interval + self.rng.uniform(0, min(self.jitter, self.interval * JITTER_SHARE))

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
