"""Named points where a test makes the service kill itself (``kill -9``), to prove recovery.

A test hook, documented as such: when ``CONNHEX_OTA_TEST_KILL_POINT`` names a
point (``install_unpacking``) or its n-th passage (``download_checkpoint@2``),
the process sends itself SIGKILL there, exactly as a power cut or an OOM kill
would stop it, with no chance to clean up. Unset (always, outside tests),
:func:`reached` costs one dictionary lookup. :data:`POINTS` lists every point;
the kill-point matrix in ``tests/test_killpoints.py`` covers each of them.
"""

from __future__ import annotations

import os
import signal

ENV = "CONNHEX_OTA_TEST_KILL_POINT"

POINTS = (
    "download_started",
    "download_checkpoint",
    "download_verified",
    "download_renamed",
    "install_recorded",
    "unpack_member",
    "unpack_staged",
    "unpack_swapped",
    "install_unpacked",
    "script_recorded",
    "script_running",
    "script_output",
    "script_exited",
    "script_exit_recorded",
    "health_checking",
    "health_asked",
    "health_recorded",
    "rollback_recorded",
    "rollback_running",
    "rollback_output",
    "rollback_exited",
    "install_finishing",
    "install_finished",
)

_passed: dict[str, int] = {}


def reached(point: str) -> None:
    """Kill this process with SIGKILL when the test hook names ``point`` (see the module)."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    assert point in POINTS, point
    name, _, nth = wanted.partition("@")
    if name != point:
        return
    _passed[point] = _passed.get(point, 0) + 1
    if _passed[point] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
