"""Settings: the only reader of the environment and of systemd credentials."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import time
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AliasChoices,
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

EX_CONFIG = 78
ENV_PREFIX = "FDQUEUE_"


class ConfigError(Exception):
    """Invalid or missing configuration; the message names the variable and what is expected."""


def _split_list(value: Any) -> Any:
    """Accept `a,b`, a JSON array, or a single value for list settings (case B24)."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if not text:
        return []
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a valid JSON array ({exc.msg})") from exc
    return [item.strip() for item in text.split(",") if item.strip()]


StrList = Annotated[list[str], NoDecode, BeforeValidator(_split_list)]


class _StrippedEnvSource(EnvSettingsSource):
    """Environment source where empty or whitespace-only values count as "not set" (B25)."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        loaded = super()._load_env_vars()
        return {k: v.strip() for k, v in loaded.items() if v is not None and v.strip()}


def _env(name: str) -> AliasChoices:
    """Accept the original unprefixed name and its FDQUEUE_-prefixed alias."""
    return AliasChoices(name, f"{ENV_PREFIX}{name}")


class Settings(BaseSettings):
    """Every setting of fdqueue, read from FDQUEUE_* variables (plus the three original names)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        case_sensitive=False,
        extra="ignore",
        populate_by_name=True,
        hide_input_in_errors=True,
    )

    # Connections.
    database_url: SecretStr | None = Field(None, validation_alias=_env("DATABASE_URL"))
    listener_database_url: SecretStr | None = Field(
        None, description="separate DSN for LISTEN (e.g. direct to PostgreSQL past PgBouncer)"
    )
    db_statement_cache_size: int = Field(100, ge=0, le=10_000, description="0 behind PgBouncer")
    db_pool_max: int = Field(10, ge=1, le=200)
    db_connect_timeout: float = Field(10.0, gt=0, le=300)

    freshdesk_domain: str | None = Field(None, validation_alias=_env("FRESHDESK_DOMAIN"))
    freshdesk_api_key: SecretStr | None = Field(None, validation_alias=_env("FRESHDESK_API_KEY"))
    freshdesk_base_url: str | None = Field(None, description="override, e.g. the simulator")
    freshdesk_max_per_minute: int | None = Field(None, ge=1, le=100_000)
    freshdesk_rate_window: float = Field(60.0, gt=0, le=3600, description="Freshdesk's window")
    freshdesk_marker_field: str | None = Field(
        None, pattern=r"^cf_[a-z0-9_]+$", description="text custom field holding the marker"
    )

    # Delivery.
    batch_size: int = Field(10, ge=1, le=1000)
    concurrency: int = Field(10, ge=1, le=500)
    poll_interval: float = Field(60.0, gt=0, le=3600)
    max_attempts: int = Field(3, ge=1, le=20)
    backoff_unit: float = Field(60.0, gt=0, le=86_400, description="seconds; retry after 2^n units")
    backoff_jitter: float = Field(0.1, ge=0, le=1, description="fraction of positive jitter")
    http_timeout: float = Field(30.0, gt=0, le=600)
    http_connect_timeout: float = Field(10.0, gt=0, le=600)
    lease: float | None = Field(None, gt=0, le=86_400, description="default http_timeout + 30 s")
    rate_limit_default_wait: float = Field(60.0, gt=0, le=3600)
    auth_pause: float = Field(300.0, gt=0, le=86_400, description="pause after 401/403/404")
    shutdown_grace: float = Field(20.0, ge=0, le=3600)
    worker_metrics_port: int | None = Field(None, ge=1, le=65535)

    # Cleanup.
    retention_days: float = Field(7, gt=0, le=3650)
    cleanup_at: time = Field(time(3, 0))
    cleanup_batch: int = Field(1000, ge=1, le=100_000)

    # HTTP API.
    host: str = "127.0.0.1"
    port: int = Field(3000, ge=0, le=65535)
    admin_token: SecretStr | None = None
    cors_origins: StrList = Field(default_factory=list)
    max_body_bytes: int = Field(1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    default_tags: StrList = Field(default_factory=list)

    log_format: Literal["auto", "console", "json", "journald"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("default_tags")
    @classmethod
    def _short_tags(cls, tags: list[str]) -> list[str]:
        too_long = [tag for tag in tags if len(tag) > 32]
        if too_long:
            raise ValueError(
                f"tags must be at most 32 characters (Freshdesk's limit): {too_long[0]!r}"
            )
        return tags

    @model_validator(mode="after")
    def _lease_outlives_request(self) -> Self:
        if self.lease is not None and self.lease <= self.http_timeout + self.http_connect_timeout:
            raise ValueError(
                "FDQUEUE_LEASE must be longer than FDQUEUE_HTTP_TIMEOUT"
                " + FDQUEUE_HTTP_CONNECT_TIMEOUT"
            )
        return self

    @property
    def lease_seconds(self) -> float:
        """Seconds a claim stays valid: longer than any request, so live work is not reclaimed."""
        if self.lease is not None:
            return self.lease
        return self.http_timeout + self.http_connect_timeout + 30.0

    @property
    def freshdesk_url(self) -> str | None:
        """Base URL of the Freshdesk account (or of the simulator), without a trailing slash."""
        if self.freshdesk_base_url:
            return self.freshdesk_base_url.rstrip("/")
        if not self.freshdesk_domain:
            return None
        host = self.freshdesk_domain.removeprefix("https://").removeprefix("http://").strip("/")
        if "." not in host:
            host = f"{host}.freshdesk.com"
        return f"https://{host}"

    def check_required(self, *, database: bool = True, freshdesk: bool = True) -> None:
        """ConfigError naming, in one line, every required setting that is missing (B25)."""
        missing = []
        if database and self.database_url is None:
            missing.append(("DATABASE_URL", "a postgresql:// URL"))
        if freshdesk and self.freshdesk_url is None:
            missing.append(
                (
                    "FRESHDESK_DOMAIN",
                    "your subdomain, e.g. 'acme' for acme.freshdesk.com; "
                    "or set FDQUEUE_FRESHDESK_BASE_URL",
                )
            )
        if freshdesk and self.freshdesk_api_key is None:
            missing.append(("FRESHDESK_API_KEY", "an agent's API key"))
        if missing:
            names = ", ".join(name for name, _ in missing)
            plural = "s" if len(missing) > 1 else ""
            hints = "; ".join(hint for _, hint in missing)
            raise ConfigError(f"{names}: required setting{plural} missing ({hints})")

    def require_database(self) -> str:
        """The database DSN, or ConfigError naming DATABASE_URL."""
        self.check_required(freshdesk=False)
        assert self.database_url is not None
        return self.database_url.get_secret_value()

    def require_freshdesk(self) -> tuple[str, str]:
        """(base URL, API key), or ConfigError naming what is missing (case B25)."""
        self.check_required(database=False)
        assert self.freshdesk_url is not None
        assert self.freshdesk_api_key is not None
        return self.freshdesk_url, self.freshdesk_api_key.get_secret_value()

    def masked(self) -> dict[str, Any]:
        """The effective settings as JSON-ready data with every secret masked."""
        return {**self.model_dump(mode="json"), "lease": self.lease_seconds}

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        env = _StrippedEnvSource(settings_cls, case_sensitive=False, env_prefix=ENV_PREFIX)
        return init_settings, env, file_secret_settings


def env_name(field: str) -> str:
    """The environment variable a sysadmin sets for a field."""
    info = Settings.model_fields.get(field)
    if info is not None and isinstance(info.validation_alias, AliasChoices):
        first = info.validation_alias.choices[0]
        if isinstance(first, str):
            return first
    return f"{ENV_PREFIX}{field.upper()}"


def describe_error(exc: ValidationError) -> str:
    """One line naming the variable and what is expected, for the first error."""
    err = exc.errors(include_url=False, include_input=False)[0]
    field = str(err["loc"][0]) if err["loc"] else ""
    message = str(err["msg"]).removeprefix("Value error, ")
    if not field:
        return message
    return f"{env_name(field)}: {message}"


def load_settings(**overrides: Any) -> Settings:
    """Read Settings from the environment and `$CREDENTIALS_DIRECTORY`.

    Raises ConfigError with a one-line message when anything is invalid.
    """
    secrets_dir = os.environ.get("CREDENTIALS_DIRECTORY") or None
    try:
        return Settings(_secrets_dir=secrets_dir, **overrides)
    except ValidationError as exc:
        raise ConfigError(describe_error(exc)) from None
