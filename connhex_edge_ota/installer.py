"""Installing a verified download, phase by phase, and finishing one a dead process left.

Each phase is recorded in the install journal (:class:`connhex_edge_ota.state.Journal`)
before the step it announces; :meth:`Installer.recover` acts on the recorded
phase only, never on what happens to be on disk:

- before ``update.sh`` started: nothing of the release ran, so nothing is
  rolled back or killed; the partial unpack is removed and the attempt does not count;
- ``update.sh`` started, no exit recorded: its own process group is killed
  (only if provably it) and the **new** release's ``rollback.sh`` runs;
- exit recorded: the install is finished accordingly (health check, success or rollback).

The previous release's scripts are never run on behalf of another version.
The installer owns ``current/``, the script logs and exit files; the service
turns its :class:`Outcome` into statuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from connhex_edge_ota import killpoints
from connhex_edge_ota.archive import (
    ROLLBACK_SCRIPT,
    UPDATE_SCRIPT,
    ArchiveError,
    Limits,
    check_archive,
    unpack,
    unpacked_size,
)
from connhex_edge_ota.calls import in_thread
from connhex_edge_ota.config import OtaSettings
from connhex_edge_ota.release import Release
from connhex_edge_ota.scripts import (
    EXIT_RESTART,
    SKIPPED,
    ScriptResult,
    group_is_running,
    kill_recorded_group,
    prune_logs,
    read_exit,
    run_script,
    script_environment,
)
from connhex_edge_ota.state import Journal, Phase
from connhex_edge_ota.store import Store, boot_id, sync_filesystem, write_atomic

log = logging.getLogger(__name__)

HealthGate = Callable[[Release], Awaitable[list[str]]]
"""Returns the failed health checks (``"<plugin>: <reason>"``), empty when healthy."""

INTERRUPTED = "interrupted"


@dataclass
class Outcome:
    ok: bool
    error: str = ""
    restart: bool = False
    """update.sh exited 10: the agent should restart."""
    transient: bool = False
    """Nothing wrong with the release (e.g. no space to unpack): not a failed attempt."""


class NoSpace(Exception):
    """Not enough room to unpack the release; it may fit later."""


class NotRecorded(Exception):
    """A phase could not be written to state.json: the step it announces must not run."""


class Installer:
    def __init__(
        self, settings: OtaSettings, store: Store, journal: Journal, healthy: HealthGate
    ) -> None:
        self.settings = settings
        self.store = store
        self.journal = journal
        self.healthy = healthy

    def limits(self) -> Limits:
        return Limits(
            max_members=self.settings.max_members,
            max_unpacked_size=self.settings.max_unpacked_size,
            max_ratio=self.settings.max_ratio,
        )

    def _check_and_unpack(self, release: Release) -> None:
        members = check_archive(release.path, self.limits())
        expected = None
        if self.settings.public_key:
            # Here, not at the top: cryptography costs start-up time when nothing is signed.
            from connhex_edge_ota.signing import (
                KeyFileError,
                check_identity,
                load_public_key,
                verified_manifest,
            )

            try:
                key = load_public_key(self.settings.public_key)
            except KeyFileError as exc:
                raise ArchiveError(str(exc)) from None
            manifest = verified_manifest(release.path, key)
            check_identity(manifest, release.version, self.settings.model)
            expected = manifest.files
        need = unpacked_size(members) + self.settings.free_space_margin
        free = shutil.disk_usage(self.store.root).free
        if free < need and self.store.installed_zip.is_file():
            log.warning("little space left: the installed release zip is dropped (no delta)")
            self.store.installed_zip.unlink(missing_ok=True)
            free = shutil.disk_usage(self.store.root).free
        if free < need:
            raise NoSpace(f"no space to unpack: {need} bytes needed, {free} free")
        self.store.current_version_file.unlink(missing_ok=True)  # current/ is changing
        try:
            unpack(release.path, members, self.store.current, expected)
            # The scripts about to be recorded as "unpacked" must survive a power cut.
            sync_filesystem(self.store.root)
            write_atomic(self.store.current_version_file, release.version.encode())
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpace("no space left on device while unpacking") from None
            raise

    def _unpacked_version(self) -> str:
        """The version whose files ``current/`` holds ("" when unknown or half-made)."""
        try:
            return self.store.current_version_file.read_text()
        except OSError:
            return ""

    def _record(self, transition: Callable[[], object]) -> None:
        """Write a phase that announces a step; the step does not run unless it is written."""
        try:
            transition()
        except OSError as exc:
            raise NotRecorded(
                f"cannot record the install in state.json: {exc.strerror or exc}"
            ) from None

    def _note(self, transition: Callable[[], object]) -> None:
        """Write a phase that records what already happened; a failed write is only logged."""
        try:
            transition()
        except OSError as exc:
            log.warning("state.json not saved: %s", exc.strerror or exc)

    async def install(self, release: Release) -> Outcome:
        """Install ``release`` over the running version, recording each phase first."""
        try:
            self._record(lambda: self.journal.begin_install(release))
        except NotRecorded as exc:
            return self._not_started(str(exc))
        killpoints.reached("install_recorded")
        try:
            await in_thread(self._check_and_unpack, release)
        except NoSpace as exc:
            return self._not_started(f"{exc}; will try again")
        except ArchiveError as exc:
            return Outcome(False, f"release refused: {exc}")
        except OSError as exc:
            return Outcome(False, f"cannot unpack the release: {exc.strerror or exc}")
        except Exception as exc:  # any other defect of the archive: a refusal, never a crash
            log.warning("unpacking %s failed", release.version, exc_info=True)
            return Outcome(False, f"release refused: {type(exc).__name__}: {exc}")
        try:
            self._record(self.journal.unpacked)
        except NotRecorded as exc:
            return self._not_started(str(exc))
        killpoints.reached("install_unpacked")
        try:
            result = await self._run(UPDATE_SCRIPT, release, Phase.SCRIPT_STARTED)
        except NotRecorded as exc:
            return self._not_started(str(exc))
        except OSError as exc:  # its log cannot be written: update.sh has not started
            return self._not_started(
                f"cannot write the script log: {exc.strerror or exc}; will try again"
            )
        return await self._script_ended(release, result.code, result.ok, result.describe())

    def _not_started(self, reason: str) -> Outcome:
        """Nothing of the release ran and nothing is wrong with it: forget the attempt
        (not counted) and try again later."""
        self.journal.abandon_install(interrupted=False)
        return Outcome(False, reason, transient=True)

    async def _script_ended(
        self, release: Release, code: int | None, ok: bool, error: str
    ) -> Outcome:
        restart = ok and code == EXIT_RESTART
        self._note(lambda: self.journal.script_exited(code, "" if ok else error, restart))
        killpoints.reached("script_exit_recorded")
        if not ok:
            return await self._fail(release, error)
        return await self._check_health(release, restart)

    async def _check_health(self, release: Release, restart: bool) -> Outcome:
        killpoints.reached("health_checking")
        failed = await self.healthy(release.with_workdir(self.store.current))
        error = "health check failed: " + "; ".join(failed) if failed else ""
        killpoints.reached("health_asked")
        self._note(lambda: self.journal.health_checked(error))
        killpoints.reached("health_recorded")
        if error:
            return await self._fail(release, error)
        return Outcome(True, restart=restart)

    async def _run(self, script: str, release: Release, phase: Phase) -> ScriptResult:
        # update.sh never runs unrecorded; rollback.sh runs even then (it is the safe side).
        write = self._record if phase == Phase.SCRIPT_STARTED else self._note

        async def started(pgid: int, ticks: int) -> None:
            await in_thread(write, lambda: self.journal.script_started(phase, pgid, ticks))

        workdir = self.store.current
        previous = self.journal.state.current_version
        env = script_environment(workdir, previous, release.version, self.settings.install_timeout)
        try:
            return await run_script(
                script,
                workdir,
                env,
                self.settings.install_timeout,
                self.store.log_path(release.version),
                exit_file=self.store.exit_file(script),
                on_start=started,
                stage="script" if script == UPDATE_SCRIPT else "rollback",
                grace=self.settings.script_stop_grace,
            )
        finally:
            prune_logs(self.store.logs, self.settings.log_keep)

    async def _fail(self, release: Release, error: str) -> Outcome:
        """Run the new release's rollback.sh when it has one; the version stays.

        Only the release's own: when ``current/`` holds another version's files
        (a state.json restored from elsewhere ...), no script runs for it.
        """
        if self._unpacked_version() != release.version:
            return Outcome(
                False, f"{error}; rollback.sh not run: current/ is not {release.version}"
            )
        if not (self.store.current / ROLLBACK_SCRIPT).is_file():
            return Outcome(False, error)
        self._note(lambda: self.journal.rolling_back(error))
        result = await self._run(ROLLBACK_SCRIPT, release, Phase.ROLLING_BACK)
        return Outcome(False, self._rolled_back(error, result.ok, result.describe()))

    @staticmethod
    def _rolled_back(error: str, ok: bool, described: str) -> str:
        return f"{error}; rolled back" if ok else f"{error}; rollback failed: {described}"

    # recovery

    async def recover(self, release: Release) -> Outcome | None:
        """Finish what a dead process left in the journal; None when nothing of it ran."""
        record = self.journal.state.install
        assert record is not None
        if record.phase in (Phase.UNPACKING, Phase.UNPACKED):
            self._abandon(f"{record.version} was interrupted before update.sh started")
            return None
        if record.phase == Phase.SCRIPT_STARTED:
            recorded = read_exit(self.store.exit_file(UPDATE_SCRIPT))
            if recorded == SKIPPED:
                self._abandon(f"update.sh of {record.version} never started")
                return None
            if not isinstance(recorded, int):
                await self._kill_left_over(record.pgid, record.start_ticks, record.boot_id)
                recorded = read_exit(self.store.exit_file(UPDATE_SCRIPT))  # ended meanwhile?
            if not isinstance(recorded, int):
                return await self._fail(release, INTERRUPTED)
            ok = recorded in (0, EXIT_RESTART)
            error = f"update.sh exited with {recorded} (while the agent was stopped)"
            return await self._script_ended(release, recorded, ok, error)
        if record.phase == Phase.SCRIPT_EXITED:
            if record.error or record.code not in (0, EXIT_RESTART):
                error = record.error or f"update.sh exited with {record.code}"
                return await self._fail(release, error)
            return await self._check_health(release, record.restart)
        if record.phase == Phase.HEALTH_CHECKED:
            if record.error:
                return await self._fail(release, record.error)
            return Outcome(True, restart=record.restart)
        return await self._recover_rollback(release)

    async def _recover_rollback(self, release: Release) -> Outcome:
        record = self.journal.state.install
        assert record is not None and record.phase == Phase.ROLLING_BACK
        error = record.error or INTERRUPTED
        if record.pgid:  # rollback.sh was started
            recorded = read_exit(self.store.exit_file(ROLLBACK_SCRIPT))
            if isinstance(recorded, int):
                return Outcome(
                    False,
                    self._rolled_back(error, recorded == 0, f"rollback.sh exited with {recorded}"),
                )
            if recorded != SKIPPED:
                await self._kill_left_over(record.pgid, record.start_ticks, record.boot_id)
                error = f"{error}; rollback interrupted, run again"
        return await self._fail(release, error)

    def _abandon(self, why: str) -> None:
        """Nothing of the release ran: remove the partial unpack, forget the attempt."""
        log.warning("%s: nothing to undo; it will be installed again", why)
        for folder in self.store.staging():
            with contextlib.suppress(OSError):
                shutil.rmtree(folder)
        self.journal.abandon_install()

    async def _kill_left_over(self, pgid: int, ticks: int, boot: str) -> None:
        """Kill the script group a dead agent left running, only when provably it."""
        if boot != boot_id() or not kill_recorded_group(pgid, ticks):
            return
        log.warning("killed process group %d left running by the previous agent", pgid)
        deadline = time.monotonic() + 5.0
        while group_is_running(pgid, ticks) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
