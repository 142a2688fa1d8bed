"""A fleet of simulated agents on a virtual clock, scheduled by the real ``Schedule``.

Each agent runs the loop of ``connhex_edge_ota.loop``: first check ``Schedule.first()``
after start-up, then ``after_success()`` or ``after_failure()`` depending on whether
the server was up when it asked. Requests take no time. Two scenarios, each run with
this project's ``Schedule`` and with the schedule before issue 12 (interval plus
jitter after a success, no phase) side by side:

- steady: agents booted at random times over the hour before; after three hours the
  server is down for 10 minutes, then back;
- boot: the whole fleet boots within 5 s (a site's power comes back).

Printed per hour: the peak 10-s request rate over the hour's mean rate, and the
shortest gap between two failing requests of one agent. The last column,
"i.i.d. floor", is the same figure for 1,000 requests thrown uniformly at random
over the hour: what a perfectly spread fleet of independent devices shows.
Each figure is the median over 5 seeds (random boot times and jitter); 10,000 agents
are shown too, where the i.i.d. floor is lower. Usage:
``python bench/fleet.py [--agents 1000,10000] [--seeds 5]``.
"""

from __future__ import annotations

import argparse
import heapq
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from connhex_edge_ota.schedule import JITTER_SHARE, Schedule, phase_of

INTERVAL, JITTER, FLOOR, STARTUP = 3600.0, 60.0, 30.0, 5.0
BUCKET = 10.0
OUTAGE = (3 * INTERVAL, 3 * INTERVAL + 600.0)
"""The server is down from the fourth hour on, for 10 minutes."""
EPOCH = 1_800_000_000.0
"""Where the virtual wall clock starts: phases are computed on epoch-sized numbers."""


@dataclass
class OldSchedule:
    """The schedule before issue 12, kept here as the baseline."""

    interval: float
    jitter: float
    floor: float
    rng: random.Random = field(default_factory=random.Random)
    failures: int = 0

    def first(self) -> float:
        return 0.0

    def after_success(self) -> float:
        self.failures = 0
        return self.interval + self.rng.uniform(0, min(self.jitter, self.interval * JITTER_SHARE))

    def after_failure(self, retry_after: float | None = None, permanent: bool = False) -> float:
        self.failures += 1
        floor = min(self.floor, self.interval)
        ceiling = min(self.interval, floor * 2 ** min(self.failures, 32))
        return min(self.rng.uniform(floor, max(floor, ceiling)), self.interval)


class Clock:
    def __init__(self) -> None:
        self.now = EPOCH

    def __call__(self) -> float:
        return self.now


Maker = Callable[[int, Clock, random.Random], "Schedule | OldSchedule"]


def new_schedule(n: int, clock: Clock, rng: random.Random) -> Schedule:
    return Schedule(
        INTERVAL,
        JITTER,
        FLOOR,
        phase=phase_of(f"device-{n:05d}"),
        startup_delay=STARTUP,
        clock=clock,
        rng=random.Random(rng.random()),
    )


def old_schedule(n: int, clock: Clock, rng: random.Random) -> OldSchedule:
    return OldSchedule(INTERVAL, JITTER, FLOOR, rng=random.Random(rng.random()))


@dataclass
class Run:
    requests: list[float] = field(default_factory=list)
    """Seconds since the start of the simulation of every request."""
    shortest_failing_gap: float = float("inf")


def simulate(
    make: Maker, agents: int, boots: list[float], down: tuple[float, float], until: float, seed: int
) -> Run:
    """Every agent's requests until ``until``; the server refuses them during ``down``."""
    rng = random.Random(seed)
    clock = Clock()
    schedules = [make(n, clock, rng) for n in range(agents)]
    queue: list[tuple[float, int]] = []
    for n, (schedule, boot) in enumerate(zip(schedules, boots, strict=True)):
        heapq.heappush(queue, (boot + schedule.first(), n))
    last_failure: dict[int, float] = {}
    run = Run()
    while queue:
        at, n = heapq.heappop(queue)
        if at >= until:
            break
        clock.now = EPOCH + at
        run.requests.append(at)
        schedule = schedules[n]
        if down[0] <= at < down[1]:
            if n in last_failure:
                run.shortest_failing_gap = min(run.shortest_failing_gap, at - last_failure[n])
            last_failure[n] = at
            delay = schedule.after_failure()
        else:
            last_failure.pop(n, None)
            delay = schedule.after_success()
        heapq.heappush(queue, (at + delay, n))
    return run


def peak_to_mean(requests: list[float], start: float, length: float = INTERVAL) -> float:
    buckets = [0] * int(length / BUCKET)
    for at in requests:
        if start <= at < start + length:
            buckets[int((at - start) / BUCKET)] += 1
    mean = statistics.fmean(buckets)
    return max(buckets) / mean if mean else float("nan")


def iid_floor(agents: int, seed: int, trials: int = 20) -> float:
    """Median peak-to-mean of ``agents`` uniform random requests in one hour."""
    rng = random.Random(seed)
    return statistics.median(
        peak_to_mean([rng.uniform(0, INTERVAL) for _ in range(agents)], 0.0) for _ in range(trials)
    )


SCENARIOS = (
    (
        "steady fleet, server down 10 min",
        True,
        (
            ("before the outage", 2 * INTERVAL),
            ("1st after recovery", OUTAGE[1]),
            ("2nd after recovery", OUTAGE[1] + INTERVAL),
        ),
    ),
    (
        "fleet boots within 5 s",
        False,
        (
            ("1st after boot", 0.0),
            ("2nd after boot", INTERVAL),
            ("3rd after boot", 2 * INTERVAL),
        ),
    ),
)


def report(agents: int, seeds: list[int]) -> None:
    """Medians over ``seeds`` of every figure, before and now, for a fleet of ``agents``."""
    floor = iid_floor(agents, seeds[0])
    print(
        f"fleet of {agents} agents, interval {INTERVAL:.0f} s, jitter {JITTER:.0f} s, "
        f"retry_floor {FLOOR:.0f} s, startup_delay {STARTUP:.0f} s; peak-to-mean of 10-s "
        f"request buckets per hour, median of {len(seeds)} seeds"
    )
    print(
        f"  {'scenario':<34} {'hour':<20} {'before':>8} {'now':>8} {'now/before':>11} "
        f"{'i.i.d. floor':>13}"
    )
    gaps: list[tuple[float, float]] = []
    for name, outage, hours in SCENARIOS:
        until = max(start for _, start in hours) + INTERVAL
        down = OUTAGE if outage else (-1.0, -1.0)
        figures: dict[str, list[tuple[float, float]]] = {label: [] for label, _ in hours}
        for seed in seeds:
            rng = random.Random(seed)
            spread = INTERVAL if outage else 5.0  # steady: booted over the hour before
            boots = [rng.uniform(0, spread) for _ in range(agents)]
            before = simulate(old_schedule, agents, boots, down, until, seed)
            now = simulate(new_schedule, agents, boots, down, until, seed)
            for label, start in hours:
                figures[label].append(
                    (peak_to_mean(before.requests, start), peak_to_mean(now.requests, start))
                )
            if outage:
                gaps.append((before.shortest_failing_gap, now.shortest_failing_gap))
        for label, pairs in figures.items():
            old = statistics.median(p[0] for p in pairs)
            new = statistics.median(p[1] for p in pairs)
            print(
                f"  {name:<34} {label:<20} {old:>8.2f} {new:>8.2f} {new / old:>11.2f} "
                f"{floor:>13.2f}"
            )
    print(
        f"  shortest gap between two failing requests of one agent (all seeds): "
        f"before {min(g[0] for g in gaps):.1f} s, now {min(g[1] for g in gaps):.1f} s "
        f"(retry_floor {FLOOR:.0f} s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--agents", default="1000,10000", help="fleet sizes")
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    for agents in (int(a) for a in args.agents.split(",")):
        report(agents, list(range(1, args.seeds + 1)))


if __name__ == "__main__":
    main()
