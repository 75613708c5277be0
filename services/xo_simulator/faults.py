"""Latency and fault injection: per-method delays, injected errors, dropped sockets, expired sessions, lost pools.

Rules are checked before a method runs; ``expire_sessions`` and ``pool_disconnect`` are not rules but
actions the server performs when they are added (outages.py times the lost pool). Random draws come from
a seedable generator for reproducible runs.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import SimError, XapiError, XoApiError


@dataclass(frozen=True)
class Latency:
    """Delay per method in ms; ``*`` is the default. Parsed from ``"20"`` or ``"vdi.migrate=50,*=2"``."""

    per_method_ms: Mapping[str, float]

    @classmethod
    def parse(cls, spec: str | float | int | None) -> Latency:
        """Parse a latency spec; ValueError on a malformed one."""
        if spec is None or spec == "":
            return cls({})
        if isinstance(spec, int | float):
            return cls({"*": float(spec)})
        table: dict[str, float] = {}
        for item in spec.split(","):
            name, sep, value = item.strip().rpartition("=")
            key = name.strip() if sep else "*"
            try:
                delay_ms = float(value)
            except ValueError as exc:
                raise ValueError(f"latency {item!r} is not a number of ms or method=ms") from exc
            if delay_ms < 0:
                raise ValueError(f"latency {item!r} is negative")
            table[key] = delay_ms
        return cls(table)

    def for_method_s(self, method: str) -> float:
        """Delay to apply to a call of ``method``, in seconds."""
        return self.per_method_ms.get(method, self.per_method_ms.get("*", 0.0)) / 1000


class ErrorSpec(BaseModel):
    """The XO error to send: ``{code, message, data?}``."""

    model_config = ConfigDict(extra="forbid")
    code: int
    message: str
    data: Any = None


ACTION_KINDS = frozenset({"expire_sessions", "pool_disconnect"})
STREAM_METHODS = ("rest.vdi.export", "rest.vdi.import")  # REST content streams (streams.py)


class FaultRule(BaseModel):
    """One rule: ``{method, error|xapi, count?, rate?}``, ``{kind: drop_socket, ...}``, ``{kind: expire_sessions}``
    or ``{kind: pool_disconnect, pool, duration_s?}``.

    ``method`` None or ``"*"`` matches every JSON-RPC method; ``count`` None means unlimited; a pool_disconnect
    without ``duration_s`` lasts until the faults are cleared. REST calls (``rest.vdi.*``, streams.py) match only
    rules naming them; on the content streams (``rest.vdi.export``, ``rest.vdi.import``) ``after_bytes`` lets
    that many bytes through first: then an error rule answers its error (an import: XO's 500 after the blocks
    written so far) and a drop_socket rule cuts the connection. ``after_calls`` lets that many matching calls
    through before the rule fires (e.g. the third ``vdi.set``).
    """

    model_config = ConfigDict(extra="forbid")
    kind: Literal["error", "drop_socket", "expire_sessions", "pool_disconnect"] = "error"
    pool: str | None = None
    duration_s: float | None = Field(default=None, gt=0)
    method: str | None = None
    error: ErrorSpec | None = None
    xapi: str | None = None
    xapi_params: list[str] = []
    count: int | None = Field(default=None, ge=0)
    rate: float = Field(default=1.0, ge=0.0, le=1.0)
    after_bytes: int | None = Field(default=None, ge=0)
    after_calls: int = Field(default=0, ge=0)  # let this many matching calls through before the rule fires

    @model_validator(mode="after")
    def _check_kind(self) -> FaultRule:
        if self.kind == "error":
            if (self.error is None) == (self.xapi is None):
                raise ValueError("an error rule needs exactly one of 'error' or 'xapi'")
            if self.method is None:
                raise ValueError("an error rule needs a 'method' (use '*' for every method)")
        elif self.error is not None or self.xapi is not None:
            raise ValueError(f"a {self.kind} rule takes no 'error' or 'xapi'")
        if (self.kind == "pool_disconnect") != (self.pool is not None):
            raise ValueError("'pool' (a pool uuid) goes with, and only with, kind pool_disconnect")
        if self.duration_s is not None and self.kind != "pool_disconnect":
            raise ValueError("'duration_s' goes only with kind pool_disconnect")
        if self.after_bytes is not None and self.method not in STREAM_METHODS:
            raise ValueError(f"'after_bytes' goes only with a stream method: {', '.join(STREAM_METHODS)}")
        return self

    def matches(self, method: str, *, exact: bool = False) -> bool:
        """Whether this rule applies to a call of ``method`` (ignoring count and rate); ``exact``: only a rule
        naming ``method`` (REST calls), not ``*``."""
        return (self.method == method or (not exact and self.method in (None, "*"))) and self.count != 0

    def to_error(self, method: str) -> SimError:
        """The error this rule injects."""
        if self.xapi is not None:
            return XapiError(self.xapi, self.xapi_params, method=method)
        assert self.error is not None
        return XoApiError(self.error.code, self.error.message, self.error.data)


class Faults:
    """The live rule set plus the latency table."""

    def __init__(self, latency: Latency | None = None, seed: int | None = None) -> None:
        self.latency = latency or Latency({})
        self._rules: list[FaultRule] = []
        self._random = random.Random(seed)

    @staticmethod
    def parse(specs: Iterable[Mapping[str, Any]] | Mapping[str, Any]) -> list[FaultRule]:
        """Validate rule specs; raises pydantic.ValidationError."""
        items = [specs] if isinstance(specs, Mapping) else list(specs)
        return [FaultRule.model_validate(item) for item in items]

    def add(self, rules: Iterable[FaultRule]) -> None:
        """Install rules (``expire_sessions`` and ``pool_disconnect`` are actions and are not stored)."""
        self._rules.extend(rule for rule in rules if rule.kind not in ACTION_KINDS)

    def clear(self) -> None:
        """Remove every rule (latency is kept)."""
        self._rules.clear()

    def rules(self) -> list[dict[str, Any]]:
        """JSON-ready view of the installed rules with their remaining counts."""
        return [rule.model_dump(exclude_none=True) for rule in self._rules]

    def pick(self, method: str, *, exact: bool = False) -> FaultRule | None:
        """Return the first rule that fires for this call, consuming one of its ``count`` (``exact``: see
        FaultRule.matches)."""
        for rule in self._rules:
            if not rule.matches(method, exact=exact):
                continue
            if rule.after_calls > 0:
                rule.after_calls -= 1
                continue
            if rule.rate < 1.0 and self._random.random() >= rule.rate:
                continue
            if rule.count is not None:
                rule.count -= 1
            return rule
        return None
