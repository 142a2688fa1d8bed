"""How the agent authenticates to NATS: connect options from the ``nats_*`` keys, and
NATS URLs shown without their passwords."""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the host's bus uses this module without the addon's settings
    from connhex_edge_ota.config import OtaSettings

_USERINFO = re.compile(r"(?<=://)([^/?#\s]*)@")
"""The user information of a URL: up to the authority's last ``@``, as urllib splits it."""


def redact(text: str) -> str:
    """``text`` with the password (or token) of every URL in it replaced by ``***``.

    ``nats://ops:s3cret@host:4222`` becomes ``nats://ops:***@host:4222``; a
    user name alone (``nats://t0ken@host``) is NATS's way to give a token, so it
    becomes ``nats://***@host``.
    """

    def hide(match: re.Match[str]) -> str:
        user, colon, _password = match.group(1).partition(":")
        return f"{user}:***@" if colon else "***@"

    return _USERINFO.sub(hide, text)


@dataclass(frozen=True)
class NatsAuth:
    """Credentials and TLS for ``nats.connect``; secrets stay out of ``repr``."""

    user: str = ""
    password: str = field(default="", repr=False)
    token: str = field(default="", repr=False)
    nkey_file: Path | None = None
    """An NKey seed file (``SU…``)."""
    creds_file: Path | None = None
    """A ``.creds`` file: the user's JWT and NKey seed."""
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def tls_context(self) -> ssl.SSLContext | None:
        """A verifying TLS context when a CA or a client certificate is configured."""
        if self.ca_file is None and self.cert_file is None:
            return None
        context = ssl.create_default_context(
            cafile=str(self.ca_file) if self.ca_file is not None else None
        )
        if self.cert_file is not None and self.key_file is not None:
            # An encrypted key fails instead of OpenSSL prompting on a terminal nobody reads.
            context.load_cert_chain(str(self.cert_file), str(self.key_file), password=b"")
        return context

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect`` (none for an anonymous, plain connection).

        Credentials in the URL itself (``nats://user:password@host``) are left to
        nats-py, which reads them from there.
        """
        options: dict[str, Any] = {}
        if self.user:
            options["user"] = self.user
            options["password"] = self.password
        if self.token:
            options["token"] = self.token
        if self.nkey_file is not None:
            options["nkeys_seed"] = str(self.nkey_file)
        if self.creds_file is not None:
            options["user_credentials"] = str(self.creds_file)
        tls = self.tls_context()
        if tls is not None:
            options["tls"] = tls
        return options


def nats_auth(settings: OtaSettings) -> NatsAuth:
    """The ``nats_*`` keys of ``settings``, secrets read from their files."""
    return NatsAuth(
        user=settings.nats_user,
        password=settings.nats_secret("nats_password"),
        token=settings.nats_secret("nats_token"),
        nkey_file=settings.nats_nkey_file,
        creds_file=settings.nats_creds_file,
        ca_file=settings.nats_ca_file,
        cert_file=settings.nats_cert_file,
        key_file=settings.nats_key_file,
    )
