"""Sign-in and tokens of the XO simulator: permissions, ms-format durations, validity limits, expiry (fake clock)."""

from __future__ import annotations

import pytest

from services.xo_simulator.auth import DEFAULT_TOKEN_VALIDITY_MS, Authenticator, parse_ms
from services.xo_simulator.errors import PlainError, XoApiError
from services.xo_simulator.topology import TokenSpec, UserSpec

USERS = [UserSpec(email="admin@x", password="pw", permission="admin"), UserSpec(email="v@x", password="pw")]


class Clock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


@pytest.mark.parametrize(("text", "millis"), [
    ("90000", 90_000), ("1h", 3_600_000), ("30 days", 30 * 86_400_000), ("0.5 year", 0.5 * 365.25 * 86_400_000),
    ("2 Minutes", 120_000), ("1.5s", 1500), ("100ms", 100), ("1w", 7 * 86_400_000), ("soon", None), ("1 h m", None),
    ("", None),
])
def test_ms_format_like_the_npm_package(text: str, millis: float | None) -> None:
    assert parse_ms(text) == millis


def test_tokens_belong_to_their_user_and_carry_its_permission() -> None:
    auth = Authenticator([TokenSpec(token="t1"), TokenSpec(token="t2", user="v@x")], USERS, Clock())
    assert auth.sign_in({"token": "t1"})[0]["permission"] == "admin"
    viewer, expires_at_s = auth.sign_in({"token": "t2"})
    assert (viewer["email"], viewer["permission"], expires_at_s) == ("v@x", "none", None)
    assert auth.sign_in({"username": "v@x", "password": "pw"})[0] == viewer
    no_users = Authenticator([TokenSpec(token="t")], [], Clock())
    assert no_users.sign_in({"token": "t"})[0]["permission"] == "admin"  # the default admin of old topologies


def test_an_expired_token_is_invalid_credentials() -> None:
    clock = Clock()
    auth = Authenticator([TokenSpec(token="t", expires_in_s=10)], USERS, clock)
    assert auth.sign_in({"token": "t"})[1] == 1010.0
    clock.now_s = 1010.0
    with pytest.raises(XoApiError) as info:
        auth.sign_in({"token": "t"})
    assert (info.value.code, info.value.data) == (3, None)


def test_created_tokens_default_to_30_days_and_expire() -> None:
    clock = Clock()
    auth = Authenticator([], USERS, clock)
    token = auth.create_token("v@x", {})
    assert auth.sign_in({"token": token})[1] == 1000.0 + DEFAULT_TOKEN_VALIDITY_MS / 1000
    short = auth.create_token("v@x", {"expiresIn": "1 minute"})
    clock.now_s += 60
    with pytest.raises(XoApiError):
        auth.sign_in({"token": short})
    assert auth.sign_in({"token": token})[0]["email"] == "v@x"


@pytest.mark.parametrize(("expires_in", "message"), [
    (59_999, "invalid expiresIn duration: 59999"), (59_999.0, "invalid expiresIn duration: 59999"),
    ("1 year", "too high expiresIn duration: 1 year"), ("later", "not a valid duration: undefined"),
])
def test_out_of_range_durations_are_plain_errors(expires_in: object, message: str) -> None:
    with pytest.raises(PlainError, match=f"^{message}$"):
        Authenticator([], USERS, Clock()).create_token("v@x", {"expiresIn": expires_in})


def test_a_client_id_refreshes_its_unexpired_token() -> None:
    clock = Clock()
    auth = Authenticator([], USERS, clock)
    first = auth.create_token("v@x", {"client": {"id": "c"}, "expiresIn": 120_000})
    assert auth.create_token("v@x", {"client": {"id": "c"}}) == first
    assert auth.create_token("admin@x", {"client": {"id": "c"}}) != first  # another user's client
    clock.now_s += 31 * 86_400
    assert auth.create_token("v@x", {"client": {"id": "c"}}) != first
