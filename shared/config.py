"""Reusable pydantic-settings blocks shared by the services: XO, RabbitMQ, Redis, logging.

Environment names follow the Go driver m4rCsi where it has one (XOA_URL, XOA_TOKEN, XOA_USERNAME,
XOA_PASSWORD). Secrets are SecretStr and never printed. No settings object is built at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.amqp_failover import broker_addresses

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
    """How to reach RabbitMQ: one node, or the nodes of a cluster (shared/amqp_failover.py)."""

    # hide_input_in_errors: a rejected URL carries its password
    model_config = SettingsConfigDict(env_prefix="", extra="ignore", populate_by_name=True, hide_input_in_errors=True)

    amqp_url: SecretStr = Field(
        default=SecretStr("amqp://guest:guest@127.0.0.1:5672/"),
        description="AMQP_URL, credentials included; a cluster's nodes as several URLs separated by commas",
    )
    publish_timeout_s: float = Field(default=10.0, gt=0, validation_alias=AliasChoices(
        "publish_timeout_s", "AMQP_PUBLISH_TIMEOUT_S"))
    connect_timeout_s: float = Field(default=10.0, gt=0, validation_alias=AliasChoices(
        "connect_timeout_s", "AMQP_CONNECT_TIMEOUT_S"), description="bound on connecting to one node")

    @field_validator("amqp_url")
    @classmethod
    def _addresses(cls, value: SecretStr) -> SecretStr:
        broker_addresses(value.get_secret_value())  # ValueError naming AMQP_URL and the fix, never the password
        return value

    @property
    def amqp_urls(self) -> tuple[str, ...]:
        """The broker URLs of AMQP_URL, in order (the first that answers is used; failover goes down the list)."""
        return broker_addresses(self.amqp_url.get_secret_value())


class RedisSettings(BaseSettings):
    """How to reach Redis: one server (REDIS_URL), or the primary that Redis Sentinel names (REDIS_SENTINELS +
    REDIS_SENTINEL_MASTER), which follows a failover."""

    # hide_input_in_errors: a rejected URL carries its password
    model_config = SettingsConfigDict(env_prefix="", extra="ignore", populate_by_name=True, hide_input_in_errors=True)

    redis_url: SecretStr = Field(default=SecretStr("redis://127.0.0.1:6379/0"), description="REDIS_URL")
    sentinels: str = Field(default="", validation_alias=AliasChoices("sentinels", "REDIS_SENTINELS"),
                           description="Sentinel addresses host:port,host:port,...; when set, REDIS_URL is unused")
    sentinel_master: str = Field(default="", validation_alias=AliasChoices("sentinel_master", "REDIS_SENTINEL_MASTER"),
                                 description="the name the sentinels monitor the primary under")
    sentinel_password: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("sentinel_password", "REDIS_SENTINEL_PASSWORD"),
        description="password of the sentinels themselves (requirepass in sentinel.conf), if any")
    password: SecretStr | None = Field(default=None, validation_alias=AliasChoices("password", "REDIS_PASSWORD"),
                                       description="password of the primary found through the sentinels, if any")
    db: int = Field(default=0, ge=0, validation_alias=AliasChoices("db", "REDIS_DB"),
                    description="database number on the primary found through the sentinels")
    socket_timeout_s: float = Field(default=5.0, gt=0, validation_alias=AliasChoices(
        "socket_timeout_s", "REDIS_SOCKET_TIMEOUT_S"))
    max_connections: int = Field(default=64, ge=1, validation_alias=AliasChoices(
        "max_connections", "REDIS_MAX_CONNECTIONS"), description="connections one process keeps to Redis at most; a "
        "command finding them all in use waits for one (up to REDIS_SOCKET_TIMEOUT_S)")
    key_prefix: str = Field(default="xocsi:", description="prefix of every key this project writes",
                            validation_alias=AliasChoices("key_prefix", "REDIS_KEY_PREFIX"))

    @field_validator("sentinel_password", "password")
    @classmethod
    def _empty_is_none(cls, value: SecretStr | None) -> SecretStr | None:
        return None if value is not None and not value.get_secret_value() else value

    @model_validator(mode="after")
    def _sentinel_pair(self) -> RedisSettings:
        self.sentinel_addresses()  # ValueError naming REDIS_SENTINELS and the fix
        if self.sentinels and not self.sentinel_master:
            raise ValueError("REDIS_SENTINELS is set but REDIS_SENTINEL_MASTER is not: give the name the sentinels "
                             "monitor the primary under (sentinel monitor <name> ...), e.g. mymaster")
        if self.sentinel_master and not self.sentinels:
            raise ValueError("REDIS_SENTINEL_MASTER is set but REDIS_SENTINELS is not: give the sentinels as "
                             "host:port,host:port,...")
        return self

    @property
    def uses_sentinel(self) -> bool:
        return bool(self.sentinels)

    @property
    def configured(self) -> bool:
        """Whether Redis was configured at all (REDIS_URL or REDIS_SENTINELS given), not just defaulted."""
        return self.uses_sentinel or "redis_url" in self.model_fields_set

    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """REDIS_SENTINELS as (host, port) pairs; ValueError naming the setting and the fix."""
        addresses = []
        for item in filter(None, (part.strip() for part in self.sentinels.split(","))):
            host, _, port = item.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"REDIS_SENTINELS entry {item!r} is not host:port (e.g. redis-sentinel-0:26379); "
                                 "separate several with commas")
            addresses.append((host.strip("[]"), int(port)))
        return addresses


class LogSettings(BaseSettings):
    """Log level and format."""

    model_config = SettingsConfigDict(env_prefix="LOG_", extra="ignore")

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"

    @property
    def json_output(self) -> bool | None:
        return None if self.format == "auto" else self.format == "json"
