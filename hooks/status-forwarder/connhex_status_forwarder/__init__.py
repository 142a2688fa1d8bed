"""Forwards OTA statuses: to a NATS subject (JSON or SenML) and/or a JSON-lines file.

Configured from the ``[status_forwarder]`` table of ``agent.toml``::

    [status_forwarder]
    subject = "events.data"     # "" to not publish
    format = "senml"            # or "json" (the five-key payload)
    file = "/var/log/connhex/ota-status.jsonl"   # optional
    only_changes = true         # skip heartbeats that repeat the last status
    name = "ota"                # SenML base name prefix (RFC 8428 name characters)

Each SenML pack carries the time of the status (``bt``), not of its forwarding.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator

from connhex_edge_ota import hookimpl
from connhex_edge_ota.config import load_table, plugin_table
from connhex_edge_ota.lifecycle import Agent, MessageBus
from connhex_edge_ota.status import Status

TABLE = "status_forwarder"
SENML_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-:./_]*")
"""RFC 8428 section 4.5.1: a name starts with a letter or digit; then also - : . / _"""
PUBLISH_TIMEOUT = 5.0


class ForwarderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    subject: str = "events.data"
    format: Literal["senml", "json"] = "senml"
    file: Path | None = None
    only_changes: bool = True
    name: str = "ota"

    @field_validator("name")
    @classmethod
    def _senml_name(cls, value: str) -> str:
        if not SENML_NAME.fullmatch(value):
            raise ValueError(
                "must be a SenML name (RFC 8428): a letter or digit first, then letters, "
                "digits and - : . / _"
            )
        return value


def load_config(table: dict[str, Any]) -> ForwarderConfig:
    return load_table(ForwarderConfig, TABLE, table)


def senml(status: Status, name: str, now: float) -> list[dict[str, Any]]:
    """The status as a SenML pack (RFC 8428): one string record per payload key."""
    records: list[dict[str, Any]] = [
        {"bn": f"{name}:", "bt": now, "n": key, "vs": value}
        for key, value in status.payload().items()
    ]
    for record in records[1:]:
        del record["bn"], record["bt"]
    return records


class StatusForwarder:
    def __init__(self) -> None:
        self.config = ForwarderConfig()
        self._bus: MessageBus | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last: Status | None = None
        self._lock = threading.Lock()

    @hookimpl
    def agent_configure(self, agent: Agent) -> None:
        self.config = load_config(plugin_table(agent.config_path, TABLE))

    @hookimpl
    def agent_start(self, agent: Agent) -> None:
        self._bus = agent.bus
        self._loop = asyncio.get_running_loop()

    def encode(self, status: Status) -> bytes:
        if self.config.format == "json":
            return json.dumps(status.payload()).encode()
        return json.dumps(senml(status, self.config.name, status.at)).encode()

    @hookimpl
    def ota_on_status(self, status: Status) -> None:
        # Called from a worker thread: statuses may arrive from two at once.
        with self._lock:
            if self.config.only_changes and status == self._last:
                return
            self._last = status
            if self.config.file is not None:
                with self.config.file.open("a") as file:
                    file.write(json.dumps(status.payload()) + "\n")
            if self.config.subject and self._bus is not None and self._loop is not None:
                publish = self._bus.publish(self.config.subject, self.encode(status))
                asyncio.run_coroutine_threadsafe(publish, self._loop).result(PUBLISH_TIMEOUT)


plugin = StatusForwarder()
