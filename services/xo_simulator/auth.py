"""Sign-in and tokens: topology users with their permission, tokens that expire, ``token.create``.

Follows xo-server's authentication mixin and token API (XO-STREAMS-AND-CACHE §E3): a bad or expired
token gives code 3 without data; ``expiresIn`` is ms (number) or an ``ms``-format string, at least 60 s,
at most half a year, default 30 days; errors about it are plain errors (masked for non-admins).
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import PlainError, invalid_credentials
from .topology import TokenSpec, UserSpec, derived_id

DEFAULT_EMAIL = "admin@example.org"
MIN_TOKEN_VALIDITY_MS = 60_000
DEFAULT_TOKEN_VALIDITY_MS = 30 * 86_400_000
MAX_TOKEN_VALIDITY_MS = 0.5 * 365.25 * 86_400_000  # config.toml maxTokenValidity = '0.5 year'

# The `ms` npm package (v2), which @vates/parse-duration uses for strings.
_MS_RE = re.compile(
    r"^(-?(?:\d+)?\.?\d+) *(milliseconds?|msecs?|ms|seconds?|secs?|s|minutes?|mins?|m|hours?|hrs?|h|days?|d|"
    r"weeks?|w|years?|yrs?|y)?$", re.IGNORECASE)
_UNIT_MS = {"y": 365.25 * 86_400_000, "w": 7 * 86_400_000, "d": 86_400_000, "h": 3_600_000, "m": 60_000,
            "s": 1000}


def parse_ms(text: str) -> float | None:
    """The value of an ``ms``-format duration in ms ("1h", "30 days", "0.5 year", "90000"), None if unparsable."""
    match = _MS_RE.match(text) if len(text) <= 100 else None
    if match is None:
        return None
    unit = (match.group(2) or "ms").lower()
    is_millis = unit.startswith(("ms", "msec", "milli"))
    return float(match.group(1)) * (1 if is_millis else _UNIT_MS[unit[0]])


def _js_text(value: Any) -> str:
    """How JavaScript writes a number or string in a message ("60000", not "60000.0")."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def public_user(email: str, permission: str) -> dict[str, Any]:
    """The fields getUserPublicProperties returns."""
    return {
        "id": derived_id("user", email),
        "email": email,
        "permission": permission,
        "groups": [],
        "preferences": {},
        "authProviders": {},
    }


@dataclass
class _Token:
    email: str
    expires_at_s: float | None
    client_id: str | None = None
    description: str | None = None


class Authenticator:
    """Checks credentials and issues tokens; ``now_s`` is the wall clock (XO compares with Date.now())."""

    def __init__(self, tokens: Sequence[TokenSpec], users: Sequence[UserSpec],
                 now_s: Callable[[], float] = time.time) -> None:
        self._now_s = now_s
        self._users = {user.email: user for user in users}
        self._first_email = users[0].email if users else DEFAULT_EMAIL
        started_s = now_s()
        self._tokens = {
            spec.token: _Token(spec.user or self._first_email,
                               None if spec.expires_in_s is None else started_s + spec.expires_in_s)
            for spec in tokens
        }

    def user(self, email: str) -> dict[str, Any]:
        """The public user for a known email (the default admin when the topology has no users)."""
        spec = self._users.get(email)
        return public_user(email, spec.permission if spec is not None else "admin")

    def sign_in(self, credentials: Mapping[str, Any]) -> tuple[dict[str, Any], float | None]:
        """Return (public user, session expiry in wall-clock seconds or None) for ``{token}`` or
        ``{email|username, password}``.

        Raises invalid credentials (code 3) for anything unknown or expired, and a plain "empty password"
        error for an empty password, as xo-server does.
        """
        token = credentials.get("token")
        if token is not None:
            found = self._tokens.get(token) if isinstance(token, str) else None
            if found is None or (found.expires_at_s is not None and found.expires_at_s <= self._now_s()):
                raise invalid_credentials()
            return self.user(found.email), found.expires_at_s
        email = credentials.get("email", credentials.get("username"))
        password = credentials.get("password")
        if password == "":
            raise PlainError("empty password")
        spec = self._users.get(email) if isinstance(email, str) else None
        if spec is not None and isinstance(password, str) and spec.password == password:
            return self.user(spec.email), None
        raise invalid_credentials()

    def create_token(self, email: str, params: Mapping[str, Any]) -> str:
        """``token.create``: a new token of ``email`` (or the refreshed one of the same ``client.id``)."""
        validity_ms = float(DEFAULT_TOKEN_VALIDITY_MS)
        expires_in = params.get("expiresIn")
        if expires_in is not None:
            validity_ms = _validity_ms(expires_in)
        expires_at_s = self._now_s() + validity_ms / 1000
        client = params.get("client")
        client_id = client.get("id") if isinstance(client, Mapping) else None
        description = params.get("description")
        if isinstance(client_id, str):
            for token_id, token in self._tokens.items():
                if token.client_id == client_id and token.email == email and not self._is_expired(token):
                    token.description, token.expires_at_s = description, expires_at_s
                    return token_id
        token_id = secrets.token_urlsafe(32)  # 43 characters, like XO's generateToken()
        self._tokens[token_id] = _Token(email, expires_at_s, client_id if isinstance(client_id, str) else None,
                                        description)
        return token_id

    def _is_expired(self, token: _Token) -> bool:
        return token.expires_at_s is not None and token.expires_at_s <= self._now_s()


def _validity_ms(expires_in: Any) -> float:
    if isinstance(expires_in, str):
        parsed = parse_ms(expires_in)
        if parsed is None:
            raise PlainError("not a valid duration: undefined")  # sic: @vates/parse-duration prints the result
        duration_ms = parsed
    else:
        duration_ms = float(expires_in)
    if duration_ms < MIN_TOKEN_VALIDITY_MS:
        raise PlainError(f"invalid expiresIn duration: {_js_text(expires_in)}")
    if duration_ms > MAX_TOKEN_VALIDITY_MS:
        raise PlainError(f"too high expiresIn duration: {_js_text(expires_in)}")
    return duration_ms
