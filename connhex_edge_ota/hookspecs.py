"""The OTA hooks: the contract between the update loop and other plugins.

Every hook is synchronous and called with keyword arguments. The service calls
them off the event loop (in a worker thread) with a per-hook time limit
(``hook_timeout``), so a slow plugin never freezes heartbeats or commands.

Every plugin is asked, in no meaningful order: a veto from any one of them wins.
A hook that raises, or does not answer within ``hook_timeout``, counts as a veto
(``ota_pre_*``), as a failed health check (``ota_post_install``) or is logged
and ignored (``ota_on_*``). One broken plugin never stops the loop nor another
plugin. A plugin is named by its entry-point name (or the name it was
registered under) in every ``error`` the service reports.

``release`` is a :class:`connhex_edge_ota.release.Release` and ``status`` a
:class:`connhex_edge_ota.status.Status`; both are frozen records, so a plugin
cannot change what the loop does except through its return value.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from connhex_edge_ota import hookspec

if TYPE_CHECKING:
    from connhex_edge_ota.release import Release
    from connhex_edge_ota.status import Status


@hookspec
def ota_pre_download(release: Release) -> str | None:
    """Fires once before a download of ``release`` starts (or resumes).

    ``release.path`` is where the zip will be written; ``release.workdir`` is
    ``None``. Return ``None`` to allow the download. Return a non-empty string
    to veto it: the string is the reason, the download is deferred to the next
    check, the status becomes ``update_available`` and ``error`` reads
    ``"<plugin>: <reason>"``. Raising or timing out counts as a veto.
    """


@hookspec
def ota_pre_install(release: Release) -> str | None:
    """Fires before ``update.sh`` of ``release`` runs, after the download is verified.

    Return ``None`` to allow the install. Return a string to veto it: nothing
    is unpacked or run, the install is deferred to the next check, the status
    stays ``update_ready`` and ``error`` reads ``"<plugin>: <reason>"``. An
    operator's explicit install (``commands.ota.install``) asks this hook too.
    Raising or timing out counts as a veto.
    """


@hookspec
def ota_post_install(release: Release) -> str | None:
    """Fires after ``update.sh`` succeeded (exit 0 or 10), before the new version is recorded.

    ``release.workdir`` is the unpacked release. This is the health gate:
    return ``None`` when the device is healthy. Return a string to fail the
    update: ``rollback.sh`` runs when the release has one, the current version
    stays, the status becomes ``update_failed`` and ``error`` reads
    ``"<plugin>: <reason>"``. Raising or timing out counts as a failed check.
    """


@hookspec
def ota_on_status(status: Status) -> None:
    """Fires on every status change and on every heartbeat.

    ``status`` carries the five payload fields as attributes. The return value
    is ignored; an exception is logged and ignored. Use it to forward statuses.
    """


@hookspec
def ota_on_progress(release: Release, downloaded: int, total: int) -> None:
    """Fires during a download, at most ``progress_rate`` times a second, and once at the end.

    ``downloaded`` counts the bytes on disk (a resumed download starts above
    zero); ``total`` is the release size. The return value is ignored; an
    exception is logged and ignored.
    """
