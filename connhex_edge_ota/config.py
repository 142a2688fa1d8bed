"""The ``[ota]`` table of ``agent.toml``: keys, defaults, and one-line errors.

Priority, highest first: init arguments > ``CONNHEX_OTA_<KEY>`` environment
variables > the ``[ota]`` table of the TOML file. Durations take Go spelling
("24h0m0s", "1h30m", "90s", "500ms") or a number of seconds.
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import os
import ssl
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from connhex_edge_ota.duration import parse_duration
from connhex_edge_ota.natsauth import NatsAuth, redact
from connhex_edge_ota.release import UnsafeVersionError, check_version

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

DEFAULT_CONFIG_PATH = Path("/opt/connhex/configs/agent.toml")
CONFIG_ENV = "CONNHEX_AGENT_CONFIG"
ENV_PREFIX = "CONNHEX_OTA_"
TABLE = "ota"
OTHER_ENV = frozenset({"CONNHEX_OTA_LOG_LEVEL", "CONNHEX_OTA_TEST_KILL_POINT"})
"""``CONNHEX_OTA_*`` variables that are not ``[ota]`` keys (read by the command line)."""


class ConfigError(Exception):
    """A configuration that cannot run; ``str(error)`` is one line for the operator."""


MAX_DURATION = 366 * 24 * 3600.0
"""Longest duration accepted: timers and socket timeouts overflow far beyond it."""


def _bounded(seconds: float) -> float:
    if seconds > MAX_DURATION:
        raise ValueError("longer than 366 days")
    return seconds


MIN_DURATION = 0.01
"""Shortest period or time limit accepted: "1ns" would make a busy loop or a flood."""


def _positive(seconds: float) -> float:
    if seconds <= 0:
        raise ValueError("must be greater than zero")
    if seconds < MIN_DURATION:
        raise ValueError("shorter than 10ms")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration), AfterValidator(_bounded)]
PositiveDuration = Annotated[
    float, BeforeValidator(parse_duration), AfterValidator(_bounded), AfterValidator(_positive)
]


def _header_safe(value: str) -> str:
    """``value`` when it can be sent as an HTTP header value (Latin-1, no control characters)."""
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("holds control characters")
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError("holds characters an HTTP header cannot carry (outside Latin-1)") from None
    return value


_DURATION_HINT = (
    "a duration such as '1h30m', '90s', '500ms' or a number of seconds, at most 366 days"
)
EXPECTED: dict[str, str] = {
    "auto_download": "true or false",
    "auto_install": "true or false",
    "check_interval": f"{_DURATION_HINT}, at least 10ms",
    "check_jitter": _DURATION_HINT,
    "retry_floor": f"{_DURATION_HINT}, at least 10ms",
    "startup_delay": _DURATION_HINT,
    "server_url": "an http:// or https:// URL such as 'https://apis.example.com'",
    "init_id": "the device's initialization ID, a non-empty string without '/'",
    "init_key": "the device's initialization key, Latin-1 text without control characters",
    "ca_file": "the path of an existing CA bundle (PEM)",
    "cert_file": "the path of an existing client certificate (PEM)",
    "key_file": "the path of an existing client key (PEM)",
    "install_dir": "an absolute directory path",
    "nats_url": "a NATS URL such as 'nats://127.0.0.1:4222'",
    "heartbeat_interval": f"{_DURATION_HINT}, at least 10ms",
    "install_timeout": f"{_DURATION_HINT}, at least 10ms",
    "script_stop_grace": f"{_DURATION_HINT}, at least 10ms",
    "public_key": "a path to an Ed25519 .pub file, or the key inline (PEM or base64)",
    "initial_version": "a version string (at most 128 bytes, Latin-1, no '/', '..' or control "
    "characters)",
    "model": "the device type that signed releases must name, a string ('' = any)",
    "connect_timeout": f"{_DURATION_HINT}, at least 10ms",
    "stall_timeout": f"{_DURATION_HINT}, at least 10ms",
    "hook_timeout": f"{_DURATION_HINT}, at least 10ms",
    "check_timeout": f"{_DURATION_HINT}, at least 10ms",
    "min_transfer_rate": "a number of bytes per second, zero (no floor) or more",
    "free_space_margin": "a number of bytes, zero or more",
    "max_install_attempts": "a whole number, one or more",
    "max_unpacked_size": "a number of bytes, one or more",
    "max_members": "a whole number, one or more",
    "max_ratio": "a compression ratio, one or more",
    "progress_rate": "a number of events per second, greater than zero",
    "log_keep": "a whole number, one or more",
    "delta": "'auto' (fetch only the members that changed, when it pays) or 'off'",
    "max_download_rate": "bytes per second, 0 for unlimited",
    "checkpoint_bytes": "a number of bytes, at least 1 MiB (1048576)",
    "nats_user": "a NATS user name",
    "nats_password": "the NATS user's password, a string",
    "nats_password_file": "the path of an existing file holding the NATS password",
    "nats_token": "a NATS authentication token, a string",
    "nats_token_file": "the path of an existing file holding the NATS token",
    "nats_nkey_file": "the path of an existing NKey seed file",
    "nats_creds_file": "the path of an existing NATS .creds file",
    "nats_ca_file": "the path of an existing CA bundle (PEM) for NATS",
    "nats_cert_file": "the path of an existing client certificate (PEM) for NATS",
    "nats_key_file": "the path of an existing client key (PEM) for NATS",
}
SECRET_KEYS = frozenset({"init_key", "nats_password", "nats_token"})
"""Keys whose values are never shown, not even in an error."""


def _default_nats_url() -> str:
    return os.environ.get("NATS_URL") or "nats://127.0.0.1:4222"


class OtaSettings(BaseSettings):
    """Settings of the OTA addon (the ``[ota]`` table).

    Sources, highest priority first: init arguments, environment variables
    ``CONNHEX_OTA_<KEY>``, the ``[ota]`` table of the TOML file given to
    :func:`load_settings`.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        toml_table_header=(TABLE,),
        extra="forbid",
        frozen=True,
    )

    # The contract keys (DESIGN §3).
    auto_download: bool = False
    auto_install: bool = False
    check_interval: PositiveDuration = 3600.0
    server_url: str = ""
    init_id: str = ""
    init_key: SecretStr = SecretStr("")
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    install_dir: Path = Path("/opt/connhex")
    nats_url: str = Field(default_factory=_default_nats_url)
    heartbeat_interval: PositiveDuration = 10.0
    install_timeout: PositiveDuration = 1800.0
    public_key: str | None = None
    script_stop_grace: PositiveDuration = 10.0
    """After ``install_timeout``, how long a script has between SIGTERM and SIGKILL."""

    # Further keys, each with a safe default.
    initial_version: str = ""
    """The version the device runs before the addon ever installed one."""
    model: str = ""
    """With ``public_key``: only releases signed for this device type install ("" = any)."""
    check_jitter: Duration = 60.0
    """Random delay added to each check, at most 10% of ``check_interval``."""
    retry_floor: PositiveDuration = 30.0
    """Shortest wait before retrying after a failure."""
    startup_delay: Duration = 5.0
    """The first check comes within this long after start-up, at the device's own phase."""
    connect_timeout: PositiveDuration = 10.0
    stall_timeout: PositiveDuration = 60.0
    """A transfer that receives no byte for this long fails (and resumes later)."""
    check_timeout: PositiveDuration = 30.0
    """Limit for a whole check (HEAD) and for the response headers of a download."""
    min_transfer_rate: float = Field(default=1024.0, ge=0)
    """Bytes per second a download must average over each ``stall_timeout``, else it is cut."""
    hook_timeout: PositiveDuration = 30.0
    free_space_margin: int = Field(default=32 * 1024 * 1024, ge=0)
    max_install_attempts: int = Field(default=1, ge=1)
    max_unpacked_size: int = Field(default=8 * 1024**3, ge=1)
    max_members: int = Field(default=10_000, ge=1)
    max_ratio: float = Field(default=200.0, ge=1)
    progress_rate: float = Field(default=4.0, gt=0)
    log_keep: int = Field(default=10, ge=1)
    delta: Literal["auto", "off"] = "auto"
    """Rebuild a release from the installed one's unchanged members, fetching only the rest."""
    checkpoint_bytes: int = Field(default=64 * 1024 * 1024, ge=1024 * 1024)
    """A partial download is made durable every this many bytes (or every 2 s, whichever
    first): what a power cut can cost, against flash wear and speed."""
    max_download_rate: int = Field(default=0, ge=0)
    """Bytes per second for downloads (full and delta alike), for metered links; 0: no cap."""

    # NATS authentication; secrets best given by file or environment, never printed.
    nats_user: str = ""
    nats_password: SecretStr = SecretStr("")
    nats_password_file: Path | None = None
    nats_token: SecretStr = SecretStr("")
    nats_token_file: Path | None = None
    nats_nkey_file: Path | None = None
    nats_creds_file: Path | None = None
    nats_ca_file: Path | None = None
    nats_cert_file: Path | None = None
    nats_key_file: Path | None = None

    @field_validator("server_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("not an http(s) URL")
        return value.rstrip("/")

    @field_validator("init_id")
    @classmethod
    def _check_init_id(cls, value: str) -> str:
        if "/" in value or any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ValueError("holds '/' or control characters")
        if value in (".", ".."):
            raise ValueError("'.' and '..' name no device")
        return value

    @field_validator("init_key")
    @classmethod
    def _check_init_key(cls, value: SecretStr) -> SecretStr:
        _header_safe(value.get_secret_value())
        return value

    @field_validator("initial_version")
    @classmethod
    def _check_initial_version(cls, value: str) -> str:
        if value:
            try:
                check_version(value)
            except UnsafeVersionError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("install_dir")
    @classmethod
    def _check_install_dir(cls, value: Path) -> Path:
        if not value.is_absolute():
            raise ValueError("not absolute")
        return value

    # Files are read at start: a mistake stops the program now, not after a download.
    @field_validator(
        "ca_file",
        "cert_file",
        "key_file",
        "nats_password_file",
        "nats_token_file",
        "nats_nkey_file",
        "nats_creds_file",
        "nats_ca_file",
        "nats_cert_file",
        "nats_key_file",
    )
    @classmethod
    def _check_exists(cls, value: Path | None) -> Path | None:
        if value is None:
            return value
        if not value.is_file():
            raise ValueError("no such file")
        try:
            with value.open("rb") as file:
                file.read(1)
        except OSError as exc:
            raise ValueError(f"cannot be read: {exc.strerror}") from None
        return value

    @field_validator("ca_file")
    @classmethod
    def _check_ca(cls, value: Path | None) -> Path | None:
        if value is not None:
            try:
                ssl.create_default_context(cafile=str(value))
            except ssl.SSLError as exc:
                raise ValueError(f"not a PEM CA bundle ({_ssl_reason(exc)})") from None
        return value

    @field_validator("public_key")
    @classmethod
    def _check_public_key(cls, value: str | None) -> str | None:
        if value:
            from connhex_edge_ota.signing import KeyFileError, load_public_key

            try:
                load_public_key(value)
            except KeyFileError as exc:
                raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _check_pairs(self) -> OtaSettings:
        if (self.cert_file is None) != (self.key_file is None):
            missing = "key_file" if self.key_file is None else "cert_file"
            raise ValueError(f"{missing}: cert_file and key_file go together")
        if self.cert_file is not None and self.key_file is not None:
            try:
                ssl.create_default_context().load_cert_chain(self.cert_file, self.key_file)
            except ssl.SSLError as exc:
                if "KEY_VALUES_MISMATCH" in str(exc):
                    reason = "does not belong to cert_file (the key and certificate differ)"
                    raise ValueError(f"key_file: {reason}") from None
                raise ValueError(
                    f"cert_file: not a usable client certificate and key ({_ssl_reason(exc)})"
                ) from None
        return self

    @model_validator(mode="after")
    def _check_nats_auth(self) -> OtaSettings:
        # Raised as ConfigError, not ValueError: these rules name their own keys.
        def refuse(key: str, message: str) -> ConfigError:
            return ConfigError(f"config error: [{TABLE}] {key}: {message}")

        for secret in ("nats_password", "nats_token"):
            if getattr(self, secret).get_secret_value() and getattr(self, secret + "_file"):
                raise refuse(secret, f"give {secret} or {secret}_file, not both")
        if (self.nats_password or self.nats_password_file) and not self.nats_user:
            raise refuse("nats_password", "needs nats_user")
        methods = [
            key
            for key, given in (
                ("nats_url", "@" in self.nats_url),
                ("nats_user", bool(self.nats_user)),
                ("nats_token", bool(self.nats_token or self.nats_token_file)),
                ("nats_nkey_file", self.nats_nkey_file is not None),
                ("nats_creds_file", self.nats_creds_file is not None),
            )
            if given
        ]
        if len(methods) > 1:
            raise refuse(
                methods[-1],
                f"one way to authenticate to NATS at a time; found {', '.join(methods)}",
            )
        if (self.nats_cert_file is None) != (self.nats_key_file is None):
            missing = "nats_key_file" if self.nats_key_file is None else "nats_cert_file"
            raise refuse(missing, "missing: nats_cert_file and nats_key_file go together")
        if self.nats_creds_file is not None:
            # nats-py reads a file without these markers forever, freezing the event loop.
            try:
                creds = self.nats_creds_file.read_text(errors="replace")
            except OSError as exc:
                raise refuse("nats_creds_file", f"cannot be read ({exc.strerror})") from None
            if "BEGIN NATS USER JWT" not in creds or "BEGIN USER NKEY SEED" not in creds:
                raise refuse("nats_creds_file", "not a .creds file (a user JWT and NKey seed)")
        try:
            NatsAuth(ca_file=self.nats_ca_file).tls_context()
        except (ssl.SSLError, OSError) as exc:
            raise refuse("nats_ca_file", f"not a usable CA bundle ({exc})") from None
        try:
            NatsAuth(cert_file=self.nats_cert_file, key_file=self.nats_key_file).tls_context()
        except (ssl.SSLError, OSError) as exc:
            raise refuse("nats_cert_file", f"certificate and key do not load ({exc})") from None
        for key in ("nats_nkey_file", "nats_creds_file"):
            if getattr(self, key) is not None and importlib.util.find_spec("nkeys") is None:
                raise refuse(key, "needs the nkeys package: pip install 'connhex-edge-ota[nkeys]'")
        return self

    def nats_secret(self, key: str) -> str:
        """``nats_password`` or ``nats_token``: its value, else the contents of its ``_file``."""
        path: Path | None = getattr(self, key + "_file")
        if path is None:
            secret: SecretStr = getattr(self, key)
            return secret.get_secret_value()
        try:
            return path.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"config error: [{TABLE}] {key}_file = {str(path)!r}: cannot be read ({exc})"
            ) from None

    @property
    def store_dir(self) -> Path:
        return self.install_dir / ".store" / "ota"

    @property
    def downloads_enabled(self) -> bool:
        return self.auto_download or self.auto_install

    _missing_file: Path | None = PrivateAttr(default=None)
    """The config file that was looked for and not found (only the default path may be)."""

    def require_server(self) -> None:
        """Raise :class:`ConfigError` unless the keys needed to reach the server are set."""
        for key in ("server_url", "init_id"):
            if not getattr(self, key):
                raise ConfigError(
                    f"config error: [ota] {key} is required: expected {EXPECTED[key]}"
                    + self.missing_file_hint()
                )

    def missing_file_hint(self) -> str:
        """``"; no config file at <path> ..."`` when the file looked for was not there."""
        if self._missing_file is None:
            return ""
        return f"; no config file at {self._missing_file} (give --config PATH or set {CONFIG_ENV})"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
        # load_settings passes the file as a private init argument: the path is
        # known only at run time, while sources are chosen per class.
        toml_file = init_settings.init_kwargs.pop("_toml_file", None)  # type: ignore[attr-defined]
        return (*sources, _ParsedToml(settings_cls, toml_file=toml_file))


class _ParsedToml(TomlConfigSettingsSource):
    """The TOML source, through :func:`read_toml`: the file is parsed once, not per look."""

    def _read_file(self, file_path: Path | Traversable) -> dict[str, Any]:
        return read_toml(Path(str(file_path)))


def config_path(given: str | Path | None = None) -> Path:
    """``--config PATH``, else ``$CONNHEX_AGENT_CONFIG``, else the default path."""
    if given:
        return Path(given)
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else DEFAULT_CONFIG_PATH


def named_config(given: str | Path | None = None) -> Path:
    """:func:`config_path`, and ConfigError when a file named by the operator is missing.

    Only the default path may be absent (all keys then come from the environment).
    """
    path = config_path(given)
    named = "--config" if given else CONFIG_ENV if os.environ.get(CONFIG_ENV) else ""
    if named and not path.is_file():
        what = "is not a file" if path.exists() else "no such file"
        raise ConfigError(f"config error: {path} (from {named}): {what}")
    return path


_parsed: dict[Path, tuple[bytes, dict[str, Any]]] = {}
"""The last document parsed per path: start-up looks at agent.toml about ten times."""


def read_toml(path: Path) -> dict[str, Any]:
    """The whole TOML document at ``path`` ({} when missing); ConfigError when unreadable.

    Parsed once per content: a later call reads the bytes again (so an edited file
    is seen) and returns a copy of the parsed document when they did not change.
    """
    try:
        data = path.read_bytes()
        cached = _parsed.get(path)
        if cached is None or cached[0] != data:
            cached = (data, tomllib.loads(data.decode()))
            _parsed[path] = cached
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config error: {path}: {exc}") from None
    return copy.deepcopy(cached[1])


ModelT = TypeVar("ModelT", bound=BaseModel)


def plugin_table(path: Path | None, table: str) -> dict[str, Any]:
    """The ``[table]`` of the agent's TOML file for a plugin's own settings ({} when absent)."""
    found = read_toml(path).get(table, {}) if path is not None else {}
    if not isinstance(found, dict):
        raise ConfigError(f"config error: {path}: [{table}] must be a table")
    return found


def load_table(model: type[ModelT], table: str, values: dict[str, Any]) -> ModelT:
    """``values`` validated as ``model``, or ConfigError in one line naming ``[table] key``.

    For plugin authors: ``load_table(MyConfig, "my_table", plugin_table(path, "my_table"))``.
    """
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(str(p) for p in error["loc"]) or "?"
        message = str(error["msg"]).removeprefix("Value error, ")
        shown = f" = {values[key]!r}" if key in values else ""
        raise ConfigError(f"config error: [{table}] {key}{shown}: {message}") from None


def load_settings(path: Path | None = None, **overrides: Any) -> OtaSettings:
    """Settings from ``path`` (the agent's TOML file), the environment and ``overrides``."""
    table: dict[str, Any] = {}
    if path is not None:
        section = read_toml(path).get(TABLE, {})
        if not isinstance(section, dict):
            raise ConfigError(f"config error: {path}: [{TABLE}] must be a table")
        table = section
    known = set(OtaSettings.model_fields)
    for key in table:
        if key not in known:
            hint = difflib.get_close_matches(key, sorted(known), n=1)
            suffix = f" (did you mean {hint[0]}?)" if hint else ""
            raise ConfigError(f"config error: [{TABLE}] {key} is not a known key{suffix}")
    _check_environment(known)
    kwargs = dict(overrides)
    if table:
        kwargs["_toml_file"] = path
    try:
        settings = OtaSettings(**kwargs)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, table, overrides)) from None
    if path is not None and not path.exists():
        settings._missing_file = path
    return settings


def _check_environment(known: set[str]) -> None:
    """An unknown ``CONNHEX_OTA_*`` variable is a typo, reported like an unknown key."""
    names = {ENV_PREFIX + key.upper() for key in known} | OTHER_ENV
    for variable in sorted(os.environ):
        if not variable.upper().startswith(ENV_PREFIX) or variable.upper() in names:
            continue
        hint = difflib.get_close_matches(variable.upper(), sorted(names), n=1)
        suffix = f" (did you mean {hint[0]}?)" if hint else ""
        raise ConfigError(f"config error: environment {variable} is not a known variable{suffix}")


def _ssl_reason(exc: ssl.SSLError) -> str:
    return str(exc.reason or exc.strerror or exc).replace("_", " ").lower()


def _one_line(exc: ValidationError, table: dict[str, Any], overrides: dict[str, Any]) -> str:
    error = exc.errors()[0]
    loc = [str(part) for part in error["loc"]]
    message = str(error["msg"]).removeprefix("Value error, ")
    if not loc:  # a model-level check names the missing key first
        key, _, message = message.partition(": ")
        value = overrides.get(key, table.get(key, os.environ.get(ENV_PREFIX + key.upper())))
        if value is None:
            return f"config error: [{TABLE}] {key} is missing: {message}"
        return f"config error: [{TABLE}] {key} = {str(value)!r}: {message}"
    key = loc[0]
    env_name = ENV_PREFIX + key.upper()
    if key in overrides:
        where, value = "argument", overrides[key]
    elif env_name in os.environ:
        where, value = f"environment {env_name}", os.environ[env_name]
    else:
        where, value = "file", table.get(key, error.get("input"))
    if key in SECRET_KEYS:
        shown = "<secret>"
    else:
        shown = repr(redact(value) if isinstance(value, str) else value)
    expected = EXPECTED.get(key, "a valid value")
    source = "" if where == "file" else f" (from {where})"
    return f"config error: [{TABLE}] {key} = {shown}{source}: {message}; expected {expected}"
