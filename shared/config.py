"""Reusable pydantic-settings blocks shared by the services: XO, RabbitMQ, Redis, logging.

Environment names follow the Go driver m4rCsi where it has one (XOA_URL, XOA_TOKEN, XOA_USERNAME,
XOA_PASSWORD). Secrets are SecretStr and never printed. No settings object is built at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_PLACEHOLDERS = {"changeme", "change-me", "<token>", "xxx", "todo", "secret"}


class XoSettings(BaseSettings):
    """How to reach Xen Orchestra. Token, or username and password."""

    model_config = SettingsConfigDict(env_prefix="XOA_", extra="ignore")

    url: str = Field(default="", description="XO address, e.g. https://xo.example.org (the client adds /api/)")
    token: SecretStr | None = Field(default=None, description="XO authentication token")
    username: str | None = Field(default=None, description="XO user (email) when no token is set")
    password: SecretStr | None = Field(default=None, description="password of XOA_USERNAME")
    timeout_s: float = Field(default=300.0, gt=0, description="bound on one mutating XO call (--xoa-timeout; 300 s "
                             "as m4rCsi: XAPI may queue a disk operation behind others)")
    read_timeout_s: float = Field(default=30.0, gt=0, description="bound on one XO read (xo.getAllObjects ...); "
                                  "never above timeout_s")
    settle_timeout_s: float = Field(default=30.0, gt=0, description="how long a write waits for XO's object cache "
                                    "to show its effect before the RPC is answered UNAVAILABLE (retryable)")
    connect_timeout_s: float = Field(default=10.0, gt=0, description="bound on connect and sign-in")
    ca_file: Path | None = Field(default=None, description="CA bundle to verify XO's TLS certificate")
    insecure: bool = Field(default=False, description="skip TLS verification (testing only)")

    @field_validator("token", "password")
    @classmethod
    def _no_placeholder(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and value.get_secret_value().strip().lower() in _PLACEHOLDERS:
            raise ValueError("is a placeholder value; set the real secret")
        if value is not None and not value.get_secret_value():
            return None
        return value

    def require_credentials(self) -> None:
        """Raise ValueError naming what is missing when XO cannot be reached with these settings."""
        if not self.url:
            raise ValueError("XOA_URL is not set: give the XO address, e.g. XOA_URL=https://xo.example.org")
        if self.token is None and not (self.username and self.password is not None):
            raise ValueError("no XO credentials: set XOA_TOKEN, or XOA_USERNAME and XOA_PASSWORD")


class RabbitSettings(BaseSettings):
    """How to reach RabbitMQ."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", populate_by_name=True)

    amqp_url: SecretStr = Field(
        default=SecretStr("amqp://guest:guest@127.0.0.1:5672/"), description="AMQP_URL, credentials included"
    )
    publish_timeout_s: float = Field(default=10.0, gt=0, validation_alias=AliasChoices(
        "publish_timeout_s", "AMQP_PUBLISH_TIMEOUT_S"))
    connect_timeout_s: float = Field(default=10.0, gt=0, validation_alias=AliasChoices(
        "connect_timeout_s", "AMQP_CONNECT_TIMEOUT_S"))


class RedisSettings(BaseSettings):
    """How to reach Redis."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", populate_by_name=True)

    redis_url: SecretStr = Field(default=SecretStr("redis://127.0.0.1:6379/0"), description="REDIS_URL")
    socket_timeout_s: float = Field(default=5.0, gt=0, validation_alias=AliasChoices(
        "socket_timeout_s", "REDIS_SOCKET_TIMEOUT_S"))
    key_prefix: str = Field(default="xocsi:", description="prefix of every key this project writes",
                            validation_alias=AliasChoices("key_prefix", "REDIS_KEY_PREFIX"))


class LogSettings(BaseSettings):
    """Log level and format."""

    model_config = SettingsConfigDict(env_prefix="LOG_", extra="ignore")

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"

    @property
    def json_output(self) -> bool | None:
        return None if self.format == "auto" else self.format == "json"
