"""The on-disk store under ``<install_dir>/.store/ota``: its folders, atomic writes and the lock.

Layout::

    state.json            the persisted state, written atomically
    lock                  held (flock) by the one process that may download or install
    downloads/V.zip       a verified release; V.zip.part while it downloads
    current/              the unpacked release being (or last) installed
    current.version       whose files current/ holds (absent while it changes)
    installed.zip         the release zip installed last: the base of the next delta
    update.sh.exit        the exit status of the last update.sh (rollback.sh.exit alike)
    logs/V.log            output of update.sh / rollback.sh for version V
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import logging
import os
import threading
from pathlib import Path
from typing import IO, Any

from connhex_edge_ota.release import check_version

log = logging.getLogger(__name__)


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


@functools.cache
def _libc_call(name: str, *argtypes: type[ctypes._SimpleCData[Any]]) -> Any:
    """The C library's function ``name`` taking ``argtypes`` and returning an int (errno
    kept), looked up once; None where libc lacks it."""
    try:
        call = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    call.argtypes, call.restype = argtypes, ctypes.c_int
    return call


def sync_filesystem(path: Path) -> None:
    """Make everything written on ``path``'s filesystem durable: ``syncfs``, not ``sync``
    (other filesystems of the device are left alone); ``os.sync`` where libc lacks it."""
    syncfs = _libc_call("syncfs", ctypes.c_int)
    if syncfs is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if syncfs(fd) != 0:
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error))
    finally:
        os.close(fd)


_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``length`` bytes of ``fd`` from ``offset`` to disk,
    without waiting (``sync_file_range(SYNC_FILE_RANGE_WRITE)``), so that a later
    fsync or syncfs has less left to wait for. Durability still comes from those;
    where libc lacks the call, this does nothing."""
    call = _libc_call(
        "sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint
    )
    if call is not None:
        call(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


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
        self.current_version_file = root / "current.version"
        """Which release's files ``current/`` holds, written once it is whole."""
        self.installed_zip = root / "installed.zip"
        """The release zip installed last, kept for the next delta (dropped when space is short)."""
        self._lock_file: IO[bytes] | None = None

    def create(self) -> None:
        for folder in (self.root, self.downloads, self.logs):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)

    def zip_path(self, version: str) -> Path:
        return self.downloads / f"{check_version(version)}.zip"

    def log_path(self, version: str) -> Path:
        return self.logs / f"{check_version(version)}.log"

    def exit_file(self, script: str) -> Path:
        """Where the script wrapper records the exit status of ``script`` (``update.sh.exit``)."""
        return self.root / f"{script}.exit"

    def staging(self) -> tuple[Path, Path]:
        """The folders an unpack builds in and sets aside (``current/`` is replaced whole)."""
        return self.root / ".current.new", self.root / ".current.old"

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
