"""The OTA hooks: the contract between the update loop and other plugins.

Every hook is synchronous and called with keyword arguments. The service calls
them off the event loop, each plugin in its own bounded worker
(:mod:`connhex_edge_ota.hooks`), with a per-call time limit (``hook_timeout``),
so a slow plugin never freezes heartbeats or commands. A plugin with an
``async def`` hook or a wrapper (``wrapper=True``/``hookwrapper=True``) on an
OTA hook is refused at load, by name: each plugin is asked on its own, so a
wrapper would wrap nothing.

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

    Every plugin is asked; any veto wins. The download is deferred to the next
    check, the status becomes ``update_available`` and ``error`` reads
    ``download vetoed by <plugin>: <reason>`` (several vetoes joined by ``"; "``).

    :param release: the offered release; ``release.path`` is where the zip will
        be written, ``release.workdir`` is ``None``.
    :return: ``None`` to allow the download; a non-empty string to veto it (the
        reason). Raising, not answering within ``hook_timeout`` or returning
        anything else counts as a veto.
    """


@hookspec
def ota_pre_install(release: Release) -> str | None:
    """Fires before ``update.sh`` of ``release`` runs, after the download is verified.

    Every plugin is asked; any veto wins. On a veto nothing is unpacked or run,
    the install is deferred to the next check, the status stays
    ``update_ready`` and ``error`` reads ``install vetoed by <plugin>: <reason>``.
    An operator's explicit install (``commands.ota.install`` or
    ``connhex-edge-ota install``) asks this hook too, after ``agent_configure``.

    :param release: the downloaded, verified release; ``release.path`` is the zip.
    :return: ``None`` to allow the install; a non-empty string to veto it (the
        reason). Raising, not answering within ``hook_timeout`` or returning
        anything else counts as a veto.
    """


@hookspec
def ota_post_install(release: Release) -> str | None:
    """Fires after ``update.sh`` succeeded (exit 0 or 10), before the new version is recorded.

    This is the health gate; every plugin is asked. On a failure ``rollback.sh``
    runs when the release has one, the current version stays, the status
    becomes ``update_failed`` and ``error`` reads
    ``health check failed: <plugin>: <reason>`` (then ``; rolled back`` when a
    ``rollback.sh`` ran).

    :param release: the installed release; ``release.workdir`` is the unpacked folder.
    :return: ``None`` when the device is healthy; a non-empty string to fail the
        update (the reason). Raising, not answering within ``hook_timeout`` or
        returning anything else counts as a failed check.
    """


@hookspec
def ota_on_status(status: Status) -> None:
    """Fires on every status change and on every heartbeat; use it to forward statuses.

    Delivered to each plugin in order, from the plugin's own worker thread:
    a slow plugin never delays the update nor another plugin; when it falls
    behind, its oldest waiting statuses are dropped (the newest always
    arrives). At shutdown the last status is delivered, or abandoned after
    ``hook_timeout``.

    :param status: the five payload fields as attributes, and ``status.at``,
        the time it was reported (Unix time).
    :return: ignored; an exception is logged and ignored.
    """


@hookspec
def ota_on_progress(release: Release, downloaded: int, total: int) -> None:
    """Fires during a download, at most ``progress_rate`` times a second, and once at the end.

    Never awaited: an event a slow plugin has not taken yet is replaced by the
    newest, so the last one (``downloaded == total``) always arrives.

    :param release: the release being downloaded.
    :param downloaded: bytes on disk (a resumed download starts above zero).
    :param total: the release size in bytes.
    :return: ignored; an exception is logged and ignored.
    """
