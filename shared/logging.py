"""The only place structlog is configured: JSON lines when stderr is not a TTY, console otherwise.

Secrets never reach here as plain values: settings hold them as SecretStr, and the redaction
processor below masks any key that looks like a credential as a last line of defence.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog
from structlog.tracebacks import ExceptionDictTransformer

_SECRET_KEYS = ("token", "password", "secret", "authorization", "cookie")
_REDACTED = "**redacted**"


def _redact(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event_dict):
        if any(marker in key.lower() for marker in _SECRET_KEYS) and event_dict[key] is not None:
            event_dict[key] = _REDACTED
    return event_dict


def configure_logging(level: str = "info", *, json: bool | None = None, service: str | None = None) -> None:
    """Configure structlog and the stdlib root logger once per process.

    ``json=None`` picks JSON when stderr is not a TTY. ``service`` is bound to every line.
    """
    use_json = (not sys.stderr.isatty()) if json is None else json
    numeric_level = logging.getLevelName(level.upper())
    if not isinstance(numeric_level, int):
        raise ValueError(f"log level {level!r} is not one of debug, info, warning, error")
    logging.basicConfig(stream=sys.stderr, level=numeric_level, format="%(message)s", force=True)
    for noisy in ("aiormq", "aio_pika", "websockets", "aiohttp.access", "asyncio"):
        logging.getLogger(noisy).setLevel(max(numeric_level, logging.WARNING))
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
    ]
    if use_json:
        # Tracebacks without frame locals: a local (a sign-in payload, an HTTP request's headers) may hold a token.
        tracebacks = structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False))
        processors += [tracebacks, structlog.processors.JSONRenderer()]
    else:
        processors += [structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback)]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    if service:
        structlog.contextvars.bind_contextvars(service=service)


def get_logger(name: str | None = None) -> Any:
    """Return a structlog logger; call at module level."""
    return structlog.get_logger(name)
