"""The device's persisted state (``state.json``) and its only durable transitions.

:class:`Journal` is the one owner of the state: the service and the installer
call its methods (take an offer, begin a download, record an install phase,
finish, record a failure) and read ``journal.state``; they never assign fields.
Each transition is written atomically before the step it announces, so a
process killed at any point leaves a file that says what to do next.

An install is a journal of phases, each recorded before the step it announces::

    unpacking -> unpacked -> script_started -> script_exited -> health_checked
                                   |                 |               |
                                   +-------> rolling_back <----------+

and it is forgotten (``install = None``) in the same write that records its end.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from enum import StrEnum

from pydantic import BaseModel, Field, ValidationError, field_validator

from connhex_edge_ota.release import Release, UnsafeVersionError, check_version
from connhex_edge_ota.store import Store, boot_id, write_atomic

log = logging.getLogger(__name__)

STATE_SCHEMA = 1


def _version(value: str) -> str:
    try:
        return check_version(value)
    except UnsafeVersionError as exc:
        raise ValueError(str(exc)) from None


def _optional_version(value: str) -> str:
    return _version(value) if value else value


class Offer(BaseModel):
    """The latest release the server offered (what a ``Release`` is made of)."""

    version: str
    size: int = Field(ge=0)
    digest: str
    etag: str = ""
    min_version: str = ""
    max_version: str = ""
    filename: str = ""

    _check_version = field_validator("version")(_version)


class Partial(BaseModel):
    """A download in progress: enough to resume it safely after a restart."""

    version: str
    etag: str
    digest: str
    size: int = Field(ge=0)
    boot_id: str = ""
    """The boot the bytes were written in: after a reboot only ``durable`` bytes are trusted."""
    durable: int = Field(default=0, ge=0)
    """Bytes known to be on stable storage (fsynced)."""

    _check_version = field_validator("version")(_version)


class Phase(StrEnum):
    """Where an install stands; each is recorded before the step it announces."""

    UNPACKING = "unpacking"
    """The archive is being checked and unpacked; nothing of it has run."""
    UNPACKED = "unpacked"
    """``current/`` holds the new release; ``update.sh`` has not started."""
    SCRIPT_STARTED = "script_started"
    """``update.sh`` may be running: ``pgid``, ``start_ticks`` and ``boot_id`` identify it."""
    SCRIPT_EXITED = "script_exited"
    """``update.sh`` ended with ``code``."""
    HEALTH_CHECKED = "health_checked"
    """``ota_post_install`` answered: healthy when ``error`` is empty."""
    ROLLING_BACK = "rolling_back"
    """The new release's ``rollback.sh`` may be running (``pgid`` ...); ``error`` says why."""


SCRIPT_PHASES = (Phase.SCRIPT_STARTED, Phase.ROLLING_BACK)


class Install(BaseModel):
    """An install in progress; found at startup when the process died during it."""

    version: str
    previous_version: str = ""
    phase: Phase = Phase.UNPACKING
    started: float = 0.0
    boot_id: str = ""
    """The boot of the last script start: a process group is only killed in that boot."""
    pgid: int = 0
    """The process group of the running script (0: none yet)."""
    start_ticks: int = 0
    """Start time of the group's leader (``/proc/<pgid>/stat`` field 22): proves the group."""
    code: int | None = None
    """Exit status of ``update.sh`` (phase ``script_exited`` and later)."""
    error: str = ""
    """Why the install failed (phase ``rolling_back``), or the failed health check."""
    restart: bool = False
    """``update.sh`` exited 10: the agent restarts once the install is finished."""
    recoveries: int = Field(default=0, ge=0)
    """Starts that found this install interrupted: a recovery that keeps dying is given up."""

    _check_version = field_validator("version")(_version)
    _check_previous = field_validator("previous_version")(_optional_version)

    @field_validator("pgid")
    @classmethod
    def _check_pgid(cls, value: int) -> int:
        # 0 = none; 1 would be init's group, and killpg(1) or a negative id signals
        # far more than a script: such a file is corrupt, never acted on.
        if value != 0 and value <= 1:
            raise ValueError("pgid must be 0 or a process group above 1")
        return value

    @field_validator("start_ticks")
    @classmethod
    def _check_ticks(cls, value: int) -> int:
        if value < 0:
            raise ValueError("start_ticks must not be negative")
        return value


class Failure(BaseModel):
    """Failed install attempts of one version, and why the last one failed."""

    attempts: int = Field(default=0, ge=0)
    error: str = ""
    interrupted: int = Field(default=0, ge=0)
    """Attempts cut before update.sh started (not failures, unless they keep happening)."""


class State(BaseModel):
    """Everything the service persists between runs (``state.json``)."""

    schema_version: int = STATE_SCHEMA
    current_version: str = ""
    latest_version: str = ""
    status: str = ""
    error: str = ""
    last_checked: str = ""
    offer: Offer | None = None
    ready: bool = False
    """The offer's zip is downloaded and verified."""
    partial: Partial | None = None
    install: Install | None = None
    failures: dict[str, Failure] = Field(default_factory=dict)
    """Failed installs per version."""

    _check_current = field_validator("current_version", "latest_version")(_optional_version)

    @field_validator("failures")
    @classmethod
    def _check_failures(cls, value: dict[str, Failure]) -> dict[str, Failure]:
        for version in value:
            _version(version)
        return value


def load_state(store: Store) -> tuple[State, str]:
    """The persisted state and a warning ("" if none).

    A corrupt or unreadable file, or one whose fields are out of range (a
    process group of 1 or below, an unsafe version), is moved aside
    (``state.json.corrupt-<time>``) and a fresh state is returned: it is
    reported once and never acted on.
    """
    try:
        text = store.state_file.read_bytes()
    except FileNotFoundError:
        return State(), ""
    except OSError as exc:
        return State(), f"state.json unreadable ({exc.strerror or exc}); starting afresh"
    try:
        return State.model_validate_json(text), ""
    except ValidationError as exc:
        aside = store.state_file.with_name(f"state.json.corrupt-{int(time.time())}")
        with contextlib.suppress(OSError):
            store.state_file.replace(aside)
        errors = exc.errors()
        where = ".".join(str(p) for p in errors[0]["loc"]) if errors else ""
        reason = str(errors[0]["msg"]).removeprefix("Value error, ") if errors else "unreadable"
        detail = f"{where}: {reason}" if where else reason
        return State(), f"state.json was corrupt ({detail}); moved to {aside.name}"


class Journal:
    """The one owner of :class:`State`: every durable transition is a method here.

    Methods that announce a step with effects (``begin_install``, each phase)
    raise ``OSError`` when the record could not be written, so the step does
    not start. Records of what already happened (statuses, progress) log a
    failed write and go on: the device keeps working from memory.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.state = State()
        self._lock = threading.Lock()
        """The download thread records progress while the loop records statuses."""

    def open(self, initial_version: str = "") -> str:
        """Load ``state.json``; a warning to report once ("" if none)."""
        self.store.create()
        self.state, warning = load_state(self.store)
        if not self.state.current_version and initial_version:
            self.state.current_version = initial_version
        return warning

    def save(self) -> None:
        """Write the state durably, or raise ``OSError``."""
        with self._lock:
            data = self.state.model_dump_json(indent=1).encode()
            write_atomic(self.store.state_file, data)

    def save_quietly(self) -> None:
        """Write the state; a full or failing disk is logged, never fatal."""
        try:
            self.save()
        except OSError as exc:
            log.warning("state.json not saved: %s", exc.strerror or exc)

    # statuses and checks

    def record_status(self, status: str, error: str) -> None:
        self.state.status = status
        self.state.error = error
        self.save_quietly()

    def checked(self, now: str) -> None:
        self.state.last_checked = now

    def up_to_date(self) -> None:
        """The server offers nothing newer: forget any offer and its files."""
        self.state.latest_version = self.state.current_version
        self._forget_offer()

    def take_offer(self, offer: Offer) -> None:
        """Remember ``offer``; files of any other release are deleted."""
        state = self.state
        state.latest_version = offer.version
        if state.offer != offer:
            # A different release (or the same version rebuilt): old files are useless.
            state.offer = offer
            state.ready = False
            if state.partial and (
                state.partial.version,
                state.partial.etag,
                state.partial.digest,
            ) != (offer.version, offer.etag, offer.digest):
                state.partial = None
            self.store.prune_downloads(keep=offer.version if state.partial else None)
        if state.ready and not self.store.zip_path(offer.version).is_file():
            state.ready = False

    def _forget_offer(self) -> None:
        self.state.offer = None
        self.state.ready = False
        self.state.partial = None
        self.store.prune_downloads(keep=None)

    def release(self) -> Release | None:
        """The offered release, with where its zip lives in the store."""
        offer = self.state.offer
        if offer is None:
            return None
        return Release(
            version=offer.version,
            size=offer.size,
            digest=offer.digest,
            etag=offer.etag,
            path=self.store.zip_path(offer.version),
            min_version=offer.min_version,
            max_version=offer.max_version,
            filename=offer.filename,
        )

    # downloads

    def begin_download(self, release: Release) -> Partial:
        """The partial download to resume (or a new one), recorded."""
        partial = self.state.partial or Partial(
            version=release.version, etag=release.etag, digest=release.digest, size=release.size
        )
        self.state.partial = partial
        return partial

    def download_progress(self, partial: Partial) -> None:
        """Record a durable checkpoint (called from the download thread)."""
        self.state.partial = partial
        self.save_quietly()

    def download_done(self) -> None:
        self.state.partial = None
        self.state.ready = True

    def download_failed(self, partial_dropped: bool) -> None:
        if partial_dropped:
            self.state.partial = None

    # installs

    def begin_install(self, release: Release) -> Install:
        """Record that ``release`` is being unpacked; ``OSError`` means: do not start."""
        record = Install(
            version=release.version,
            previous_version=self.state.current_version,
            phase=Phase.UNPACKING,
            started=time.time(),
            boot_id=boot_id(),
        )
        self.state.install = record
        try:
            self.save()
        except OSError:
            self.state.install = None
            raise
        return record

    def _phase(self, phase: Phase, **fields: object) -> None:
        record = self.state.install
        assert record is not None, "no install in progress"
        self.state.install = record.model_copy(update={"phase": phase, **fields})
        self.save()

    def unpacked(self) -> None:
        self._phase(Phase.UNPACKED)

    def script_started(self, phase: Phase, pgid: int, start_ticks: int) -> None:
        """``update.sh`` (or ``rollback.sh``) is about to run as process group ``pgid``."""
        assert phase in SCRIPT_PHASES
        self._phase(phase, pgid=pgid, start_ticks=start_ticks, boot_id=boot_id())

    def script_exited(self, code: int | None, error: str, restart: bool) -> None:
        """``update.sh`` ended; its group is forgotten (never killed on its behalf again)."""
        self._phase(
            Phase.SCRIPT_EXITED, code=code, error=error, restart=restart, pgid=0, start_ticks=0
        )

    def health_checked(self, error: str) -> None:
        self._phase(Phase.HEALTH_CHECKED, error=error)

    def rolling_back(self, error: str) -> None:
        """The install failed with ``error``; ``rollback.sh`` is next."""
        self._phase(Phase.ROLLING_BACK, error=error, pgid=0, start_ticks=0)

    def abandon_install(self, interrupted: bool = True) -> None:
        """Nothing of the release ran: forget the attempt.

        An ``interrupted`` one (found at a start) is counted apart from failures: only
        repeated ones add up (a crash loop while unpacking). No room to unpack, or no
        way to record a phase, is not counted at all.
        """
        record = self.state.install
        if record is not None and interrupted:
            failure = self.state.failures.setdefault(record.version, Failure())
            failure.interrupted += 1
            failure.error = f"interrupted {failure.interrupted} time(s) before update.sh started"
        self.state.install = None
        self.save_quietly()

    def begin_recovery(self) -> int:
        """Count a start that found the install interrupted; how many did so far."""
        record = self.state.install
        assert record is not None
        self.state.install = record.model_copy(update={"recoveries": record.recoveries + 1})
        self.save_quietly()
        return record.recoveries + 1

    def finish_install(self, release: Release) -> None:
        """``release`` runs now: one write sets the version and forgets the install."""
        state = self.state
        state.current_version = release.version
        state.latest_version = release.version
        state.failures.pop(release.version, None)
        state.install = None
        self._keep_for_delta(release)
        self._forget_offer()
        self.save_quietly()

    def _keep_for_delta(self, release: Release) -> None:
        """The installed zip becomes the base of the next delta download."""
        try:
            release.path.replace(self.store.installed_zip)
        except OSError:
            self.store.installed_zip.unlink(missing_ok=True)  # a stale base would only cost

    def record_failure(self, version: str, error: str, counted: bool = True) -> None:
        """The install of ``version`` failed: forget it, and count it unless ``counted`` is off."""
        if counted:
            failure = self.state.failures.setdefault(version, Failure())
            failure.attempts += 1
            failure.error = error
        self.state.install = None
        self.save_quietly()
