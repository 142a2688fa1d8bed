"""The update steps: check, download, install (and recover), each reported as a status.

:mod:`connhex_edge_ota.loop` decides when they run. Blocking work (HTTP,
unpacking, plugin hooks) runs in threads, so heartbeats and commands keep
flowing meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pluggy

from connhex_edge_ota import killpoints
from connhex_edge_ota.calls import in_thread
from connhex_edge_ota.client import RangeRefused, ReleaseChanged, Server, ServerError
from connhex_edge_ota.config import OtaSettings
from connhex_edge_ota.constraints import refusal
from connhex_edge_ota.hooks import Hooks
from connhex_edge_ota.installer import Installer, Outcome
from connhex_edge_ota.release import Release
from connhex_edge_ota.state import Journal, Partial, Phase, State
from connhex_edge_ota.status import Status, StatusName, rfc3339_now, short_error
from connhex_edge_ota.store import Store

log = logging.getLogger(__name__)

Reporter = Callable[[Status], Awaitable[None]]
ProgressPrinter = Callable[[int, int], None]
MAX_INTERRUPTIONS = 3
"""Installs cut before update.sh started (a crash while unpacking ...) before a version is
given up like a failed one: one cut does not count, a crash loop does."""
MAX_RECOVERIES = 3
"""Starts that find the same install interrupted before recovery stops running its scripts."""

_SUCCESSES = (StatusName.UPDATED, StatusName.UPDATE_READY)
"""Statuses after which the same failure, if it comes again, is news again."""

_FAILURE_LEVELS = {
    StatusName.CHECK_FAILED: logging.WARNING,  # retried with backoff
    StatusName.DOWNLOAD_FAILED: logging.WARNING,  # resumed later
    StatusName.UPDATE_FAILED: logging.ERROR,
}
"""Log level of each failure status; a veto (an error on another status) is INFO."""


@dataclass
class Result:
    """What a step achieved: a command reply, and what the loop decides the next round from."""

    ok: bool
    error: str = ""
    note: str = ""
    """Said to the operator when nothing went wrong, e.g. "already up to date: 1.2.0"."""
    failure: ServerError | None = None
    """The server's failure, when that is why the step failed (it sets the retry delay)."""

    def __bool__(self) -> bool:
        return self.ok


StepName = Callable[[], Awaitable[Result]]


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
        self.journal = Journal(store)
        self.installer = Installer(settings, store, self.journal, self._health)
        self.reporters = list(reporters or [])
        self.on_restart = on_restart
        self.progress_printer = progress_printer
        self._cancel = threading.Event()
        self.hooks = Hooks(pm, settings.hook_timeout)
        self._notice = ""
        """Something to report once, with the first status (e.g. a corrupt state.json)."""
        self._last_said: tuple[str, str] = ("", "")
        """The last failure logged (status, error): the same one is not logged again."""

    # state and statuses

    def open(self) -> None:
        """Load the persisted state (a corrupt file is set aside and reported)."""
        warning = self.journal.open(self.settings.initial_version)
        if warning:
            log.warning("%s", warning)
            self._notice = warning

    @property
    def state(self) -> State:
        """The persisted state, read-only: :class:`Journal` owns every change."""
        return self.journal.state

    def status(self) -> Status:
        s = self.state
        return Status(s.current_version, s.latest_version, s.status, s.error, s.last_checked)

    async def _report(self, status: StatusName, error: str = "") -> None:
        """Record and publish a status change (state.json first: it must never lag behind)."""
        error = short_error(error)
        # The one place a failure reaches the log: once, as it happens, in the status's words.
        # The same failure said again (a retry that fails alike, a version given up, seen
        # at each check) is not news: DEBUG until something else happened.
        level = _FAILURE_LEVELS.get(status, logging.INFO if error else logging.DEBUG)
        said = (status.value, error)
        if error and said == self._last_said:
            level = logging.DEBUG
        elif error or status in _SUCCESSES:
            self._last_said = said if error else ("", "")
        log.log(level, "%s: %s", status, error or "-", extra={"ota_status": status})
        await in_thread(self.journal.record_status, status.value, error)
        await self._publish(self.status())

    async def _publish(self, status: Status) -> None:
        for reporter in self.reporters:
            try:
                await reporter(status)
            except Exception:
                log.exception("status reporter failed")
        self.hooks.status(status)  # queued: a slow plugin never delays a step

    async def heartbeat(self) -> None:
        await self._publish(self.status())

    async def drain_hooks(self) -> None:
        """On shutdown: plugins get up to ``hook_timeout`` to take the statuses queued so far
        (the last one included); what is left then is abandoned."""
        try:
            if not await self.hooks.drain():
                log.warning("status hooks still busy after %gs; abandoned", self.hooks.timeout)
        finally:
            self.hooks.close()

    def cancel_transfer(self) -> None:
        """Make a running download stop at its next chunk (it resumes later)."""
        self._cancel.set()

    def close(self) -> None:
        self.server.close()

    # steps

    def gave_up_on(self, version: str) -> bool:
        failure = self.state.failures.get(version)
        if failure is None:
            return False
        return (
            failure.attempts >= self.settings.max_install_attempts
            or failure.interrupted >= MAX_INTERRUPTIONS
        )

    def wants_download(self) -> bool:
        """An automatic round downloads: enabled, an offer not yet here, not given up on."""
        offer = self.state.offer
        return (
            offer is not None
            and self.settings.downloads_enabled
            and not self.state.ready
            and not self.gave_up_on(offer.version)
        )

    def wants_install(self) -> bool:
        """An automatic round installs: ``auto_install``, a verified download, not given up on."""
        offer = self.state.offer
        return (
            offer is not None
            and self.settings.auto_install
            and self.state.ready
            and not self.gave_up_on(offer.version)
        )

    async def _guarded(self, name: str, failed: StatusName, step: StepName) -> Result:
        """Run ``step``; a bug surfaces as the step's failure status, never a dead loop.

        The traceback is logged once at ERROR; the status carries a short error;
        the loop goes on with backoff (the result counts as a server failure).
        """
        try:
            return await step()
        except Exception as exc:
            log.exception("%s failed unexpectedly", name)
            error = f"{name} failed: {type(exc).__name__}: {exc}"
            install = self.state.install
            if install is not None and name != "recover":
                if install.phase in (Phase.UNPACKING, Phase.UNPACKED):
                    self.journal.abandon_install()  # nothing of it ran
                else:  # update.sh may have run: finish by the journal, as a restart would
                    try:
                        recovered = await self._recover()
                    except Exception:
                        log.exception("finishing %s by its journal failed", install.version)
                    else:
                        return recovered if recovered.ok else Result(False, recovered.error)
                    if self.state.install is not None:
                        self.journal.record_failure(install.version, error)
            try:
                await self._report(failed, error)
            except Exception:
                log.exception("the %s status could not be reported", failed)
            return Result(False, error, failure=ServerError(error))

    async def check(self) -> Result:
        return await self._guarded("check", StatusName.CHECK_FAILED, self._check)

    async def _check(self) -> Result:
        notice, self._notice = self._notice, ""
        await self._report(StatusName.CHECKING, notice)
        try:
            offer = await in_thread(self.server.check, self.state.current_version)
        except ServerError as exc:
            await self._report(StatusName.CHECK_FAILED, str(exc))
            return Result(False, str(exc), failure=exc)
        self.journal.checked(rfc3339_now())
        if offer is None or offer.version == self.state.current_version:
            self.journal.up_to_date()
            await self._report(StatusName.UPDATED)
            return Result(True, note=f"already up to date: {self.state.current_version}")
        self.journal.take_offer(offer)
        release = self.journal.release()
        assert release is not None
        if await self._constrained(release) is None:
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
        """Fetch the offered release; an operator's download checks first.

        A release that changed on the server since the check (412) is checked
        again at once, and the new one fetched, a single time.
        """
        return await self._guarded(
            "download", StatusName.DOWNLOAD_FAILED, lambda: self._download(operator)
        )

    async def _download(self, operator: bool) -> Result:
        if operator:
            checked = await self._check_first()
            if not checked or checked.note:
                return checked
        fetched = await self._fetch()
        if isinstance(fetched.failure, RangeRefused):  # the partial is gone: start over now
            fetched = await self._fetch()
        if not isinstance(fetched.failure, ReleaseChanged):
            return fetched
        checked = await self._check()
        if not checked or self.state.offer is None:
            return checked
        if self.gave_up_on(self.state.offer.version):
            return Result(False, f"{self.state.offer.version} failed before")
        return await self._fetch()

    async def _fetch(self) -> Result:
        release = self.journal.release()
        if release is None:
            return Result(False, "no update to download")
        if (refused := await self._constrained(release)) is not None:
            return refused
        if self.state.ready:
            return Result(True, note=f"{release.version} is downloaded and verified")
        found = await self.hooks.veto_download(release)
        if found:
            error = "download vetoed by " + "; ".join(found)
            await self._report(StatusName.UPDATE_AVAILABLE, error)
            return Result(False, error)
        partial = self.journal.begin_download(release)
        await self._report(StatusName.DOWNLOADING)
        killpoints.reached("download_started")
        self._cancel.clear()
        try:
            transfer = await in_thread(
                self.server.download,
                release,
                partial,
                self._save_partial,
                self._progress_sink(release),
                self._cancel,
                self.store.installed_zip,
            )
        except ServerError as exc:
            return await self._download_failed(exc)
        except OSError as exc:  # the store itself (e.g. reading a partial file back)
            return await self._download_failed(
                ServerError(f"download failed: {exc.strerror or exc}")
            )
        killpoints.reached("download_renamed")
        self.journal.download_done()
        log.info(
            "downloaded %s (%s%s): %d of %d bytes fetched",
            release.version,
            transfer.how,
            f"; delta not used: {transfer.fallback}" if transfer.fallback else "",
            transfer.fetched,
            release.size,
        )
        self._notify_progress(release, transfer.fetched, transfer.total)
        await self._report(StatusName.UPDATE_READY)
        return Result(True)

    async def _download_failed(self, failure: ServerError) -> Result:
        self.journal.download_failed(failure.partial_dropped)
        await self._report(StatusName.DOWNLOAD_FAILED, failure.message)
        return Result(False, failure.message, failure=failure)

    def _save_partial(self, partial: Partial) -> None:
        # Called from the download thread at each durable checkpoint.
        self.journal.download_progress(partial)
        killpoints.reached("download_checkpoint")

    def _progress_sink(self, release: Release) -> Callable[[int, int], None]:
        """A callback for the download thread, rate-limited to ``progress_rate`` per second."""
        loop = asyncio.get_running_loop()
        period = 1.0 / self.settings.progress_rate
        last = [0.0]

        def sink(downloaded: int, total: int) -> None:
            now = time.monotonic()
            if now - last[0] >= period:
                last[0] = now
                loop.call_soon_threadsafe(self._notify_progress, release, downloaded, total)

        return sink

    def _notify_progress(self, release: Release, downloaded: int, total: int) -> None:
        """``ota_on_progress``: bytes fetched of the bytes this download fetches (a delta
        fetches less than the release's size; the totals say so). Queued, never awaited."""
        if self.progress_printer is not None:
            self.progress_printer(downloaded, total)
        self.hooks.progress(release, downloaded, total)

    async def install(self, operator: bool = False) -> Result:
        """Install the offered release; an operator's install checks and downloads first."""
        return await self._guarded(
            "install", StatusName.UPDATE_FAILED, lambda: self._install(operator)
        )

    async def _install(self, operator: bool) -> Result:
        if operator:
            checked = await self._check_first()
            if not checked or checked.note:
                return checked
        release = self.journal.release()
        if release is None:
            return Result(False, "no update to install")
        if (refused := await self._constrained(release)) is not None:
            return refused
        if not operator and self.gave_up_on(release.version):
            return Result(False, f"{release.version} failed before; not retried automatically")
        if not self.state.ready:
            fetched = await self._download(operator=False)
            if not fetched:
                return fetched
        found = await self.hooks.veto_install(release)
        if found:
            error = "install vetoed by " + "; ".join(found)
            await self._report(StatusName.UPDATE_READY, error)
            return Result(False, error)
        await self._report(StatusName.UPDATING)
        outcome = await self.installer.install(release)
        return await self._finish(release, outcome)

    async def _check_first(self) -> Result:
        """An operator's download or install asks the server first: what is offered now.

        A note says when there is nothing to do; a failed check still lets an
        already downloaded release be installed.
        """
        checked = await self.check()
        if checked and self.state.offer is None:
            version = self.state.current_version or "(no release installed yet)"
            return Result(True, note=f"already up to date: {version}")
        if not checked and self.state.offer is not None and self.state.ready:
            return Result(True)
        return checked

    async def _health(self, release: Release) -> list[str]:
        return await self.hooks.health(release)

    async def _finish(self, release: Release, outcome: Outcome) -> Result:
        killpoints.reached("install_finishing")
        if not outcome.ok:
            self.journal.record_failure(release.version, outcome.error, not outcome.transient)
            killpoints.reached("install_finished")
            await self._report(StatusName.UPDATE_FAILED, outcome.error)
            return Result(False, outcome.error)
        self.journal.finish_install(release)
        killpoints.reached("install_finished")
        await self._report(StatusName.UPDATED)
        log.info("updated to %s", release.version)
        if outcome.restart:
            reason = f"update.sh of {release.version} asked for a restart (exit 10)"
            if self.on_restart is not None:
                await self.on_restart(reason)
            else:
                log.warning("%s: restart the agent to complete the update", reason)
        return Result(True)

    async def recover(self) -> Result:
        """Finish an install the previous process left, by its journal phase."""
        return await self._guarded("recover", StatusName.UPDATE_FAILED, self._recover)

    async def _recover(self) -> Result:
        interrupted = self.state.install
        if interrupted is None:
            return Result(True)
        log.warning(
            "found an interrupted install of %s (phase %s)", interrupted.version, interrupted.phase
        )
        offer = self.state.offer
        release = (
            self.journal.release() if offer and offer.version == interrupted.version else None
        ) or Release(version=interrupted.version, size=0, digest="")
        if interrupted.recoveries >= MAX_RECOVERIES:
            # Its scripts keep killing the agent (a rollback.sh that reboots ...): stop here.
            error = (
                f"recovery of {interrupted.version} interrupted {interrupted.recoveries} "
                "times; given up, nothing more is run"
            )
            self.journal.record_failure(interrupted.version, error)
            await self._report(StatusName.UPDATE_FAILED, error)
            return Result(False, error)
        self.journal.begin_recovery()
        if interrupted.phase not in (Phase.UNPACKING, Phase.UNPACKED):
            await self._report(StatusName.UPDATING)
        try:
            outcome = await self.installer.recover(release)
        except Exception as exc:
            # A recovery that cannot finish must not be tried at every start. A stop
            # (CancelledError) is not a failure: the next start recovers by the same phase.
            self.journal.record_failure(
                interrupted.version, f"recovery failed: {type(exc).__name__}: {exc}"
            )
            raise
        if outcome is None:  # nothing of it ran: installed again by the next round
            return Result(True)
        return await self._finish(release, outcome)

    async def operator_step(self, verb: str) -> Result:
        """``check``, ``download`` or ``install`` as an operator asks for it (NATS or CLI)."""
        steps: dict[str, StepName] = {
            "check": self.check,
            "download": lambda: self.download(operator=True),
            "install": lambda: self.install(operator=True),
        }
        return await steps[verb]()
