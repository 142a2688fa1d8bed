"""nginx as the device endpoint, for benchmarks and tests: ``/iot/ota/<id>`` answers with
one release file, the way a production HTTP server does (its own ``ETag``, ``If-Match``
and ``Range``), plus the device API's ``Version`` and ``Content-Digest`` headers."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from connhex_edge_ota.digest import format_content_digest
from connhex_edge_ota.natsserver import free_port, wait_listening


def nginx_binary() -> str | None:
    """nginx on PATH or where Debian puts it (``/usr/sbin`` is not on every PATH); None."""
    found = shutil.which("nginx")
    if found is None and os.access("/usr/sbin/nginx", os.X_OK):
        found = "/usr/sbin/nginx"
    return found


@contextmanager
def nginx_endpoint(
    binary: str,
    release: Path,
    version: str,
    folder: Path,
    *,
    max_ranges: int | None = None,
    access_log: bool = True,
) -> Iterator[str]:
    """The URL of nginx serving ``release`` as ``version``; its config, pid file, logs
    (``folder/access.log``, ``folder/error.log``) live in ``folder``. ``max_ranges=0``
    makes it answer every ``Range`` with the whole file. RuntimeError when it does not
    start (with its error log)."""
    hasher = hashlib.sha256()
    with release.open("rb") as file:
        while block := file.read(1024 * 1024):
            hasher.update(block)
    digest = format_content_digest(hasher.digest())
    port = free_port()
    # As root nginx's workers would drop to nobody, who may not read a private folder.
    user = "user root;" if os.geteuid() == 0 else ""
    ranges = f"max_ranges {max_ranges};" if max_ranges is not None else ""
    log = f"access_log {folder}/access.log;" if access_log else "access_log off;"
    config = folder / "nginx.conf"
    config.write_text(
        textwrap.dedent(
            f"""\
            daemon off;
            {user}
            worker_processes 1;
            pid {folder}/nginx.pid;
            error_log {folder}/error.log;
            events {{ worker_connections 64; }}
            http {{
                {log}
                client_body_temp_path {folder};
                proxy_temp_path {folder};
                fastcgi_temp_path {folder};
                uwsgi_temp_path {folder};
                scgi_temp_path {folder};
                sendfile on;
                server {{
                    listen 127.0.0.1:{port};
                    {ranges}
                    location ~ ^/iot/ota/[^/]+$ {{
                        default_type application/zip;
                        alias {release};
                        add_header Version "{version}" always;
                        add_header Content-Digest "{digest}" always;
                    }}
                }}
            }}
            """
        )
    )
    process = subprocess.Popen(
        [binary, "-c", str(config), "-p", str(folder)],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _started(port, process, folder / "error.log")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


def _started(port: int, process: subprocess.Popen[bytes], error_log: Path) -> None:
    try:
        wait_listening(port, process, "nginx")
    except (RuntimeError, TimeoutError) as exc:
        errors = error_log.read_text().strip()[-500:] if error_log.exists() else ""
        raise RuntimeError(f"{exc}: {errors}") from None
