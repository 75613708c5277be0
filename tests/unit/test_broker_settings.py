"""AMQP_URL as a list of a cluster's nodes and Redis through Sentinel, as the services read them from the
environment: what is accepted, and bad input refused with an error naming the setting and the fix, never the
password."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.csi_frontend.__main__ import messaging_settings
from shared.amqp_failover import broker_addresses
from shared.config import RabbitSettings, RedisSettings

PASSWORD = "pa,ss@w0rd"  # a comma and an @ in the password: neither splits the list


def _error(settings: type[RabbitSettings] | type[RedisSettings], monkeypatch: pytest.MonkeyPatch,
           **env: str) -> str:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as raised:
        settings()
    text = str(raised.value)
    assert PASSWORD not in text and "secret" not in text
    return text


def test_one_url_is_one_address() -> None:
    assert broker_addresses("amqp://u:p@rabbit:5672/") == ("amqp://u:p@rabbit:5672/",)


def test_a_list_splits_only_before_a_scheme(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMQP_URL", f"amqp://xocsi:{PASSWORD}@r-0:5672/csi, amqps://xocsi:{PASSWORD}@r-1:5671/csi,"
                                   f"AMQP://xocsi:{PASSWORD}@r-2/csi")
    assert RabbitSettings().amqp_urls == (f"amqp://xocsi:{PASSWORD}@r-0:5672/csi",
                                          f"amqps://xocsi:{PASSWORD}@r-1:5671/csi",
                                          f"AMQP://xocsi:{PASSWORD}@r-2/csi")


@pytest.mark.parametrize(("value", "expected"), [
    ("", "AMQP_URL is empty: give the broker's URL, e.g. amqp://user:password@host:5672/vhost"),
    (f"http://u:{PASSWORD}@r-0/", "AMQP_URL must look like amqp://user:password@host:5672/vhost (scheme amqp or "
                                  "amqps, a host); separate the addresses of several nodes with commas"),
    (f"amqp://u:{PASSWORD}@r-0:5672,r-1:5672/", "AMQP_URL has a comma after its host; give each node as a whole "
                                                "URL, e.g. amqp://user:password@node-0:5672/vhost,amqp://"),
    (f"amqp://u:{PASSWORD}@r-0:99999/", "AMQP_URL is not a URL; expected amqp://user:password@host:5672/vhost"),
    (f"amqp://u:{PASSWORD}@r-0/a,amqp://u:{PASSWORD}@r-1/b",
     "AMQP_URL: its 2 addresses name different vhosts (a, b); they must be the nodes of one broker, with one vhost"),
    (f"amqp://u:{PASSWORD}@r-0/,amqp:///", "AMQP_URL address 2 of 2 must look like amqp://user:password@host:5672/"
                                           "vhost (scheme amqp or amqps, a host)"),
])
def test_bad_amqp_url_names_the_setting_and_the_fix(monkeypatch: pytest.MonkeyPatch, value: str,
                                                     expected: str) -> None:
    assert expected in _error(RabbitSettings, monkeypatch, AMQP_URL=value)


def test_sentinels_with_their_master_and_passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_SENTINELS", "s-0:26379, s-1:26379,[::1]:26380")
    monkeypatch.setenv("REDIS_SENTINEL_MASTER", "xocsi")
    monkeypatch.setenv("REDIS_PASSWORD", PASSWORD)
    monkeypatch.setenv("REDIS_SENTINEL_PASSWORD", "")
    monkeypatch.setenv("REDIS_DB", "2")
    settings = RedisSettings()
    assert settings.uses_sentinel and settings.configured
    assert settings.sentinel_addresses() == [("s-0", 26379), ("s-1", 26379), ("::1", 26380)]
    assert (settings.sentinel_master, settings.db, settings.sentinel_password) == ("xocsi", 2, None)
    assert settings.password is not None and settings.password.get_secret_value() == PASSWORD
    assert PASSWORD not in repr(settings)


@pytest.mark.parametrize(("env", "expected"), [
    ({"REDIS_SENTINELS": "s-0:26379"}, "REDIS_SENTINELS is set but REDIS_SENTINEL_MASTER is not: give the name the "
                                       "sentinels monitor the primary under"),
    ({"REDIS_SENTINEL_MASTER": "xocsi"}, "REDIS_SENTINEL_MASTER is set but REDIS_SENTINELS is not: give the "
                                         "sentinels as host:port,host:port,..."),
    ({"REDIS_SENTINELS": "s-0:26379,s-1", "REDIS_SENTINEL_MASTER": "x"},
     "REDIS_SENTINELS entry 's-1' is not host:port (e.g. redis-sentinel-0:26379); separate several with commas"),
    ({"REDIS_SENTINELS": "s-0:0", "REDIS_SENTINEL_MASTER": "x"}, "REDIS_SENTINELS entry 's-0:0' is not host:port"),
])
def test_bad_sentinel_settings_name_the_setting_and_the_fix(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                                                            expected: str) -> None:
    monkeypatch.setenv("REDIS_URL", f"redis://:{PASSWORD}@redis:6379/0")
    assert expected in _error(RedisSettings, monkeypatch, **env)


@pytest.mark.parametrize(("env", "expected"), [
    ({"AMQP_URL": "amqp://u:p@r-0/,amqp://u:p@r-1/", "REDIS_URL": "redis://redis:6379/0"}, (True, True)),
    ({"AMQP_URL": "amqp://u:p@r-0/", "REDIS_SENTINELS": "s-0:26379", "REDIS_SENTINEL_MASTER": "x"}, (True, True)),
    ({"AMQP_URL": "amqp://u:p@r-0/"}, (True, False)),
    ({"REDIS_SENTINELS": "s-0:26379", "REDIS_SENTINEL_MASTER": "x"}, (False, True)),
])
def test_the_frontend_sees_rabbitmq_and_redis_given_either_way(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                                                               expected: tuple[bool, bool]) -> None:
    """Both given = migrations on; Redis alone (a URL or sentinels) = the temporary-disk cleanup's lease."""
    for name in ("AMQP_URL", "REDIS_URL", "REDIS_SENTINELS", "REDIS_SENTINEL_MASTER"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    rabbit, redis = messaging_settings()
    assert (rabbit is not None, redis is not None) == expected
