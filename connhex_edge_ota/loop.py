"""When the update steps run: first right after startup, then on schedule, with operator
steps queued in between and heartbeats throughout."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from connhex_edge_ota.schedule import Schedule
from connhex_edge_ota.service import OtaService, Result

log = logging.getLogger(__name__)


@dataclass
class Job:
    """An operator's step, queued behind whatever step runs now."""

    verb: str
    done: asyncio.Future[Result] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class UpdateLoop:
    """Runs one service's steps one at a time, on schedule or on request."""

    def __init__(self, service: OtaService) -> None:
        self.service = service
        settings = service.settings
        self.schedule = Schedule(
            settings.check_interval, settings.check_jitter, settings.retry_floor
        )
        self._jobs: asyncio.Queue[Job] = asyncio.Queue()

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

    def submit(self, verb: str) -> Job:
        """Queue an operator's step; its result arrives on ``job.done``."""
        job = Job(verb)
        self._jobs.put_nowait(job)
        return job

    async def _run_job(self, job: Job) -> None:
        result = await self.service.operator_step(job.verb)
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
        next_round = time.monotonic()
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
