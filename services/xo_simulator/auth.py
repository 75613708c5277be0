"""Sign-in: tokens and email/password users from the topology, and the public user shape XO returns."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .errors import PlainError, invalid_credentials
from .topology import UserSpec, derived_id

DEFAULT_EMAIL = "admin@example.org"


def public_user(email: str) -> dict[str, Any]:
    """The fields getUserPublicProperties returns for an admin user."""
    return {
        "id": derived_id("user", email),
        "email": email,
        "permission": "admin",
        "groups": [],
        "preferences": {},
        "authProviders": {},
    }


class Authenticator:
    """Checks credentials; every user is an admin, every token belongs to the first user."""

    def __init__(self, tokens: Sequence[str], users: Sequence[UserSpec]) -> None:
        self._tokens = frozenset(tokens)
        self._passwords = {user.email: user.password for user in users}
        self._token_email = users[0].email if users else DEFAULT_EMAIL

    def sign_in(self, credentials: Mapping[str, Any]) -> dict[str, Any]:
        """Return the public user for ``{token}`` or ``{email|username, password}``.

        Raises invalid credentials (code 3) for anything unknown and a plain "empty password" error
        for an empty password, as xo-server does.
        """
        token = credentials.get("token")
        if token is not None:
            if isinstance(token, str) and token in self._tokens:
                return public_user(self._token_email)
            raise invalid_credentials()
        email = credentials.get("email", credentials.get("username"))
        password = credentials.get("password")
        if password == "":
            raise PlainError("empty password")
        if isinstance(email, str) and isinstance(password, str) and self._passwords.get(email) == password:
            return public_user(email)
        raise invalid_credentials()
