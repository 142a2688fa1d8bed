"""When the update steps run: first right after startup, then on schedule, with operator
steps queued in between and heartbeats throughout."""

from __future__ import annotations

import asyncio
import contextlib
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
        self.schedule = Schedule.for_device(settings)
        self._jobs: asyncio.Queue[Job] = asyncio.Queue()

    async def cycle(self) -> float:
        """One automatic round; the delay before the next one."""
        service = self.service
        service.last_failure = None
        await service.check()
        offer = service.state.offer
        wanted = service.settings.downloads_enabled and service.last_failure is None
        if offer is not None and wanted and not service.gave_up_on(offer.version):
            if not service.state.ready:
                await service.download()
            if service.state.ready and service.settings.auto_install:
                await service.install()
        failure = service.last_failure
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
        hooks = asyncio.create_task(self.service.deliver_status_hooks(), name="ota-status-hooks")
        beats = asyncio.create_task(self._heartbeats(stop), name="ota-heartbeat")
        worker = asyncio.create_task(self._work(), name="ota-loop")
        try:
            await stop.wait()
        finally:
            self.service.cancel_transfer()
            for task in (worker, beats):
                task.cancel()
            await asyncio.gather(worker, beats, return_exceptions=True)
            # Give status hooks a moment to see the last status, then stop them.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.service.status_hooks_idle(), 1.0)
            hooks.cancel()
            await asyncio.gather(hooks, return_exceptions=True)
            self.service.close()

    async def _heartbeats(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(self.service.settings.heartbeat_interval)
            if self.service.state.status:
                await self.service.heartbeat()

    async def _work(self) -> None:
        await self.service.recover()
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
