"""Run code under shared.logging.configure_logging and put the process's logging back as it was afterwards."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import structlog

from shared.logging import configure_logging

_NOISY = ("aiormq", "aio_pika", "websockets", "aiohttp.access", "asyncio")


@contextlib.contextmanager
def configured_logging(level: str, *, json: bool) -> Iterator[None]:
    """configure_logging(level, json=json) for the block only.

    Loggers are not cached meanwhile: a module-level logger first used inside would otherwise keep this
    configuration (and a capture stream pytest closes) for the rest of the session.
    """
    root = logging.getLogger()
    handlers, level_before = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in _NOISY}
    config = structlog.get_config()
    try:
        configure_logging(level, json=json)
        structlog.configure(cache_logger_on_first_use=False)
        yield
    finally:
        structlog.reset_defaults()
        structlog.configure(**config)
        root.handlers[:] = handlers
        root.setLevel(level_before)
        for name, saved in levels.items():
            logging.getLogger(name).setLevel(saved)
        structlog.contextvars.clear_contextvars()
