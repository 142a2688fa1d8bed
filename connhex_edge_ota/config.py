"""The ``[ota]`` table of ``agent.toml``: keys, defaults, and one-line errors.

Priority, highest first: init arguments > ``CONNHEX_OTA_<KEY>`` environment
variables > the ``[ota]`` table of the TOML file. Durations take Go spelling
("24h0m0s", "1h30m", "90s", "500ms") or a number of seconds.
"""

from __future__ import annotations

import copy
import difflib
import os
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    Field,
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

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

DEFAULT_CONFIG_PATH = Path("/opt/connhex/configs/agent.toml")
ENV_PREFIX = "CONNHEX_OTA_"
TABLE = "ota"


class ConfigError(Exception):
    """A configuration that cannot run; ``str(error)`` is one line for the operator."""


def _positive(seconds: float) -> float:
    if seconds <= 0:
        raise ValueError("must be greater than zero")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]
PositiveDuration = Annotated[float, BeforeValidator(parse_duration), AfterValidator(_positive)]

_DURATION_HINT = "a duration such as '1h30m', '90s', '500ms' or a number of seconds"
EXPECTED: dict[str, str] = {
    "auto_download": "true or false",
    "auto_install": "true or false",
    "check_interval": f"{_DURATION_HINT}, greater than zero",
    "check_jitter": _DURATION_HINT,
    "retry_floor": f"{_DURATION_HINT}, greater than zero",
    "startup_delay": _DURATION_HINT,
    "server_url": "an http:// or https:// URL such as 'https://apis.example.com'",
    "init_id": "the device's initialization ID, a non-empty string without '/'",
    "init_key": "the device's initialization key, a string",
    "ca_file": "the path of an existing CA bundle (PEM)",
    "cert_file": "the path of an existing client certificate (PEM)",
    "key_file": "the path of an existing client key (PEM)",
    "install_dir": "an absolute directory path",
    "nats_url": "a NATS URL such as 'nats://127.0.0.1:4222'",
    "heartbeat_interval": f"{_DURATION_HINT}, greater than zero",
    "install_timeout": f"{_DURATION_HINT}, greater than zero",
    "public_key": "a path to an Ed25519 .pub file, or the key inline (PEM or base64)",
    "initial_version": "a version string",
    "connect_timeout": f"{_DURATION_HINT}, greater than zero",
    "stall_timeout": f"{_DURATION_HINT}, greater than zero",
    "hook_timeout": f"{_DURATION_HINT}, greater than zero",
    "free_space_margin": "a number of bytes, zero or more",
    "max_install_attempts": "a whole number, one or more",
    "max_unpacked_size": "a number of bytes, one or more",
    "max_members": "a whole number, one or more",
    "max_ratio": "a compression ratio, one or more",
    "progress_rate": "a number of events per second, greater than zero",
    "log_keep": "a whole number, one or more",
}


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

    # Further keys, each with a safe default.
    initial_version: str = ""
    """The version the device runs before the addon ever installed one."""
    check_jitter: Duration = 60.0
    """Random delay added to each check, at most 10% of ``check_interval``."""
    retry_floor: PositiveDuration = 30.0
    """Shortest wait before retrying after a failure."""
    startup_delay: Duration = 5.0
    """The first check comes within this long after start-up, at the device's own phase."""
    connect_timeout: PositiveDuration = 10.0
    stall_timeout: PositiveDuration = 60.0
    """A transfer that receives no byte for this long fails (and resumes later)."""
    hook_timeout: PositiveDuration = 30.0
    free_space_margin: int = Field(default=32 * 1024 * 1024, ge=0)
    max_install_attempts: int = Field(default=1, ge=1)
    max_unpacked_size: int = Field(default=8 * 1024**3, ge=1)
    max_members: int = Field(default=10_000, ge=1)
    max_ratio: float = Field(default=200.0, ge=1)
    progress_rate: float = Field(default=4.0, gt=0)
    log_keep: int = Field(default=10, ge=1)

    @field_validator("server_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("not an http(s) URL")
        return value.rstrip("/")

    @field_validator("init_id")
    @classmethod
    def _check_init_id(cls, value: str) -> str:
        if "/" in value or any(ord(c) < 32 for c in value):
            raise ValueError("holds '/' or control characters")
        return value

    @field_validator("install_dir")
    @classmethod
    def _check_install_dir(cls, value: Path) -> Path:
        if not value.is_absolute():
            raise ValueError("not absolute")
        return value

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _check_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError("no such file")
        return value

    @model_validator(mode="after")
    def _check_pairs(self) -> OtaSettings:
        if (self.cert_file is None) != (self.key_file is None):
            missing = "key_file" if self.key_file is None else "cert_file"
            raise ValueError(f"{missing}: cert_file and key_file go together")
        return self

    @property
    def store_dir(self) -> Path:
        return self.install_dir / ".store" / "ota"

    @property
    def downloads_enabled(self) -> bool:
        return self.auto_download or self.auto_install

    def require_server(self) -> None:
        """Raise :class:`ConfigError` unless the keys needed to reach the server are set."""
        for key in ("server_url", "init_id"):
            if not getattr(self, key):
                raise ConfigError(
                    f"config error: [ota] {key} is required: expected {EXPECTED[key]}"
                )

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
    env = os.environ.get("CONNHEX_AGENT_CONFIG")
    return Path(env) if env else DEFAULT_CONFIG_PATH


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
    kwargs = dict(overrides)
    if table:
        kwargs["_toml_file"] = path
    try:
        return OtaSettings(**kwargs)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, table, overrides)) from None


def _one_line(exc: ValidationError, table: dict[str, Any], overrides: dict[str, Any]) -> str:
    error = exc.errors()[0]
    loc = [str(part) for part in error["loc"]]
    message = str(error["msg"]).removeprefix("Value error, ")
    if not loc:  # a model-level check names the missing key first
        key, _, message = message.partition(": ")
        return f"config error: [{TABLE}] {key} is missing: {message}"
    key = loc[0]
    env_name = ENV_PREFIX + key.upper()
    if key in overrides:
        where, value = "argument", overrides[key]
    elif env_name in os.environ:
        where, value = f"environment {env_name}", os.environ[env_name]
    else:
        where, value = "file", table.get(key, error.get("input"))
    shown = "<secret>" if key == "init_key" else repr(value)
    expected = EXPECTED.get(key, "a valid value")
    source = "" if where == "file" else f" (from {where})"
    return f"config error: [{TABLE}] {key} = {shown}{source}: {message}; expected {expected}"
