"""The install journal and the edges around it: corrupt archives, corrupt state, values that
pass validation but break later, and a loop that never dies silently."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from connhex_edge_ota.config import ConfigError, load_settings
from connhex_edge_ota.server import ReleaseServer
from connhex_edge_ota.state import Install, Journal, Phase, State, load_state
from connhex_edge_ota.store import Store
from connhex_edge_ota.testing import OtaAgent, StatusWatcher

MIB = 1024 * 1024


# Corrupt archives: each a refusal before anything runs, counted as a failed attempt.


def stored_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def data_offset(path: Path, name: str) -> int:
    """Where the bytes of member ``name`` start (after its local header)."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(name)
    raw = path.read_bytes()
    name_len, extra_len = struct.unpack_from("<HH", raw, info.header_offset + 26)
    return int(info.header_offset + 30 + name_len + extra_len)


def bad_crc(path: Path, ran: Path) -> Path:
    stored_zip(path, {"update.sh": f'touch "{ran}"\n'.encode(), "payload.bin": b"A" * 4096})
    raw = bytearray(path.read_bytes())
    raw[data_offset(path, "payload.bin") + 100] ^= 0xFF  # the data no longer matches its CRC
    path.write_bytes(bytes(raw))
    return path


def unsupported_method(path: Path, ran: Path) -> Path:
    stored_zip(path, {"update.sh": f'touch "{ran}"\n'.encode(), "payload.bin": b"B" * 4096})
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("payload.bin")
    struct.pack_into("<H", raw, info.header_offset + 8, 9)  # deflate64, in the local header
    central = raw.rfind(b"PK\x01\x02payload"[:4], 0, len(raw))
    while central != -1:  # and in the central directory entry of payload.bin
        name_len = struct.unpack_from("<H", raw, central + 28)[0]
        if raw[central + 46 : central + 46 + name_len] == b"payload.bin":
            struct.pack_into("<H", raw, central + 10, 9)
            break
        central = raw.rfind(b"PK\x01\x02", 0, central)
    path.write_bytes(bytes(raw))
    return path


def local_header_disagrees(path: Path, ran: Path) -> Path:
    stored_zip(path, {"update.sh": f'touch "{ran}"\n'.encode(), "payload.bin": b"C" * 4096})
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("payload.bin")
    offset = info.header_offset + 30
    raw[offset : offset + 11] = b"payload.BIN"  # the local name differs from the directory's
    path.write_bytes(bytes(raw))
    return path


def lying_sizes(path: Path, ran: Path) -> Path:
    stored_zip(path, {"update.sh": f'touch "{ran}"\n'.encode(), "payload.bin": b"D" * 4096})
    raw = bytearray(path.read_bytes())
    central = raw.rfind(b"PK\x01\x02")  # the last entry: payload.bin
    struct.pack_into("<I", raw, central + 24, 16)  # uncompressed size: 16, not 4096
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.reliability
@pytest.mark.parametrize(
    "craft",
    [bad_crc, unsupported_method, local_header_disagrees, lying_sizes],
    ids=lambda craft: craft.__name__,
)
def test_corrupt_archive_is_refused_before_anything_runs_and_counted(
    craft: Callable[[Path, Path], Path],
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    statuses: StatusWatcher,
    tmp_path: Path,
) -> None:
    """A corrupt archive ends in update_failed "release refused: ...", and nothing runs."""
    ran = tmp_path / "ran"
    release_server.releases.publish(craft(tmp_path / "fw-7.0.0.zip", ran))
    agent = ota_agent(auto_install=True)
    failed = statuses.wait_status("update_failed")
    assert failed.error.startswith("release refused: ")
    assert failed.current_version == "1.0.0"
    assert not ran.exists()
    # Counted: the next round reports it without trying again.
    mark = statuses.mark()
    assert statuses.request("check")["ok"] is True
    again = statuses.wait_status("update_failed", after=mark)
    assert "failed 1 time(s)" in again.error
    assert not ran.exists()
    state, warning = load_state(Store(agent.store))
    assert warning == "" and state.install is None


# state.json whose fields are out of range: corrupt, moved aside, never acted on.


def install_record(**fields: object) -> dict[str, object]:
    record: dict[str, object] = {"version": "2.0.0", "previous_version": "1.0.0"}
    record.update(fields)
    return record


@pytest.mark.reliability
@pytest.mark.parametrize(
    ("content", "named"),
    [
        ({"install": install_record(phase="script_started", pgid=1)}, "install.pgid"),
        ({"install": install_record(phase="script_started", pgid=-42)}, "install.pgid"),
        ({"install": install_record(version="../../etc")}, "install.version"),
        ({"install": install_record(phase="reticulating")}, "install.phase"),
        ({"current_version": "a/b"}, "current_version"),
        ({"failures": {"..": {"attempts": 1}}}, "failures"),
        ({"partial": {"version": "2", "etag": "", "digest": "", "size": -1}}, "partial.size"),
    ],
)
def test_out_of_range_state_is_set_aside_and_never_acted_on(
    tmp_path: Path, content: dict[str, object], named: str
) -> None:
    """A state.json with pgid <= 1 or an unsafe version is corrupt: moved aside, reported."""
    store = Store(tmp_path / "ota")
    store.create()
    store.state_file.write_text(json.dumps(content))
    state, warning = load_state(store)
    assert state == State()
    assert warning.startswith(f"state.json was corrupt ({named}")
    assert len(list(store.root.glob("state.json.corrupt-*"))) == 1


def test_a_recorded_group_is_forgotten_when_its_script_ends(tmp_path: Path) -> None:
    from connhex_edge_ota.release import Release

    journal = Journal(Store(tmp_path / "ota"))
    journal.open("1.0.0")
    journal.begin_install(Release(version="2.0.0", size=1, digest="d"))
    journal.unpacked()
    journal.script_started(Phase.SCRIPT_STARTED, 4242, 99)
    assert journal.state.install is not None and journal.state.install.pgid == 4242
    journal.script_exited(0, "", restart=False)
    assert journal.state.install.pgid == 0 and journal.state.install.start_ticks == 0
    saved, _ = load_state(journal.store)
    assert saved.install == journal.state.install
    with pytest.raises(ValueError, match="pgid"):
        Install(version="2.0.0", pgid=1)


# The loop never dies silently.


@pytest.mark.reliability
def test_an_unexpected_error_in_install_is_a_status_and_the_loop_goes_on(
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
    statuses: StatusWatcher,
    tmp_path: Path,
) -> None:
    """An unexpected exception in a step: logged once at ERROR, a failure status, loop alive."""
    # update.sh makes rollback.sh's exit file a folder: the rollback cannot even start.
    breaks = 'mkdir "$CHX_OTA_PAYLOAD_DIR/../rollback.sh.exit"\nexit 3\n'
    release_server.releases.publish(make_release("8.0.0", update_sh=breaks, rollback_sh="true\n"))
    agent = ota_agent(auto_install=True)
    failed = statuses.wait_status("update_failed")
    assert failed.error.startswith("install failed: IsADirectoryError")
    assert agent.output().count("ERROR connhex_edge_ota.service: install failed unexpectedly") == 1
    assert "finishing 8.0.0 by its journal failed" in agent.output()  # recovery was tried
    reply = statuses.request("status")
    assert reply["ok"] is True and reply["status"]["status"] == "update_failed"
    mark = statuses.mark()
    assert statuses.request("check")["ok"] is True  # the loop still runs steps
    statuses.wait_status("update_failed", after=mark)
    state, warning = load_state(Store(agent.store))
    assert warning == "" and state.install is None and state.current_version == "1.0.0"


@pytest.mark.reliability
def test_a_recovery_that_fails_is_reported_and_the_loop_goes_on(
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    statuses: StatusWatcher,
    tmp_path: Path,
) -> None:
    """recover() raising: update_failed with a non-empty error, then the loop checks as usual."""
    store = tmp_path / "opt-connhex" / ".store" / "ota"
    (store / "current").mkdir(parents=True)
    (store / "current" / "rollback.sh").write_text("true\n")
    (store / "current.version").write_text("2.0.0")
    (store / "rollback.sh.exit").mkdir(parents=True)  # rollback.sh's exit file: a folder
    record = install_record(phase="script_exited", code=3, error="update.sh exited with 3")
    state = {"current_version": "1.0.0", "install": record}
    (store / "state.json").write_text(json.dumps(state))
    ota_agent()
    failed = statuses.wait_status("update_failed")
    assert failed.error.startswith("recover failed: IsADirectoryError")
    assert "rollback.sh.exit" in failed.error
    statuses.wait_status("updated", after=statuses.statuses.index(failed))
    saved, _ = load_state(Store(store))
    assert saved.install is None and saved.failures["2.0.0"].attempts == 1


# Values that pass validation but would break later are refused at the edge.


@pytest.mark.reliability
@pytest.mark.parametrize(
    ("headers", "error"),
    [
        ({"Content-Length": "-5"}, "refused release 9.0.0: invalid Content-Length: '-5'"),
        ({"Content-Length": "1e3"}, "refused release 9.0.0: invalid Content-Length: '1e3'"),
        ({"Version": "é" * 128}, "refused release: version longer than 128 bytes"),
        ({"Version": "1.0\x7f"}, "holds a control character"),
        ({"Content-Length": "\u00b2"}, "refused release 9.0.0: invalid Content-Length"),
    ],
    ids=["negative-length", "exponent-length", "long-version", "control-version", "superscript"],
)
def test_headers_that_make_no_offer_are_check_failed(
    headers: dict[str, str],
    error: str,
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
    statuses: StatusWatcher,
) -> None:
    """A HEAD whose headers cannot become an offer: check_failed with a short error."""
    release_server.releases.publish(make_release("9.0.0"))
    release_server.faults.head_headers = headers
    ota_agent(auto_download=True)
    failed = statuses.wait_status("check_failed")
    assert error in failed.error


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ("stall_timeout = '1e10'", "[ota] stall_timeout = '1e10'"),
        ("connect_timeout = '3000000h'", "[ota] connect_timeout = '3000000h'"),
        ("check_interval = 1e300", "[ota] check_interval = 1e+300"),
        ("heartbeat_interval = '1ns'", "[ota] heartbeat_interval = '1ns': shorter than 10ms"),
        ("init_key = 'ключ'", "[ota] init_key = <secret>"),
        ("initial_version = 'версия'", "[ota] initial_version = 'версия'"),
        ("initial_version = '" + "x" * 129 + "'", "[ota] initial_version"),
    ],
)
def test_values_that_break_later_are_config_errors(tmp_path: Path, body: str, named: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(f"[ota]\nserver_url = 'http://127.0.0.1:9'\ninit_id = 'd'\n{body}\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert named in str(caught.value)
    result = subprocess.run(
        [sys.executable, "-m", "connhex_edge_ota", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and "Traceback" not in result.stderr


def test_update_sh_never_starts_without_its_log(
    ota_agent: Callable[..., OtaAgent],
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
    statuses: StatusWatcher,
    tmp_path: Path,
) -> None:
    """A script log that cannot be written: update.sh does not start, and it is retried."""
    ran = tmp_path / "ran"
    release_server.releases.publish(make_release("8.1.0", update_sh=f'touch "{ran}"\n'))
    logs = tmp_path / "opt-connhex" / ".store" / "ota" / "logs"
    (logs / "8.1.0.log").mkdir(parents=True)
    agent = ota_agent(auto_install=True)
    failed = statuses.wait_status("update_failed")
    assert failed.error.startswith("cannot write the script log: ")
    assert "will try again" in failed.error and not ran.exists()
    state, _ = load_state(Store(agent.store))
    assert state.install is None and "8.1.0" not in state.failures


@pytest.mark.parametrize("init_id", [".", ".."])
def test_an_init_id_that_is_no_path_segment_is_refused(init_id: str) -> None:
    with pytest.raises(ConfigError, match="name no device"):
        load_settings(None, server_url="http://127.0.0.1:9", init_id=init_id)
