"""The on-disk store under ``<install_dir>/.store/ota``: state, downloads, logs and the lock.

Layout::

    state.json            the persisted state, written atomically
    lock                  held (flock) by the one process that may download or install
    downloads/V.zip       a verified release; V.zip.part while it downloads
    current/              the unpacked release being (or last) installed
    logs/V.log            output of update.sh / rollback.sh for version V
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from pathlib import Path
from typing import IO

from pydantic import BaseModel, Field, ValidationError

from connhex_edge_ota.release import Release, check_version

log = logging.getLogger(__name__)

STATE_SCHEMA = 1


class Offer(BaseModel):
    """The latest release the server offered (what a ``Release`` is made of)."""

    version: str
    size: int = Field(ge=0)
    digest: str
    etag: str = ""
    min_version: str = ""
    max_version: str = ""
    filename: str = ""


class Partial(BaseModel):
    """A download in progress: enough to resume it safely after a restart."""

    version: str
    etag: str
    digest: str
    size: int
    boot_id: str = ""
    """The boot the bytes were written in: after a reboot only ``durable`` bytes are trusted."""
    durable: int = 0
    """Bytes known to be on stable storage (fsynced)."""


class Install(BaseModel):
    """An install in progress; found at startup when the process died during it."""

    version: str
    previous_version: str
    pgid: int = 0
    started: float = 0.0
    boot_id: str = ""
    """A recorded process group is only killed in the boot that started it."""
    phase: str = "update"  # "update" or "rollback"


class Failure(BaseModel):
    """Failed install attempts of one version, and why the last one failed."""

    attempts: int = 0
    error: str = ""


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


class Busy(Exception):
    """Another process holds the store lock."""


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a power cut leaves the old or the new file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with tmp.open("wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not also collect half-written files
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def boot_id() -> str:
    """This boot's identity: page-cache data survive a process kill, not a reboot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


class Store:
    """The store folder and its files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.state_file = root / "state.json"
        self.downloads = root / "downloads"
        self.current = root / "current"
        self.logs = root / "logs"
        self._lock_file: IO[bytes] | None = None
        self._save_lock = threading.Lock()
        """The download thread saves progress while the loop saves statuses."""

    def create(self) -> None:
        for folder in (self.root, self.downloads, self.logs):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)

    def zip_path(self, version: str) -> Path:
        return self.downloads / f"{check_version(version)}.zip"

    def log_path(self, version: str) -> Path:
        return self.logs / f"{check_version(version)}.log"

    def exit_file(self) -> Path:
        """Where the script wrapper records the exit status of ``update.sh``."""
        return self.root / "update.exit"

    def group_file(self) -> Path:
        """Where the script wrapper records its process group before the script starts."""
        return self.root / "update.pgid"

    def release(self, offer: Offer) -> Release:
        return Release(
            version=offer.version,
            size=offer.size,
            digest=offer.digest,
            etag=offer.etag,
            path=self.zip_path(offer.version),
            min_version=offer.min_version,
            max_version=offer.max_version,
            filename=offer.filename,
        )

    # state.json

    def load(self) -> tuple[State, str]:
        """The persisted state and a warning ("" if none).

        A corrupt or unreadable file is moved aside (``state.json.corrupt-<time>``)
        and a fresh state is returned, so a bad file never causes a crash loop.
        """
        try:
            text = self.state_file.read_bytes()
        except FileNotFoundError:
            return State(), ""
        try:
            return State.model_validate_json(text), ""
        except ValidationError as exc:
            aside = self.state_file.with_name(f"state.json.corrupt-{int(time.time())}")
            with contextlib.suppress(OSError):
                self.state_file.replace(aside)
            reason = exc.errors()[0]["msg"] if exc.errors() else "unreadable"
            return State(), f"state.json was corrupt ({reason}); moved to {aside.name}"

    def save(self, state: State) -> None:
        with self._save_lock:
            write_atomic(self.state_file, state.model_dump_json(indent=1).encode())

    # the lock

    def lock(self) -> None:
        """Take the store lock for this process, or raise :class:`Busy` naming the holder."""
        self.create()
        file = (self.root / "lock").open("a+b")
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().decode(errors="replace").strip() or "another process"
            file.close()
            raise Busy(f"busy: the store {self.root} is held by {holder}") from None
        file.truncate(0)
        file.write(f"pid {os.getpid()}".encode())
        file.flush()
        self._lock_file = file

    def unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def prune_downloads(self, keep: str | None) -> None:
        """Delete downloaded zips and partial files of every version but ``keep``."""
        if not self.downloads.is_dir():
            return
        keep_names = {f"{keep}.zip", f"{keep}.zip.part"} if keep else set()
        for path in self.downloads.iterdir():
            if path.name not in keep_names:
                with contextlib.suppress(OSError):
                    path.unlink()
