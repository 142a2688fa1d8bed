"""Errors that say what to do: each failure against a real loopback server, named by its cause."""

from __future__ import annotations

import datetime
import ssl
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from connhex_edge_ota.client import Server, ServerError
from connhex_edge_ota.config import load_settings
from connhex_edge_ota.natsserver import free_port
from connhex_edge_ota.server import ReleaseServer

trustme = pytest.importorskip("trustme")
KEY = "s3cr3t-never-shown"


def check(tmp_path: Path, server_url: str, **keys: Any) -> str:
    """The error of one check against ``server_url`` (keys may bypass validation)."""
    unchecked = {k: keys.pop(k) for k in list(keys) if k.startswith("_")}
    settings = load_settings(
        None,
        server_url=server_url,
        init_id="dev-1",
        init_key=KEY,
        install_dir=str(tmp_path),
        connect_timeout="2s",
        **keys,
    )
    if unchecked:  # a file changed after start: config validation cannot have seen it
        settings = settings.model_copy(update={k[1:]: v for k, v in unchecked.items()})
    with pytest.raises(ServerError) as raised:
        Server(settings).check("1.0.0")
    message = raised.value.message
    assert KEY not in message
    return message


@pytest.fixture
def ca() -> Any:
    return trustme.CA()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "releases"
    path.mkdir()
    with zipfile.ZipFile(path / "fw-2.0.0.zip", "w") as archive:
        archive.writestr("update.sh", "true\n")
    return path


def tls_server(folder: Path, ca: Any, cert: Any, client_ca: Any = None) -> Iterator[ReleaseServer]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    if client_ca is not None:
        client_ca.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED
    with ReleaseServer(folder, tls=context) as server:
        yield server


def pem(tmp_path: Path, name: str, blob: Any) -> str:
    path = tmp_path / name
    blob.write_to_path(str(path))
    return str(path)


def test_connection_refused_names_the_url(tmp_path: Path) -> None:
    port = free_port()
    assert check(tmp_path, f"http://127.0.0.1:{port}") == (
        f"cannot connect to http://127.0.0.1:{port}: connection refused "
        "(is the server running and the port right?)"
    )


def test_unknown_ca(tmp_path: Path, folder: Path, ca: Any) -> None:
    for server in tls_server(folder, ca, ca.issue_cert("127.0.0.1")):
        message = check(tmp_path, server.url)
        assert message.startswith(f"TLS error with {server.url}: ")
        assert "signed by an unknown CA" in message and "set ca_file" in message


def test_expired_certificate(tmp_path: Path, folder: Path, ca: Any) -> None:
    old = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    cert = ca.issue_cert("127.0.0.1", not_after=old)
    for server in tls_server(folder, ca, cert):
        ca_file = pem(tmp_path, "ca.pem", ca.cert_pem)
        message = check(tmp_path, server.url, ca_file=ca_file)
        assert message == f"TLS error with {server.url}: the server certificate has expired"


def test_certificate_for_another_host(tmp_path: Path, folder: Path, ca: Any) -> None:
    for server in tls_server(folder, ca, ca.issue_cert("updates.example.com")):
        message = check(tmp_path, server.url, ca_file=pem(tmp_path, "ca.pem", ca.cert_pem))
        assert "the server certificate is for another host name" in message


def test_https_against_plain_http(tmp_path: Path, folder: Path) -> None:
    with ReleaseServer(folder) as server:
        url = server.url.replace("http://", "https://")
        message = check(tmp_path, url)
    assert message == (
        f"TLS error with {url}: the server does not speak TLS (use http://, or check the port)"
    )


@pytest.fixture
def mtls(tmp_path: Path, folder: Path, ca: Any) -> Iterator[tuple[ReleaseServer, dict[str, str]]]:
    device, other = ca.issue_cert("device-1"), ca.issue_cert("device-2")
    files = {
        "ca_file": pem(tmp_path, "ca.pem", ca.cert_pem),
        "cert_file": pem(tmp_path, "cert.pem", device.cert_chain_pems[0]),
        "key_file": pem(tmp_path, "key.pem", device.private_key_pem),
        "other_key": pem(tmp_path, "other.pem", other.private_key_pem),
    }
    for server in tls_server(folder, ca, ca.issue_cert("127.0.0.1"), client_ca=ca):
        yield server, files


def test_missing_client_certificate(
    tmp_path: Path, mtls: tuple[ReleaseServer, dict[str, str]]
) -> None:
    server, files = mtls
    message = check(tmp_path, server.url, ca_file=files["ca_file"])
    # The server's alert or its closed handshake, depending on timing: both say what to set.
    assert "client certificate" in message and "set cert_file and key_file" in message
    assert "could not be verified" not in message  # not the server's fault


def test_client_key_not_matching_its_certificate_is_a_local_mistake(
    tmp_path: Path, mtls: tuple[ReleaseServer, dict[str, str]]
) -> None:
    server, files = mtls
    message = check(
        tmp_path,
        server.url,
        ca_file=files["ca_file"],
        cert_file=files["cert_file"],
        key_file=files["key_file"],
        _key_file=Path(files["other_key"]),
    )
    assert message == (
        f"TLS error with {server.url}: key_file does not belong to cert_file "
        "(a local mistake: fix the pair)"
    )


def test_mtls_with_the_right_pair_works(
    tmp_path: Path, mtls: tuple[ReleaseServer, dict[str, str]]
) -> None:
    server, files = mtls
    settings = load_settings(
        None,
        server_url=server.url,
        init_id="dev-1",
        install_dir=str(tmp_path),
        **{k: v for k, v in files.items() if k != "other_key"},
    )
    offer = Server(settings).check("1.0.0")
    assert offer is not None and offer.version == "2.0.0"


@pytest.mark.parametrize(
    ("status", "hint"),
    [
        (401, "server answered 401 Unauthorized; check init_id and init_key"),
        (403, "server answered 403 Forbidden; check init_id and init_key"),
        (404, "server answered 404 Not Found; the server does not know this device"),
        (503, "server answered 503 Service Unavailable"),
    ],
)
def test_http_errors_hint_at_the_fix(tmp_path: Path, folder: Path, status: int, hint: str) -> None:
    with ReleaseServer(folder) as server:
        server.faults.fail_next, server.faults.fail_status = 1, status
        message = check(tmp_path, server.url)
    assert message.startswith(hint)
    if status == 503:
        assert message == hint


def test_400_over_https_suggests_a_client_certificate(
    tmp_path: Path, folder: Path, ca: Any
) -> None:
    for server in tls_server(folder, ca, ca.issue_cert("127.0.0.1")):
        server.faults.fail_next, server.faults.fail_status = 1, 400
        message = check(tmp_path, server.url, ca_file=pem(tmp_path, "ca.pem", ca.cert_pem))
        assert message == (
            "server answered 400 Bad Request; "
            "if the server requires a client certificate, set cert_file and key_file"
        )
