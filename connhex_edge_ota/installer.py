"""Installing a verified download: check the archive, unpack, run update.sh, roll back on failure.

The installer owns ``current/``, the script logs and the exit file; the
service owns the state and the statuses, and hands in the health gate.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

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
    ScriptResult,
    kill_group,
    prune_logs,
    run_script,
    script_environment,
)
from connhex_edge_ota.store import Install, State, Store, boot_id

log = logging.getLogger(__name__)

HealthGate = Callable[[Release], Awaitable[list[str]]]
"""Returns the failed health checks (``"<plugin>: <reason>"``), empty when healthy."""


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


class Installer:
    def __init__(self, settings: OtaSettings, store: Store) -> None:
        self.settings = settings
        self.store = store

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
            from connhex_edge_ota.signing import KeyFileError, load_public_key, verified_manifest

            try:
                key = load_public_key(self.settings.public_key)
            except KeyFileError as exc:
                raise ArchiveError(str(exc)) from None
            expected = verified_manifest(release.path, key)
        need = unpacked_size(members) + self.settings.free_space_margin
        free = shutil.disk_usage(self.store.root).free
        if free < need:
            raise NoSpace(f"no space to unpack: {need} bytes needed, {free} free")
        try:
            unpack(release.path, members, self.store.current, expected)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpace("no space left on device while unpacking") from None
            raise

    async def install(
        self,
        release: Release,
        state: State,
        save: Callable[[], None],
        healthy: HealthGate,
    ) -> Outcome:
        """Install ``release`` over ``state.current_version``; ``state.install`` marks the attempt.

        ``save`` persists ``state``; it is called before each step with effects,
        and the install does not start unless the first call succeeds.
        """
        previous = state.current_version
        state.install = Install(
            version=release.version,
            previous_version=previous,
            started=time.time(),
            boot_id=boot_id(),
        )
        try:
            save()
        except OSError as exc:  # an install that could not be recorded must not start
            state.install = None
            return Outcome(False, f"cannot record the install in state.json: {exc.strerror}")
        try:
            await in_thread(self._check_and_unpack, release)
        except NoSpace as exc:
            state.install = None
            save()
            return Outcome(False, f"{exc}; will try again", transient=True)
        except (ArchiveError, OSError) as exc:
            state.install = None
            save()
            return Outcome(False, f"release refused: {exc}")
        workdir = self.store.current
        self.store.exit_file().unlink(missing_ok=True)
        self.store.group_file().unlink(missing_ok=True)
        result = await self._run(UPDATE_SCRIPT, release, previous, state, save)
        if not result.ok:
            return await self._fail(release, previous, state, save, result.describe())
        failed = await healthy(release.with_workdir(workdir))
        if failed:
            return await self._fail(
                release, previous, state, save, "health check failed: " + "; ".join(failed)
            )
        state.install = None
        self.store.exit_file().unlink(missing_ok=True)
        return Outcome(True, restart=result.restart)

    async def _run(
        self, script: str, release: Release, previous: str, state: State, save: Callable[[], None]
    ) -> ScriptResult:
        def started(pid: int) -> None:
            if state.install is not None:
                state.install.pgid = pid
                state.install.phase = "update" if script == UPDATE_SCRIPT else "rollback"
                with contextlib.suppress(OSError):  # the install is recorded already
                    save()

        workdir = self.store.current
        env = script_environment(workdir, previous, release.version, self.settings.install_timeout)
        log_path = self.store.log_path(release.version)
        exit_file = self.store.exit_file() if script == UPDATE_SCRIPT else None
        group_file = self.store.group_file()
        try:
            return await run_script(
                script,
                workdir,
                env,
                self.settings.install_timeout,
                log_path,
                exit_file=exit_file,
                on_start=started,
                group_file=group_file,
            )
        finally:
            prune_logs(self.store.logs, self.settings.log_keep)

    async def _fail(
        self, release: Release, previous: str, state: State, save: Callable[[], None], error: str
    ) -> Outcome:
        """Run rollback.sh when the release has one; the version stays ``previous``."""
        if (self.store.current / ROLLBACK_SCRIPT).is_file():
            result = await self._run(ROLLBACK_SCRIPT, release, previous, state, save)
            if not result.ok:
                error = f"{error}; rollback failed: {result.describe()}"
            else:
                error = f"{error}; rolled back"
        state.install = None
        save()
        return Outcome(False, error)

    async def recover(
        self, release: Release, state: State, save: Callable[[], None], healthy: HealthGate
    ) -> Outcome:
        """Finish or roll back an install that a previous process left in ``state.install``."""
        interrupted = state.install
        assert interrupted is not None
        exit_file = self.store.exit_file()
        code: int | None = None
        if interrupted.phase == "update":
            try:
                code = int(exit_file.read_text().strip())
            except (OSError, ValueError):
                code = None
        pgid = interrupted.pgid or _read_int(self.store.group_file())
        if code is None and pgid and interrupted.boot_id == boot_id():
            kill_group(pgid)  # the script may outlive the agent that started it
        previous = interrupted.previous_version
        if not (self.store.current / UPDATE_SCRIPT).is_file():
            state.install = None
            save()
            return Outcome(False, "interrupted before the release was unpacked")
        if code in (0, 10):
            failed = await healthy(release.with_workdir(self.store.current))
            if not failed:
                state.install = None
                exit_file.unlink(missing_ok=True)
                return Outcome(True)
            return await self._fail(
                release, previous, state, save, "health check failed: " + "; ".join(failed)
            )
        reason = "interrupted" if code is None else f"update.sh exited with {code} (agent stopped)"
        exit_file.unlink(missing_ok=True)
        return await self._fail(release, previous, state, save, reason)


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return 0
