"""A third-party plugin steered by environment variables, for end-to-end tests.

- ``CONNHEX_DUMMY_VETO_INSTALL``: when set, ``ota_pre_install`` returns it (a veto);
- ``CONNHEX_DUMMY_VETO_DOWNLOAD``: the same for ``ota_pre_download``;
- ``CONNHEX_DUMMY_UNHEALTHY``: when set, ``ota_post_install`` returns it;
- ``CONNHEX_DUMMY_RAISE``: hook names (comma-separated) whose implementation raises;
- ``CONNHEX_DUMMY_SLEEP``: seconds a hook sleeps first (a slow plugin), for the
  hooks named in ``CONNHEX_DUMMY_SLEEP_HOOKS`` (comma-separated; default all);
- ``CONNHEX_DUMMY_LOG``: a file that gets one JSON line per call.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from connhex_edge_ota import hookimpl


def _record(hook: str, **fields: Any) -> None:
    path = os.environ.get("CONNHEX_DUMMY_LOG")
    if path:
        with open(path, "a") as file:
            file.write(json.dumps({"hook": hook, **fields}) + "\n")


def _common(hook: str) -> None:
    slow = os.environ.get("CONNHEX_DUMMY_SLEEP_HOOKS", "")
    if not slow or hook in slow.split(","):
        time.sleep(float(os.environ.get("CONNHEX_DUMMY_SLEEP", "0")))
    if hook in os.environ.get("CONNHEX_DUMMY_RAISE", "").split(","):
        raise RuntimeError(f"{hook} raised on purpose")


@hookimpl
def ota_pre_download(release: Any) -> str | None:
    _record("ota_pre_download", version=release.version)
    _common("ota_pre_download")
    return os.environ.get("CONNHEX_DUMMY_VETO_DOWNLOAD") or None


@hookimpl
def ota_pre_install(release: Any) -> str | None:
    _record("ota_pre_install", version=release.version)
    _common("ota_pre_install")
    return os.environ.get("CONNHEX_DUMMY_VETO_INSTALL") or None


@hookimpl
def ota_post_install(release: Any) -> str | None:
    _record("ota_post_install", version=release.version, workdir=str(release.workdir))
    _common("ota_post_install")
    return os.environ.get("CONNHEX_DUMMY_UNHEALTHY") or None


@hookimpl
def ota_on_status(status: Any) -> None:
    _record("ota_on_status", status=status.status)
    _common("ota_on_status")


@hookimpl
def ota_on_progress(release: Any, downloaded: int, total: int) -> None:
    _record("ota_on_progress", downloaded=downloaded, total=total)
    _common("ota_on_progress")
