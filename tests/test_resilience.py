"""The real service under power cuts, full disks, failing servers, TLS and secrets."""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from connhex_edge_ota.server import ReleaseServer
from connhex_edge_ota.testing import OtaAgent, StatusWatcher
from tests.conftest import read_calls, wait_until

pytestmark = pytest.mark.reliability

MIB = 1024 * 1024


def payload_release(make_release: Callable[..., Path], version: str, size: int) -> Path:
    return make_release(version, files={"payload.bin": os.urandom(size)})


def part_size(agent: OtaAgent) -> int:
    parts = list((agent.store / "downloads").glob("*.part"))
    return parts[0].stat().st_size if parts else 0


def sent_by_gets(server: ReleaseServer) -> int:
    return sum(r.sent for r in server.releases.requests if r.method == "GET")


def test_kill_9_mid_download_then_restart_resumes(
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
    statuses: StatusWatcher,
) -> None:
    """kill -9 at 90 % of a download: the restart resumes with Range to update_ready.

    At most 10 % of the release plus 1 MiB is fetched twice."""
    release = payload_release(make_release, "4.0.0", 8 * MIB)
    size = release.stat().st_size
    release_server.releases.publish(release)
    release_server.faults.rate = 4 * MIB  # two seconds for the whole file
    agent = ota_agent(auto_download=True)
    wait_until(lambda: part_size(agent) >= 0.9 * size)
    agent.kill()
    release_server.faults.rate = None

    ota_agent(auto_download=True)
    statuses.wait_status("update_ready")

    refetched = sent_by_gets(release_server) - size
    assert refetched <= 0.1 * size + MIB, f"{refetched} bytes fetched twice"
    ranges = [r.headers.get("Range") for r in release_server.releases.requests if r.method == "GET"]
    assert ranges[0] is None and ranges[-1] is not None and ranges[-1].startswith("bytes=")


def test_server_errors_back_off_honouring_retry_after(
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    statuses: StatusWatcher,
) -> None:
    """A 503 with Retry-After: 2 is check_failed; the retry waits >= 1.5 s, not the 100 ms floor."""
    release_server.faults.fail_next = 1
    release_server.faults.retry_after = "2"
    ota_agent(retry_floor="100ms", check_interval="1h")
    failed = statuses.wait_status("check_failed")
    assert failed.error == "server answered 503 Service Unavailable"
    at = time.monotonic()
    statuses.wait_status("updated", after=statuses.statuses.index(failed), timeout=10)
    assert time.monotonic() - at >= 1.5  # Retry-After: 2 wins over the 100 ms floor


def test_corrupt_state_at_startup_is_set_aside_and_the_service_goes_on(
    ota_agent: Callable[..., OtaAgent], statuses: StatusWatcher, tmp_path: Path
) -> None:
    """A corrupt state.json at start is set aside and reported; the service goes on to "updated"."""
    store = tmp_path / "opt-connhex" / ".store" / "ota"
    store.mkdir(parents=True)
    (store / "state.json").write_bytes(b'{"current_version": "1.0.0", "sta')
    agent = ota_agent()
    first = statuses.wait_status("checking")
    assert "state.json was corrupt" in first.error
    statuses.wait_status("updated")
    assert len(list(store.glob("state.json.corrupt-*"))) == 1
    assert json.loads((store / "state.json").read_text())["status"] == "updated"
    assert agent.process is not None and agent.process.poll() is None


def test_full_disk_mid_download_keeps_the_partial_and_recovers(
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
    statuses: StatusWatcher,
    tmp_path: Path,
) -> None:
    """Disk full mid-download: download_failed "no space left", partial kept, resumed to ready.

    On a small tmpfs filled while downloading, or under a file size limit where mounting is
    not allowed; the resume's Range starts at most at the kept size."""
    release = payload_release(make_release, "5.0.0", 4 * MIB)
    release_server.releases.publish(release)
    install_dir = tmp_path / "small-disk"
    install_dir.mkdir()
    # A real small filesystem when this machine lets us mount one; TEST_NO_MOUNT
    # forces the file-size-limit variant (to test that path here too).
    mounted = not os.environ.get("TEST_NO_MOUNT") and (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(install_dir)],
            capture_output=True,
        ).returncode
        == 0
    )
    try:
        if mounted:
            # Fill the disk while the download runs: the check before it passed.
            release_server.faults.rate = 2 * MIB
            agent = ota_agent(auto_download=True, install_dir=str(install_dir), retry_floor="300ms")
            filler = install_dir / "filler"
            wait_until(lambda: part_size(agent) > MIB)
            with filler.open("wb") as file, contextlib.suppress(OSError):
                file.write(b"\0" * 6 * MIB)
            failed = statuses.wait_status("download_failed")
            assert "no space left on device" in failed.error
            assert part_size(agent) > MIB  # the partial file is kept
            kept = part_size(agent)
            release_server.faults.rate = None
            filler.unlink()
        else:  # no mount here: a file size limit makes writes fail the same way
            agent = ota_agent(
                auto_download=True, install_dir=str(install_dir), file_size_limit=2 * MIB
            )
            failed = statuses.wait_status("download_failed")
            assert "no space left on device" in failed.error
            kept = part_size(agent)
            assert kept > MIB
            agent.stop()
            agent = ota_agent(auto_download=True, install_dir=str(install_dir))
        statuses.wait_status("update_ready", timeout=30)
        range_header = release_server.releases.requests[-1].headers.get("Range", "")
        assert range_header.startswith("bytes=") and int(range_header[6:-1]) <= kept
    finally:
        for a in (agent,):
            if a.process is not None and a.process.poll() is None:
                a.kill()
        if mounted:
            subprocess.run(["umount", "-l", str(install_dir)], check=False)


def test_init_key_never_leaks(
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
    statuses: StatusWatcher,
    tmp_path: Path,
) -> None:
    """The init key reaches the server, never the agent log, CLI output, store files or statuses."""
    secret = "s3cr3t-init-key-4711"
    release_server.releases.init_key = secret
    release_server.releases.publish(make_release("6.0.0", update_sh="exit 3\n"))
    agent = ota_agent(init_key=secret, auto_install=True)
    statuses.wait_status("update_failed")
    agent.stop()
    status = subprocess.run(
        [sys.executable, "-m", "connhex_edge_ota", "status", "--config", str(agent.config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert status.returncode == 0 and json.loads(status.stdout)["current_version"] == "1.0.0"
    store_text = "".join(
        p.read_text(errors="replace")
        for p in agent.store.rglob("*")
        if p.is_file() and p.suffix in (".json", ".log")
    )
    for text in (
        agent.output(),
        status.stdout,
        status.stderr,
        store_text,
        json.dumps([s.payload() for s in statuses.statuses]),
    ):
        assert secret not in text
    # ... while the server did receive it.
    assert release_server.releases.requests[0].headers["Authorization"] == f"Thing {secret}"


def test_wrong_init_key_waits_the_whole_interval(
    ota_agent: Callable[..., OtaAgent], release_server: ReleaseServer, statuses: StatusWatcher
) -> None:
    """A 401 (wrong init key) waits the check interval (>= 1.8 s of 2 s), not the retry floor."""
    release_server.releases.init_key = "right"
    ota_agent(init_key="wrong", check_interval="2s", retry_floor="50ms", check_jitter=0)
    first = statuses.wait_status("check_failed")
    assert first.error.startswith("server answered 401")
    at = time.monotonic()
    statuses.wait_status("checking", after=statuses.statuses.index(first))
    assert time.monotonic() - at >= 1.8  # not retried at the 50 ms floor


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[ReleaseServer, Path, Path, Path]]:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    ca.configure_trust(context)
    context.verify_mode = ssl.CERT_REQUIRED  # mTLS: the device must show a certificate
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    client = ca.issue_cert("device-1")
    client_cert, client_key = tmp_path / "client.pem", tmp_path / "client.key"
    client.cert_chain_pems[0].write_to_path(str(client_cert))
    client.private_key_pem.write_to_path(str(client_key))
    folder = tmp_path / "tls-releases"
    folder.mkdir()
    with ReleaseServer(folder, tls=context) as server:
        yield server, ca_file, client_cert, client_key


def test_tls_is_verified_and_mtls_works(
    ota_agent: Callable[..., OtaAgent],
    tls_server: tuple[ReleaseServer, Path, Path, Path],
    make_release: Callable[..., Path],
    statuses: StatusWatcher,
) -> None:
    """An untrusted server CA: "TLS error"; with that CA and a client cert (mTLS) it updates."""
    server, ca_file, cert, key = tls_server
    server.releases.publish(make_release("7.0.0"))
    agent = ota_agent(server_url=server.url)  # the system CAs do not know ours
    assert statuses.wait_status("check_failed").error.startswith("TLS error")
    agent.stop()
    mark = statuses.mark()
    ota_agent(
        server_url=server.url,
        ca_file=str(ca_file),
        cert_file=str(cert),
        key_file=str(key),
        auto_install=True,
    )
    statuses.wait_updated("7.0.0", after=mark)


def test_cli_step_while_the_service_holds_the_store(
    ota_agent: Callable[..., OtaAgent], statuses: StatusWatcher
) -> None:
    """A CLI check goes to the running service; NATS unreachable: exit 1, "busy" and the pid."""
    agent = ota_agent()
    statuses.wait_status("updated")
    forwarded = subprocess.run(
        [sys.executable, "-m", "connhex_edge_ota", "check", "--config", str(agent.config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert forwarded.returncode == 0, forwarded.stderr
    assert json.loads(forwarded.stdout)["status"]["status"] == "updated"
    unreachable = subprocess.run(
        [sys.executable, "-m", "connhex_edge_ota", "download", "--config", str(agent.config)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "CONNHEX_OTA_NATS_URL": "nats://127.0.0.1:9"},
    )
    assert unreachable.returncode == 1
    assert "busy: the store" in unreachable.stderr and "pid" in unreachable.stderr


def test_progress_hook_rate_is_bounded_and_cli_prints_plain_lines(
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
    dummy_log: Path,
) -> None:
    """Progress hook calls stay within 5/s (+2), end at the full size; the CLI prints "(100%)"."""
    release = payload_release(make_release, "8.0.0", 4 * MIB)
    release_server.releases.publish(release)
    release_server.faults.rate = 4 * MIB  # about one second
    agent = ota_agent(plugins=["dummy-veto"])
    agent.stop()
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "connhex_edge_ota", "download", "--config", str(agent.config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "CONNHEX_DUMMY_LOG": str(dummy_log), "CONNHEX_OTA_PROGRESS_RATE": "5"},
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["status"]["status"] == "update_ready"
    assert "downloaded" in result.stderr and "(100%)" in result.stderr
    calls = [c for c in read_calls(dummy_log) if c["hook"] == "ota_on_progress"]
    assert calls[-1]["downloaded"] == calls[-1]["total"] == release.stat().st_size
    assert 2 <= len(calls) <= 5 * elapsed + 2


def test_agent_updates_while_nats_is_down_and_reports_once_it_is_up(
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
) -> None:
    """With NATS down the agent still updates to 9.9.0; once NATS is up it reports 9.9.0."""
    from connhex_edge_ota.natsserver import NatsServer, free_port

    release_server.releases.publish(make_release("9.9.0"))
    late = NatsServer(port=free_port())
    agent = ota_agent(auto_install=True, nats_url=late.url)
    state = agent.store / "state.json"
    wait_until(lambda: state.exists() and json.loads(state.read_text())["status"] == "updated")
    assert json.loads(state.read_text())["current_version"] == "9.9.0"
    with late:
        watcher = StatusWatcher(late.url).start()
        try:
            beat = watcher.wait_status("updated", timeout=15)  # heartbeats resume
            assert beat.current_version == "9.9.0"
            assert watcher.request("status")["status"]["current_version"] == "9.9.0"
        finally:
            watcher.close()


def test_a_newer_release_replaces_a_partial_download_of_the_old_one(
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
    statuses: StatusWatcher,
) -> None:
    """A newer release replaces the old one's partial: fetched whole (200), only 11.0.1.zip left."""
    release_server.releases.publish(payload_release(make_release, "11.0.0", 2 * MIB))
    release_server.faults.cut_at = MIB
    agent = ota_agent(auto_download=True, retry_floor="1h")  # no automatic retry here
    statuses.wait_status("download_failed")
    assert (agent.store / "downloads" / "11.0.0.zip.part").exists()
    # A newer release is published between the command's check and its GET.
    release_server.faults.swap_after_head = payload_release(make_release, "11.0.1", MIB)
    mark = statuses.mark()
    # An operator's download checks first: it fetches the new one, from its start.
    reply = statuses.request("download")
    assert reply["ok"] is True and reply["status"]["status"] == "update_ready"
    last = [r for r in release_server.releases.requests if r.method == "GET"][-1]
    assert last.status == 200 and "Range" not in last.headers
    ready = statuses.wait_status("update_ready", after=mark)
    assert ready.latest_version == "11.0.1"
    assert sorted(p.name for p in (agent.store / "downloads").iterdir()) == ["11.0.1.zip"]
