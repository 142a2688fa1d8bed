"""The update steps: check, download, install (and recover), each reported as a status.

:mod:`connhex_edge_ota.loop` decides when they run. Blocking work (HTTP,
unpacking, plugin hooks) runs in threads, so heartbeats and commands keep
flowing meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pluggy

from connhex_edge_ota.calls import in_thread, notify, vetoes
from connhex_edge_ota.client import ReleaseChanged, Server, ServerError
from connhex_edge_ota.config import OtaSettings
from connhex_edge_ota.constraints import refusal
from connhex_edge_ota.installer import Installer, Outcome
from connhex_edge_ota.release import Release
from connhex_edge_ota.status import Status, StatusName, rfc3339_now, short_error
from connhex_edge_ota.store import Failure, Offer, Partial, State, Store

log = logging.getLogger(__name__)

Reporter = Callable[[Status], Awaitable[None]]
ProgressPrinter = Callable[[int, int], None]


@dataclass
class Result:
    """What a step achieved, as a command reply."""

    ok: bool
    error: str = ""

    def __bool__(self) -> bool:
        return self.ok


class OtaService:
    """One device's update loop over one store."""

    def __init__(
        self,
        settings: OtaSettings,
        pm: pluggy.PluginManager,
        store: Store,
        reporters: list[Reporter] | None = None,
        on_restart: Callable[[str], Awaitable[None]] | None = None,
        progress_printer: ProgressPrinter | None = None,
    ) -> None:
        self.settings = settings
        self.pm = pm
        self.store = store
        self.server = Server(settings)
        self.installer = Installer(settings, store)
        self.reporters = list(reporters or [])
        self.on_restart = on_restart
        self.progress_printer = progress_printer
        self.state = State()
        self._cancel = threading.Event()
        self._hook_queue: asyncio.Queue[Status] = asyncio.Queue(maxsize=100)
        self._notice = ""
        """Something to report once, with the first status (e.g. a corrupt state.json)."""
        self.last_failure: ServerError | None = None
        """The server's last failure in this round (it sets the delay before the next)."""

    # state and statuses

    def open(self) -> None:
        """Load the persisted state (a corrupt file is set aside and reported)."""
        self.store.create()
        self.state, warning = self.store.load()
        if warning:
            log.warning("%s", warning)
            self._notice = warning
        if not self.state.current_version and self.settings.initial_version:
            self.state.current_version = self.settings.initial_version

    def status(self) -> Status:
        s = self.state
        return Status(s.current_version, s.latest_version, s.status, s.error, s.last_checked)

    def _save(self) -> None:
        """Persist the state; a full or failing disk is logged and reported, never fatal.

        The device then keeps working from memory, and the next save retries.
        """
        try:
            self.store.save(self.state)
        except OSError as exc:
            log.warning("state.json not saved: %s", exc.strerror or exc)

    async def _report(self, status: StatusName, error: str = "") -> None:
        """Record and publish a status change (state.json first: it must never lag behind)."""
        self.state.status = status.value
        self.state.error = short_error(error)
        await in_thread(self._save)
        await self._publish(self.status())

    async def _publish(self, status: Status) -> None:
        for reporter in self.reporters:
            try:
                await reporter(status)
            except Exception:
                log.exception("status reporter failed")
        with contextlib.suppress(asyncio.QueueFull):  # a stuck plugin loses heartbeats, not us
            self._hook_queue.put_nowait(status)

    async def heartbeat(self) -> None:
        await self._publish(self.status())

    async def deliver_status_hooks(self) -> None:
        """Call ``ota_on_status`` for each status, in order, until cancelled."""
        while True:
            status = await self._hook_queue.get()
            await notify(self.pm, "ota_on_status", self.settings.hook_timeout, status=status)

    async def status_hooks_idle(self) -> None:
        while not self._hook_queue.empty():
            await asyncio.sleep(0.05)

    def cancel_transfer(self) -> None:
        """Make a running download stop at its next chunk (it resumes later)."""
        self._cancel.set()

    def close(self) -> None:
        self.server.close()

    # steps

    def _release(self) -> Release | None:
        return self.store.release(self.state.offer) if self.state.offer else None

    def gave_up_on(self, version: str) -> bool:
        failure = self.state.failures.get(version)
        return failure is not None and failure.attempts >= self.settings.max_install_attempts

    async def check(self) -> Result:
        notice, self._notice = self._notice, ""
        await self._report(StatusName.CHECKING, notice)
        try:
            offer = await in_thread(self.server.check, self.state.current_version)
        except ServerError as exc:
            self.last_failure = exc
            await self._report(StatusName.CHECK_FAILED, str(exc))
            return Result(False, str(exc))
        self.last_failure = None
        self.state.last_checked = rfc3339_now()
        if offer is None or offer.version == self.state.current_version:
            self.state.latest_version = self.state.current_version
            self._forget_offer()
            await self._report(StatusName.UPDATED)
            return Result(True)
        self._take_offer(offer)
        if await self._constrained(self.store.release(offer)) is None:
            await self._report_offer()
        return Result(True)

    async def _constrained(self, release: Release) -> Result | None:
        """A refusal when the server's Min-/Max-Version exclude the running version, else None.

        Such a release is neither downloaded nor installed: ``update_available``
        with the constraint as ``error``.
        """
        reason = refusal(
            release.version, self.state.current_version, release.min_version, release.max_version
        )
        if not reason:
            return None
        if (self.state.status, self.state.error) != (StatusName.UPDATE_AVAILABLE, reason):
            await self._report(StatusName.UPDATE_AVAILABLE, reason)
        return Result(False, reason)

    def _forget_offer(self) -> None:
        self.state.offer = None
        self.state.ready = False
        self.state.partial = None
        self.store.prune_downloads(keep=None)

    def _take_offer(self, offer: Offer) -> None:
        self.state.latest_version = offer.version
        if self.state.offer != offer:
            # A different release (or the same version rebuilt): old files are useless.
            self.state.offer = offer
            self.state.ready = False
            if self.state.partial and (
                self.state.partial.version,
                self.state.partial.etag,
                self.state.partial.digest,
            ) != (offer.version, offer.etag, offer.digest):
                self.state.partial = None
            self.store.prune_downloads(keep=offer.version if self.state.partial else None)
        if self.state.ready and not self.store.zip_path(offer.version).is_file():
            self.state.ready = False

    async def _report_offer(self) -> None:
        offer = self.state.offer
        assert offer is not None
        if self.gave_up_on(offer.version):
            failure = self.state.failures[offer.version]
            await self._report(
                StatusName.UPDATE_FAILED,
                f"{failure.error} ({offer.version} failed {failure.attempts} time(s); waiting "
                "for another release or an operator's install)",
            )
        elif self.state.ready:
            await self._report(StatusName.UPDATE_READY)
        else:
            await self._report(StatusName.UPDATE_AVAILABLE)

    async def download(self, operator: bool = False) -> Result:
        """Fetch the offered release; an operator's download checks first when needed.

        A release that changed on the server since the check (412) is checked
        again at once, and the new one fetched, a single time.
        """
        if operator and self.state.offer is None:
            checked = await self.check()
            if not checked:
                return checked
        fetched = await self._fetch()
        if not isinstance(self.last_failure, ReleaseChanged):
            return fetched
        checked = await self.check()
        if not checked or self.state.offer is None:
            return checked
        if self.gave_up_on(self.state.offer.version):
            return Result(False, f"{self.state.offer.version} failed before")
        return await self._fetch()

    async def _fetch(self) -> Result:
        release = self._release()
        if release is None:
            return Result(False, "no update to download")
        if (refused := await self._constrained(release)) is not None:
            return refused
        if self.state.ready:
            return Result(True)
        found = await vetoes(
            self.pm, "ota_pre_download", self.settings.hook_timeout, release=release
        )
        if found:
            error = "download vetoed by " + "; ".join(found)
            await self._report(StatusName.UPDATE_AVAILABLE, error)
            return Result(False, error)
        partial = self.state.partial or Partial(
            version=release.version, etag=release.etag, digest=release.digest, size=release.size
        )
        self.state.partial = partial
        await self._report(StatusName.DOWNLOADING)
        self._cancel.clear()
        try:
            await in_thread(
                self.server.download,
                release,
                partial,
                self._save_partial,
                self._progress_sink(release),
                self._cancel,
            )
        except ServerError as exc:
            return await self._download_failed(exc)
        except OSError as exc:  # the store itself (e.g. reading a partial file back)
            return await self._download_failed(
                ServerError(f"download failed: {exc.strerror or exc}")
            )
        self.last_failure = None
        self.state.partial = None
        self.state.ready = True
        await self._notify_progress(release, release.size)
        await self._report(StatusName.UPDATE_READY)
        return Result(True)

    async def _download_failed(self, failure: ServerError) -> Result:
        self.last_failure = failure
        if failure.partial_dropped:
            self.state.partial = None
        await self._report(StatusName.DOWNLOAD_FAILED, failure.message)
        return Result(False, failure.message)

    def _save_partial(self, partial: Partial) -> None:
        # Called from the download thread: the state object is only read
        # concurrently by heartbeats, which never look at `partial`.
        self.state.partial = partial
        self._save()

    def _progress_sink(self, release: Release) -> Callable[[int], None]:
        """A callback for the download thread, rate-limited to ``progress_rate`` per second."""
        loop = asyncio.get_running_loop()
        period = 1.0 / self.settings.progress_rate
        last = [0.0]

        def sink(downloaded: int) -> None:
            now = time.monotonic()
            if now - last[0] >= period:
                last[0] = now
                loop.call_soon_threadsafe(
                    lambda: asyncio.ensure_future(self._notify_progress(release, downloaded))
                )

        return sink

    async def _notify_progress(self, release: Release, downloaded: int) -> None:
        if self.progress_printer is not None:
            self.progress_printer(downloaded, release.size)
        await notify(
            self.pm,
            "ota_on_progress",
            self.settings.hook_timeout,
            release=release,
            downloaded=downloaded,
            total=release.size,
        )

    async def install(self, operator: bool = False) -> Result:
        if operator and self.state.offer is None:
            checked = await self.check()
            if not checked:
                return checked
        release = self._release()
        if release is None:
            return Result(False, "no update to install")
        if (refused := await self._constrained(release)) is not None:
            return refused
        if not operator and self.gave_up_on(release.version):
            return Result(False, f"{release.version} failed before; not retried automatically")
        if not self.state.ready:
            fetched = await self.download()
            if not fetched:
                return fetched
        found = await vetoes(
            self.pm, "ota_pre_install", self.settings.hook_timeout, release=release
        )
        if found:
            error = "install vetoed by " + "; ".join(found)
            await self._report(StatusName.UPDATE_READY, error)
            return Result(False, error)
        await self._report(StatusName.UPDATING)
        outcome = await self.installer.install(
            release, self.state, lambda: self.store.save(self.state), self._health
        )
        return await self._finish(release, outcome)

    async def _health(self, release: Release) -> list[str]:
        return await vetoes(
            self.pm, "ota_post_install", self.settings.hook_timeout, release=release
        )

    async def _finish(self, release: Release, outcome: Outcome) -> Result:
        if not outcome.ok:
            if not outcome.transient:
                failure = self.state.failures.setdefault(release.version, Failure())
                failure.attempts += 1
                failure.error = outcome.error
            await self._report(StatusName.UPDATE_FAILED, outcome.error)
            return Result(False, outcome.error)
        self.state.current_version = release.version
        self.state.latest_version = release.version
        self.state.failures.pop(release.version, None)
        self._forget_offer()
        await self._report(StatusName.UPDATED)
        log.info("updated to %s", release.version)
        if outcome.restart:
            reason = f"update.sh of {release.version} asked for a restart (exit 10)"
            if self.on_restart is not None:
                await self.on_restart(reason)
            else:
                log.warning("%s: restart the agent to complete the update", reason)
        return Result(True)

    async def recover(self) -> None:
        """Finish or roll back an install the previous process did not complete."""
        interrupted = self.state.install
        if interrupted is None:
            return
        log.warning("found an interrupted install of %s", interrupted.version)
        offer = self.state.offer
        release = (
            self.store.release(offer)
            if offer and offer.version == interrupted.version
            else Release(version=interrupted.version, size=0, digest="")
        )
        self.state.current_version = interrupted.previous_version
        await self._report(StatusName.UPDATING)
        outcome = await self.installer.recover(release, self.state, self._save, self._health)
        await self._finish(release, outcome)

    async def operator_step(self, verb: str) -> Result:
        """``check``, ``download`` or ``install`` as an operator asks for it (NATS or CLI)."""
        steps: dict[str, Callable[[], Awaitable[Result]]] = {
            "check": self.check,
            "download": lambda: self.download(operator=True),
            "install": lambda: self.install(operator=True),
        }
        try:
            return await steps[verb]()
        except Exception as exc:
            log.exception("%s failed", verb)
            return Result(False, f"{verb} failed: {type(exc).__name__}")
