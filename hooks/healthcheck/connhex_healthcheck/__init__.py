"""A health gate for connhex-edge-ota: checks after ``update.sh``, rollback when they fail.

Configured from the ``[healthcheck]`` table of ``agent.toml``::

    [healthcheck]
    commands = ["systemctl is-active my-service"]   # run with sh -c; exit 0 = healthy
    urls = ["http://127.0.0.1:8080/health"]          # any 2xx = healthy
    retries = 3          # attempts before the update is failed
    interval = "2s"      # wait between attempts
    timeout = "5s"       # limit for each command and each probe
    env = ["MY_APP_URL"] # agent environment variables the commands may see

Commands run with a minimal environment: ``PATH``, ``HOME``, ``LANG``,
``CHX_OTA_VERSION_TARGET`` and the variables ``env`` names, never the rest of
the agent's environment (``CONNHEX_OTA_INIT_KEY`` and other secrets).

Keep ``retries * (interval + timeout)`` below the addon's ``hook_timeout``.
"""

from __future__ import annotations

import os
import subprocess
import time
from typing import Annotated, Any

import requests
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from connhex_edge_ota import hookimpl
from connhex_edge_ota.config import load_table, plugin_table
from connhex_edge_ota.duration import parse_duration
from connhex_edge_ota.lifecycle import Agent
from connhex_edge_ota.release import Release

TABLE = "healthcheck"
Duration = Annotated[float, BeforeValidator(parse_duration)]


class HealthcheckConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    commands: list[str] = Field(default_factory=list)
    urls: list[str] = Field(default_factory=list)
    retries: int = Field(default=3, ge=1)
    interval: Duration = 2.0
    timeout: Duration = 5.0
    env: list[str] = Field(default_factory=list)
    """Names of agent environment variables passed on to the commands."""


def load_config(table: dict[str, Any]) -> HealthcheckConfig:
    return load_table(HealthcheckConfig, TABLE, table)


DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def command_env(release: Release, passed: list[str]) -> dict[str, str]:
    """The environment of a check command: the basics and the names ``passed``, nothing else."""
    env = {
        "PATH": os.environ.get("PATH", DEFAULT_PATH),
        "HOME": os.environ.get("HOME", "/"),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
    }
    env.update({name: os.environ[name] for name in passed if name in os.environ})
    env["CHX_OTA_VERSION_TARGET"] = release.version
    return env


def run_command(
    command: str, timeout: float, release: Release, passed: list[str] | None = None
) -> str:
    """ "" when ``command`` exits 0 within ``timeout``; else why not."""
    env = command_env(release, passed or [])
    try:
        result = subprocess.run(
            ["sh", "-c", command], capture_output=True, timeout=timeout, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        return f"{command!r} timed out"
    if result.returncode != 0:
        last = (result.stderr or result.stdout).decode(errors="replace").strip().splitlines()
        return f"{command!r} exited with {result.returncode}" + (f": {last[-1]}" if last else "")
    return ""


def probe(url: str, timeout: float) -> str:
    """ "" when ``url`` answers 2xx within ``timeout``; else why not."""
    try:
        response = requests.get(url, timeout=timeout)
    except requests.RequestException as exc:
        return f"{url} unreachable ({type(exc).__name__})"
    if not 200 <= response.status_code < 300:
        return f"{url} answered {response.status_code}"
    return ""


class Healthcheck:
    """The plugin: configured per agent, asked after each successful update.sh."""

    def __init__(self) -> None:
        self.config = HealthcheckConfig()

    @hookimpl
    def agent_configure(self, agent: Agent) -> None:
        self.config = load_config(plugin_table(agent.config_path, TABLE))

    def failures(self, release: Release) -> list[str]:
        found = [
            run_command(c, self.config.timeout, release, self.config.env)
            for c in self.config.commands
        ]
        found += [probe(u, self.config.timeout) for u in self.config.urls]
        return [f for f in found if f]

    @hookimpl
    def ota_post_install(self, release: Release) -> str | None:
        failures: list[str] = []
        for attempt in range(self.config.retries):
            if attempt:
                time.sleep(self.config.interval)
            failures = self.failures(release)
            if not failures:
                return None
        return "; ".join(failures)


plugin = Healthcheck()
