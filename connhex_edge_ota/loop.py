"""When the update steps run: first right after startup, then on schedule, with operator
steps queued in between and heartbeats throughout."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from connhex_edge_ota.schedule import Schedule
from connhex_edge_ota.service import OtaService, Result

log = logging.getLogger(__name__)


MAX_QUEUED = 8
"""Operator steps waiting at most; beyond that a request is answered "busy"."""


@dataclass
class Job:
    """An operator's step, queued behind whatever step runs now."""

    verb: str
    options: dict[str, Any] = field(default_factory=dict)
    done: asyncio.Future[Result] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    @property
    def key(self) -> str:
        """Requests with the same key are the same step: they share one run."""
        return json.dumps([self.verb, self.options], sort_keys=True)


class UpdateLoop:
    """Runs one service's steps one at a time, on schedule or on request."""

    def __init__(self, service: OtaService, max_queued: int = MAX_QUEUED) -> None:
        self.service = service
        self.max_queued = max_queued
        settings = service.settings
        self.schedule = Schedule.for_device(settings)
        self._jobs: asyncio.Queue[Job] = asyncio.Queue(maxsize=max_queued)
        self._pending: dict[str, Job] = {}
        """Queued and running jobs by key, for requests that join them."""

    async def cycle(self) -> float:
        """One automatic round; the delay before the next one, from what each step returned."""
        service = self.service
        result = await service.check()
        if result and service.wants_download():
            result = await service.download()
        if result and service.wants_install():
            result = await service.install()
        failure = result.failure
        if failure is None:
            return self.schedule.after_success()
        return self.schedule.after_failure(failure.retry_after, failure.permanent)

    def submit(self, verb: str, options: dict[str, Any] | None = None) -> Job | None:
        """Queue an operator's step; its result arrives on ``job.done``.

        The same step already queued or running is joined instead (its job is
        returned); ``None`` when ``max_queued`` steps wait already.
        """
        job = Job(verb, options or {})
        joined = self._pending.get(job.key)
        if joined is not None:
            return joined
        try:
            self._jobs.put_nowait(job)
        except asyncio.QueueFull:
            return None
        self._pending[job.key] = job
        return job

    async def _run_job(self, job: Job) -> None:
        try:
            result = await self.service.operator_step(job.verb)
        finally:
            if self._pending.get(job.key) is job:
                del self._pending[job.key]
        if not job.done.done():
            job.done.set_result(result)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set: recover, then check on schedule and run queued steps."""
        beats = asyncio.create_task(self._heartbeats(stop), name="ota-heartbeat")
        worker = asyncio.create_task(self._work(), name="ota-loop")
        try:
            await stop.wait()
        finally:
            self.service.cancel_transfer()
            for task in (worker, beats):
                task.cancel()
            await asyncio.gather(worker, beats, return_exceptions=True)
            try:  # plugins see the last status (or are abandoned after hook_timeout)
                await self.service.drain_hooks()
            finally:
                self.service.close()

    async def _heartbeats(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(self.service.settings.heartbeat_interval)
            if self.service.state.status:
                await self.service.heartbeat()

    async def _work(self) -> None:
        await self.service.recover()  # never raises: a failure is reported as a status
        next_round = time.monotonic() + self.schedule.first()
        while True:
            try:
                job = await asyncio.wait_for(
                    self._jobs.get(), max(0.0, next_round - time.monotonic())
                )
            except TimeoutError:
                try:
                    delay = await self.cycle()
                except Exception:
                    log.exception("update round failed")
                    delay = self.schedule.after_failure()
                log.debug("next check in %.1fs", delay)
                next_round = time.monotonic() + delay
                continue
            await self._run_job(job)
