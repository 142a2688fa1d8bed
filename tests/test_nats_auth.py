"""An authenticated bus: token, user/password and TLS client certificates against a real
nats-server, secrets never shown, and a refused login logged once."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from hypothesis import given
from hypothesis import strategies as st

from connhex_edge_ota.config import ConfigError, load_settings
from connhex_edge_ota.natsauth import NatsAuth, nats_auth, redact
from connhex_edge_ota.natsserver import NatsServer
from connhex_edge_ota.server import ReleaseServer
from connhex_edge_ota.testing import OtaAgent, StatusWatcher
from tests.conftest import wait_until

TOKEN = "t0ken-7f3a9c"
PASSWORD = "pa55-c0rrect-h0rse"


@pytest.fixture
def start_nats(tmp_path: Path) -> Iterator[Callable[..., NatsServer]]:
    servers: list[NatsServer] = []

    def start(*args: str) -> NatsServer:
        server = NatsServer(args=[*args, "--log", str(tmp_path / f"nats-{len(servers)}.log")])
        servers.append(server.start())
        return server

    yield start
    for server in servers:
        server.stop()


def nats_log(server: NatsServer) -> str:
    return Path(server.args[server.args.index("--log") + 1]).read_text()


def test_urls_are_shown_without_passwords() -> None:
    assert redact("nats://ops:s3cret@10.0.0.1:4222") == "nats://ops:***@10.0.0.1:4222"
    assert redact("nats://t0ken@host:4222") == "nats://***@host:4222"  # a user alone is a token
    assert redact("nats://host:4222") == "nats://host:4222"
    assert (
        redact("tls://a:b@h1:4222,tls://c:d@h2:4222") == "tls://a:***@h1:4222,tls://c:***@h2:4222"
    )
    assert redact("failed: nats://u:p@h:1 refused") == "failed: nats://u:***@h:1 refused"
    assert redact("nats://u:p,a:ss@h:1") == "nats://u:***@h:1"
    assert redact("nats://u:p@ss@h:1") == "nats://u:***@h:1"  # urllib splits at the last @
    assert redact("nats://h1:4222,nats://u:p@h2:4222") == "nats://h1:4222,nats://u:***@h2:4222"


_SAFE = "".join(chr(c) for c in range(33, 127) if chr(c) not in "/?#")


@given(
    st.text(alphabet="".join(c for c in _SAFE if c not in ":@"), min_size=1),
    st.text(alphabet=_SAFE, min_size=1),
)
def test_no_password_survives_redaction(user: str, password: str) -> None:
    shown = redact(f"nats://{user}:{password}@nats.example.com:4222")
    assert shown == f"nats://{user}:***@nats.example.com:4222"


def test_secrets_come_from_files_or_the_environment_and_are_never_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token_file = tmp_path / "nats.token"
    token_file.write_text(TOKEN + "\n")
    settings = load_settings(None, nats_token_file=str(token_file))
    auth = nats_auth(settings)
    assert auth.token == TOKEN and auth.connect_options() == {"token": TOKEN}
    monkeypatch.setenv("CONNHEX_OTA_NATS_PASSWORD", PASSWORD)
    settings = load_settings(None, nats_user="ops")
    auth = nats_auth(settings)
    assert auth.connect_options() == {"user": "ops", "password": PASSWORD}
    assert PASSWORD not in repr(auth) + repr(settings) + str(settings)
    monkeypatch.delenv("CONNHEX_OTA_NATS_PASSWORD")
    with pytest.raises(ConfigError) as caught:
        load_settings(None, nats_token=12345)
    assert "<secret>" in str(caught.value) and "12345" not in str(caught.value)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"nats_user": "ops", "nats_token": "x"}, "nats_token: one way to authenticate"),
        ({"nats_url": "nats://a:b@h:4222", "nats_token": "x"}, "found nats_url, nats_token"),
        ({"nats_password": "x"}, "nats_password: needs nats_user"),
        ({"nats_token": "x", "nats_token_file": "{file}"}, "give nats_token or nats_token_file"),
        ({"nats_cert_file": "{file}"}, "nats_key_file: missing"),
        ({"nats_ca_file": "/nonexistent/ca.pem"}, "nats_ca_file"),
    ],
)
def test_conflicting_or_missing_auth_keys_are_one_line_errors(
    tmp_path: Path, keys: dict[str, str], message: str
) -> None:
    existing = tmp_path / "some.pem"
    existing.write_text("x")
    given = {k: v.replace("{file}", str(existing)) for k, v in keys.items()}
    with pytest.raises(ConfigError, match=message) as caught:
        load_settings(None, **given)
    assert "\n" not in str(caught.value) and "a:b@" not in str(caught.value)


def test_tls_files_that_do_not_load_are_refused_at_start(
    tmp_path: Path, tls_files: dict[str, Path]
) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(ConfigError, match=r"^config error: \[ota\] nats_ca_file: not a usable CA"):
        load_settings(None, nats_ca_file=str(junk))
    with pytest.raises(ConfigError, match=r"nats_cert_file: certificate and key do not load"):
        load_settings(
            None,
            nats_cert_file=str(tls_files["client"]),
            nats_key_file=str(tls_files["server-key"]),
        )


def test_token_auth_statuses_commands_and_cli_forwarding(
    ota_agent: Callable[..., OtaAgent],
    start_nats: Callable[..., NatsServer],
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
    tmp_path: Path,
) -> None:
    bus = start_nats("--auth", TOKEN)
    token_file = tmp_path / "nats.token"
    token_file.write_text(TOKEN + "\n")
    release_server.releases.publish(make_release("2.0.0"))
    watcher = StatusWatcher(f"nats://{TOKEN}@127.0.0.1:{bus.port}").start()
    try:
        agent = ota_agent(nats_url=bus.url, nats_token_file=str(token_file))
        watcher.wait_status("update_available")
        assert watcher.request("status")["ok"] is True
        forwarded = subprocess.run(
            [sys.executable, "-m", "connhex_edge_ota", "check", "--config", str(agent.config)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert forwarded.returncode == 0, forwarded.stderr
        assert json.loads(forwarded.stdout)["status"]["latest_version"] == "2.0.0"
        agent.stop()
    finally:
        watcher.close()
    assert f"connected to NATS at {bus.url}" in agent.output()
    assert TOKEN not in agent.output() + forwarded.stderr + forwarded.stdout


def test_password_in_the_url_or_the_environment_and_never_logged(
    ota_agent: Callable[..., OtaAgent],
    start_nats: Callable[..., NatsServer],
    tmp_path: Path,
) -> None:
    bus = start_nats("--user", "ops", "--pass", PASSWORD)
    watcher = StatusWatcher(f"nats://ops:{PASSWORD}@127.0.0.1:{bus.port}").start()
    try:
        in_url = ota_agent(nats_url=f"nats://ops:{PASSWORD}@127.0.0.1:{bus.port}")
        watcher.wait_status("updated")
        in_url.stop()
        mark = watcher.mark()
        from_env = ota_agent(
            nats_url=bus.url, nats_user="ops", env={"CONNHEX_OTA_NATS_PASSWORD": PASSWORD}
        )
        watcher.wait_status("updated", after=mark)
        from_env.stop()
    finally:
        watcher.close()
    assert f"connected to NATS at nats://ops:***@127.0.0.1:{bus.port}" in in_url.output()
    for agent in (in_url, from_env):
        assert PASSWORD not in agent.output()


def test_nkey_seed_file(
    ota_agent: Callable[..., OtaAgent],
    start_nats: Callable[..., NatsServer],
    tmp_path: Path,
) -> None:
    nkeys = pytest.importorskip("nkeys")
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    seed_file = tmp_path / "device.nk"
    seed_file.write_bytes(seed + b"\n")
    config = tmp_path / "nats-nkey.conf"
    config.write_text(f'authorization {{ users: [ {{ nkey: "{public}" }} ] }}\n')
    bus = start_nats("--config", str(config))
    agent = ota_agent(nats_url=bus.url, nats_nkey_file=str(seed_file))
    wait_until(lambda: "connected to NATS" in agent.output())
    anonymous = ota_agent(nats_url=bus.url, install_dir=str(tmp_path / "second-device"))
    wait_until(lambda: "Authorization Violation" in anonymous.output())
    agent.stop()
    anonymous.stop()
    assert seed.decode() not in agent.output()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _jwt(issuer: Any, subject: str, nats_claims: dict[str, Any]) -> str:
    """A NATS JWT (ed25519-nkey) for ``subject``, signed by the ``issuer`` key pair."""
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    claims = {
        "jti": _b64(os.urandom(16)),
        "iat": int(time.time()),
        "iss": issuer.public_key.decode(),
        "sub": subject,
        "name": subject[:8],
        "nats": {"version": 2, **nats_claims},
    }
    body = _b64(json.dumps(claims).encode())
    return f"{header}.{body}.{_b64(issuer.sign(f'{header}.{body}'.encode()))}"


def test_creds_file_in_operator_mode(
    ota_agent: Callable[..., OtaAgent],
    start_nats: Callable[..., NatsServer],
    tmp_path: Path,
) -> None:
    nkeys = pytest.importorskip("nkeys")

    def pair(prefix: int) -> tuple[bytes, Any]:
        seed = nkeys.encode_seed(os.urandom(32), prefix)
        return seed, nkeys.from_seed(bytearray(seed))

    _, operator = pair(nkeys.PREFIX_BYTE_OPERATOR)
    _, account = pair(nkeys.PREFIX_BYTE_ACCOUNT)
    user_seed, user = pair(nkeys.PREFIX_BYTE_USER)
    account_pub = account.public_key.decode()
    unlimited = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1}
    operator_jwt = _jwt(operator, operator.public_key.decode(), {"type": "operator"})
    account_jwt = _jwt(
        operator,
        account_pub,
        {"type": "account", "limits": {**unlimited, "wildcards": True, "conn": -1, "leaf": -1}},
    )
    user_jwt = _jwt(
        account,
        user.public_key.decode(),
        {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1},
    )
    config = tmp_path / "nats-operator.conf"
    config.write_text(
        f'operator: "{operator_jwt}"\nresolver: MEMORY\n'
        f'resolver_preload: {{\n  {account_pub}: "{account_jwt}"\n}}\n'
    )
    creds = tmp_path / "device.creds"
    creds.write_text(
        f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{user_seed.decode()}\n------END USER NKEY SEED------\n"
    )
    bus = start_nats("--config", str(config))
    agent = ota_agent(nats_url=bus.url, nats_creds_file=str(creds))
    status, reply = asyncio.run(_first_status_and_reply(bus.url, NatsAuth(creds_file=creds)))
    assert status["current_version"] == "1.0.0" and reply["ok"] is True
    agent.stop()
    assert user_seed.decode() not in agent.output()
    # A file without the JWT would make nats-py read forever: refused at start.
    broken = tmp_path / "broken.creds"
    broken.write_text(user_seed.decode())
    with pytest.raises(ConfigError, match=r"nats_creds_file: not a \.creds file"):
        load_settings(None, nats_creds_file=str(broken))


def test_a_wrong_token_keeps_the_update_loop_going_and_is_logged_once(
    ota_agent: Callable[..., OtaAgent],
    start_nats: Callable[..., NatsServer],
    release_server: ReleaseServer,
    make_release: Callable[..., Path],
) -> None:
    bus = start_nats("--auth", TOKEN)
    release_server.releases.publish(make_release("2.0.0"))
    agent = ota_agent(nats_url=bus.url, env={"CONNHEX_OTA_NATS_TOKEN": "wrong-token"})

    def state() -> dict[str, Any]:
        path = agent.store / "state.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    wait_until(lambda: state().get("status") == "update_available")  # the loop runs
    wait_until(lambda: nats_log(bus).count("authentication error") >= 4)  # retried
    agent.stop()
    refusals = [
        line
        for line in agent.output().splitlines()
        if "Authorization Violation" in line and "WARNING" in line
    ]
    assert len(refusals) == 1, refusals
    assert "wrong-token" not in agent.output()


@pytest.fixture
def tls_files(tmp_path: Path) -> dict[str, Path]:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    files = {name: tmp_path / f"{name}.pem" for name in ("ca", "server", "server-key")}
    files.update({name: tmp_path / f"{name}.pem" for name in ("client", "client-key")})
    ca.cert_pem.write_to_path(str(files["ca"]))
    server = ca.issue_cert("127.0.0.1")
    server.cert_chain_pems[0].write_to_path(str(files["server"]))
    server.private_key_pem.write_to_path(str(files["server-key"]))
    client = ca.issue_cert("device-1")
    client.cert_chain_pems[0].write_to_path(str(files["client"]))
    client.private_key_pem.write_to_path(str(files["client-key"]))
    config = tmp_path / "nats-tls.conf"
    config.write_text(
        "tls {\n"
        f'  cert_file: "{files["server"]}"\n'
        f'  key_file: "{files["server-key"]}"\n'
        f'  ca_file: "{files["ca"]}"\n'
        "  verify: true\n"
        "  timeout: 2\n"
        "}\n"
    )
    files["config"] = config
    return files


async def _first_status_and_reply(url: str, auth: NatsAuth) -> tuple[dict[str, Any], Any]:
    """The first status published, and the reply to ``commands.ota.status``, as ``auth``."""
    nc = await nats.connect(url, **auth.connect_options())
    try:
        got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def on_msg(msg: Any) -> None:
            if not got.done():
                got.set_result(msg.data)

        await nc.subscribe("heartbeat.ota.service", cb=on_msg)
        status = json.loads(await asyncio.wait_for(got, 20))
        reply = await nc.request("commands.ota.status", b"", timeout=10)
        return status, json.loads(reply.data)
    finally:
        await nc.close()


def test_tls_with_a_client_certificate(
    ota_agent: Callable[..., OtaAgent],
    start_nats: Callable[..., NatsServer],
    tls_files: dict[str, Path],
) -> None:
    bus = start_nats("--config", str(tls_files["config"]))
    url = f"tls://127.0.0.1:{bus.port}"
    without_cert = ota_agent(nats_url=url, nats_ca_file=str(tls_files["ca"]))
    with_cert = ota_agent(
        nats_url=url,
        nats_ca_file=str(tls_files["ca"]),
        nats_cert_file=str(tls_files["client"]),
        nats_key_file=str(tls_files["client-key"]),
        install_dir=str(tls_files["ca"].parent / "second-device"),
    )
    auth = NatsAuth(
        ca_file=tls_files["ca"], cert_file=tls_files["client"], key_file=tls_files["client-key"]
    )
    status, reply = asyncio.run(_first_status_and_reply(url, auth))
    assert status["current_version"] == "1.0.0"
    assert reply["ok"] is True
    wait_until(lambda: "connected to NATS" in with_cert.output())
    with_cert.stop()
    without_cert.stop()
    assert "connected to NATS" not in without_cert.output()
    # And a client that does not trust the server's CA is refused too.
    with pytest.raises((ssl.SSLError, OSError, nats.errors.Error, TimeoutError)):
        asyncio.run(
            asyncio.wait_for(
                nats.connect(url, allow_reconnect=False, tls=ssl.create_default_context()), 5
            )
        )
