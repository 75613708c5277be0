"""AMQP_URL with several addresses (shared/amqp_failover.py) against the session's real RabbitMQ: the first connect
skips addresses that refuse, fails fast (over the whole list) without leaking the password or a task when none
answers, and a connection the broker drops comes back on the next address with its consumer. Two names of the
one broker (127.0.0.1 and localhost) stand for two nodes; tests/ha/ does it with a real cluster."""

from __future__ import annotations

import asyncio
import time
from urllib.parse import quote

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from yarl import URL

from dev.brokers import management_client, pick_free_port
from shared import broker
from shared.amqp_failover import FailoverConnection
from shared.errors import BackendUnavailable
from tests.support.brokers import RabbitEndpoint
from tests.support.e2e import vhost_of
from tests.support.wait import eventually

pytestmark = pytest.mark.integration

TIMEOUT_S = 10.0
PASSWORD = "s3cret-pw"


def _refusing(amqp_url: str) -> str:
    """An address of the same shape where nothing listens."""
    return str(URL(amqp_url).with_port(pick_free_port()))


def _as_localhost(amqp_url: str) -> str:
    return str(URL(amqp_url).with_host("localhost"))


async def test_first_connect_skips_an_address_that_refuses(amqp_vhost: str, rabbitmq: RabbitEndpoint) -> None:
    connection = await broker.connect(f"{_refusing(amqp_vhost)},{amqp_vhost}", name="failover-first",
                                      timeout_s=TIMEOUT_S)
    try:
        assert isinstance(connection, FailoverConnection)
        assert connection.current_url.port == rabbitmq.port
        channel = await connection.channel()
        queue = await channel.declare_queue("probe", durable=True, arguments={"x-queue-type": "quorum"})
        assert queue.declaration_result.message_count == 0
    finally:
        await connection.close()


async def test_no_address_answers_fails_fast_names_no_password_and_leaves_no_task() -> None:
    urls = [f"amqp://xocsi:{PASSWORD}@127.0.0.1:{pick_free_port()}/v" for _ in range(3)]
    tasks_before = len(asyncio.all_tasks())
    started = time.monotonic()
    with pytest.raises(BackendUnavailable) as raised:
        await broker.connect(",".join(urls), name="failover-none", timeout_s=TIMEOUT_S)
    assert time.monotonic() - started < 2.0, "three refusals are immediate: no reconnect pause, no timeout"
    assert raised.value.message == ("none of the 3 RabbitMQ nodes is reachable (AMQPConnectionError); "
                                    "check AMQP_URL")
    assert PASSWORD not in repr(raised.value.__cause__) and PASSWORD not in str(raised.value)
    await asyncio.sleep(0)  # let the cancelled connect task finish
    assert len(asyncio.all_tasks()) == tasks_before, "a reconnect loop was left running"


async def _close_from_the_broker(rabbitmq: RabbitEndpoint, vhost: str, connection_name: str) -> None:
    """What a node going away does to a client: the broker closes the connection (here through the management
    API, CONNECTION_FORCED). The API lists a new connection after its statistics interval: polled."""
    def listed() -> list[str]:
        with management_client(rabbitmq) as http:
            response = http.get(f"/api/vhosts/{quote(vhost, safe='')}/connections")
            response.raise_for_status()
            return [c["name"] for c in response.json()
                    if c.get("client_properties", {}).get("connection_name") == connection_name]

    async def one() -> str | None:
        names = await asyncio.to_thread(listed)
        assert len(names) <= 1, names
        return names[0] if names else None

    name = await eventually(one, 30, 0.2, description=f"the management API lists connection {connection_name}")

    def close() -> None:
        with management_client(rabbitmq) as http:
            http.delete(f"/api/connections/{quote(name, safe='')}").raise_for_status()
    await asyncio.to_thread(close)


async def test_a_dropped_connection_comes_back_on_the_next_address_with_its_consumer(
        amqp_vhost: str, rabbitmq: RabbitEndpoint) -> None:
    first = f"{amqp_vhost}?reconnect_interval=0.2"  # the pause after a successful connect, before a reconnect
    connection = await broker.connect(f"{first},{_as_localhost(amqp_vhost)}", name="failover-drop",
                                      timeout_s=TIMEOUT_S)
    assert isinstance(connection, FailoverConnection)
    try:
        received: asyncio.Queue[bytes] = asyncio.Queue()

        async def on_message(message: AbstractIncomingMessage) -> None:
            await message.ack()
            received.put_nowait(message.body)

        channel = await connection.channel()
        queue = await channel.declare_queue("work", durable=True, arguments={"x-queue-type": "quorum"})
        await queue.consume(on_message)
        assert connection.current_url.host == "127.0.0.1"

        await _close_from_the_broker(rabbitmq, vhost_of(amqp_vhost), "failover-drop")

        async def on_localhost() -> bool:
            return connection.current_url.host == "localhost" and connection.connected.is_set()
        await eventually(on_localhost, TIMEOUT_S, description="reconnected to the second address")
        async with await aio_pika.connect(amqp_vhost, timeout=TIMEOUT_S) as publisher:
            publishing = await publisher.channel()
            await publishing.default_exchange.publish(aio_pika.Message(b"after"), routing_key="work")
        async with asyncio.timeout(TIMEOUT_S):
            assert await received.get() == b"after", "the consumer was restored on the new connection"
    finally:
        await connection.close()
