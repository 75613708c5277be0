"""Several RabbitMQ nodes behind one AMQP_URL: the address list (``broker_addresses``) and a robust connection
that fails over along it (``FailoverConnection``).

AMQP_URL holds one URL, or the URLs of a cluster's nodes separated by commas::

    amqp://xocsi:pw@rabbit-0:5672/,amqp://xocsi:pw@rabbit-1:5672/,amqp://xocsi:pw@rabbit-2:5672/

A list is split only at a comma followed by ``amqp://`` or ``amqps://``, so a comma inside a password needs no
escaping. Every address must name the same vhost (they are one broker).

aio-pika's RobustConnection reconnects to the one URL it was given. ``FailoverConnection`` keeps all of its
machinery (the reconnect loop; channels, QoS, exchanges, queues, bindings and consumers restored on the new
connection) and changes only where each attempt goes. aio-pika reports both a lost connection and a failed
connection attempt through ``_on_connection_close``, and reads ``url`` afresh at every attempt; moving ``url``
to the next address there makes the reconnect loop cycle through the list. The loop's pause
(``reconnect_interval``) applies after a whole round of failed addresses; within a round the next address is
tried at once. (aio-pika also pauses that long after a successful connect, so a connection lost sooner is
re-made once the pause is over.) The first ``connect()`` fails only once every address has failed (aio-pika's
fail-fast, over the list). tests/integration/test_amqp_failover.py pins this behaviour against a real broker.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from typing import Any

import aio_pika
from aio_pika.abc import TimeoutType
from yarl import URL

from shared.logging import get_logger

log = get_logger(__name__)

AMQP_SCHEMES = ("amqp", "amqps")
_SPLIT = re.compile(r",\s*(?=amqps?://)", re.IGNORECASE)
_EXAMPLE = "amqp://user:password@host:5672/vhost"


def broker_addresses(value: str, *, setting: str = "AMQP_URL") -> tuple[str, ...]:
    """The broker URLs in ``value`` (one URL, or several separated by commas), checked: scheme amqp/amqps, a
    host, a valid port, the same vhost everywhere. ValueError naming ``setting`` and the fix; never the
    password."""
    parts = [part.strip() for part in _SPLIT.split(value.strip())]
    if not parts or not parts[0]:
        raise ValueError(f"{setting} is empty: give the broker's URL, e.g. {_EXAMPLE}")
    vhosts = {_vhost(part, index, len(parts), setting) for index, part in enumerate(parts)}
    if len(vhosts) > 1:
        raise ValueError(f"{setting}: its {len(parts)} addresses name different vhosts ({', '.join(sorted(vhosts))});"
                         " they must be the nodes of one broker, with one vhost")
    return tuple(parts)


def _vhost(part: str, index: int, count: int, setting: str) -> str:
    where = f"{setting} address {index + 1} of {count}" if count > 1 else setting
    if "," in part.rpartition("@")[2]:
        raise ValueError(f"{where} has a comma after its host; give each node as a whole URL, e.g. "
                         "amqp://user:password@node-0:5672/vhost,amqp://user:password@node-1:5672/vhost")
    try:
        url = URL(part)
        port = url.port  # an invalid port raises here
    except ValueError:
        raise ValueError(f"{where} is not a URL; expected {_EXAMPLE}") from None
    if url.scheme.lower() not in AMQP_SCHEMES or not url.host:
        raise ValueError(f"{where} must look like {_EXAMPLE} (scheme amqp or amqps, a host); separate the "
                         "addresses of several nodes with commas")
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"{where}: port {port} is out of range")
    return url.path.removeprefix("/") or "/"


def describe(url: URL) -> str:
    """``host:port`` of an address: what logs and errors may show (no user, no password)."""
    return f"{url.host}:{url.port}"


class FailoverConnection(aio_pika.RobustConnection):
    """A RobustConnection over ``urls``: connects to the first that answers, and after every lost connection or
    failed attempt moves on to the next (wrapping around). Built by ``connect_failover``."""

    def __init__(self, urls: Sequence[str | URL], **kwargs: Any) -> None:
        if not urls:
            raise ValueError("FailoverConnection needs at least one broker address")
        self.urls = tuple(URL(url) for url in urls)
        self._current = 0
        self._failures = 0  # failed attempts and lost connections since the last successful connect
        self._round_pause_s = 5.0  # set by RobustConnection.__init__ through the reconnect_interval setter
        self._first_round: asyncio.Future[BaseException] | None = None
        # fail_fast off: aio-pika would give up after the first address; connect() fails fast over the round
        super().__init__(self.urls[0], **{**kwargs, "fail_fast": False})

    @property  # aio-pika's plain attribute, read by its reconnect loop after every attempt
    def reconnect_interval(self) -> float:
        """What aio-pika's reconnect loop sleeps after an attempt: nothing while addresses of this round remain
        untried, the configured pause (URL option ``reconnect_interval``, default 5 s) after a whole round."""
        return 0.0 if self._failures % len(self.urls) else self._round_pause_s

    @reconnect_interval.setter
    def reconnect_interval(self, value: float) -> None:
        self._round_pause_s = value

    @property
    def current_url(self) -> URL:
        """The address the next (or current) connection goes to."""
        return self.urls[self._current]

    def __str__(self) -> str:
        # aio-pika names the connection in its own log lines, after the address moved on: name them all
        hosts = ",".join(describe(url) for url in self.urls)
        return f"{self.urls[0].scheme}://[{hosts}]{self.urls[0].path}"

    async def connect(self, timeout: TimeoutType = None) -> None:
        """Connect (each attempt bounded by ``timeout``). The first call raises the last address's error once
        every address failed once, and when it fails or is cancelled it leaves nothing running."""
        if self._first_round is not None:
            await super().connect(timeout)
            return
        self._first_round = first_round = self.loop.create_future()
        connecting: asyncio.Future[None] = asyncio.ensure_future(super().connect(timeout))
        try:
            either: set[asyncio.Future[Any]] = {connecting, first_round}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if not connecting.done():
                raise first_round.result()
            connecting.result()  # raises what the connect raised
        except BaseException:
            connecting.cancel()
            await asyncio.shield(self.close())
            raise

    async def _on_connected(self) -> None:
        await super()._on_connected()  # restores the channels; an error there closes the transport again
        self._failures = 0
        log.info("amqp_connected", address=describe(self.current_url), addresses=len(self.urls))

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        if not (self._close_called or self.is_closed):
            self._advance(_error_of(closing))
        await super()._on_connection_close(closing)

    def _advance(self, error: BaseException | None) -> None:
        failed = self.current_url
        self._failures += 1
        self._current = (self._current + 1) % len(self.urls)
        self.url = self.current_url  # what aio-pika's next attempt connects to
        log.warning("amqp_address_failed", address=describe(failed), error=type(error).__name__ if error else None,
                    next_address=describe(self.current_url), failures=self._failures,
                    pause_s=self.reconnect_interval)
        round_ = self._first_round
        if round_ is not None and not round_.done() and self._failures >= len(self.urls):
            round_.set_result(error or ConnectionError(f"no broker answered at {self}"))


def _error_of(closing: asyncio.Future[Any]) -> BaseException | None:
    if closing.cancelled():
        return None
    return closing.exception()


async def connect_failover(urls: Sequence[str], *, timeout_s: float, client_properties: dict[str, Any]
                           ) -> FailoverConnection:
    """A connected FailoverConnection over ``urls``: each attempt bounded by ``timeout_s``; the error of the
    last address when none answers."""
    connection = FailoverConnection(urls, client_properties=client_properties)
    await connection.connect(timeout=timeout_s)
    return connection
