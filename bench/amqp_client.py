"""The AMQP client's CPU per message, two ways each, alternating in one run (real RabbitMQ).

* consuming: a kombu ``Consumer`` draining 300-byte messages with py-amqp's own socket reads
  (three ``recv`` calls and two timeout changes per frame, three frames per message) vs. the
  usage consumer's read-ahead (``workers/amqp_reads.py``, ``BILLING_AMQP_READ_AHEAD``);
* publishing, three ways: kombu's ``Producer.publish``; py-amqp's ``basic_publish`` with no poll
  for a ``connection.blocked`` notice (``bench.throughput.FastPublisher``'s ``pyamqp`` framing,
  the simulated gateway until the tenth session); and the simulated gateway's frames encoded once,
  one socket write per message (``FastPublisher``'s default). Persistent, no confirms.

CPU is this process's (user + system) per message; the rate is wall clock, RabbitMQ on the same
cores.

    .venv/bin/python -m bench.amqp_client [--messages 30000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from kombu import Connection, Consumer, Producer
from kombu.message import Message

from bench.throughput import BROKER_URL, FastPublisher, GatewayFraming
from billing import broker
from billing.settings import Settings
from workers import amqp_reads

BODY = b'{"schema":"usage.v1","pad":"' + b"x" * 270 + b'"}'  # 300 bytes


def _settings() -> Settings:
    return replace(
        Settings.from_env({}),
        broker_url=BROKER_URL,
        usage_exchange="bench.amqp-client",
        usage_queue="bench.amqp-client",
    )


PUBLISHERS: dict[str, GatewayFraming | None] = {
    "kombu Producer.publish": None,
    "py-amqp basic_publish": "pyamqp",
    "frames encoded once": "frames",
}


def publish(
    settings: Settings, messages: int, framing: GatewayFraming | None
) -> tuple[float, float]:
    """(CPU us per message, messages/s) publishing ``messages`` persistent messages; ``framing``
    None: kombu's ``Producer.publish``, else ``FastPublisher`` with that framing."""
    gateway = FastPublisher(settings, framing or "pyamqp")  # declares the queue
    try:
        producer = Producer(gateway.conn.channel(), exchange=broker.usage_exchange(settings))
        key = broker.usage_routing_key(settings, "")
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(messages):
            if framing is None:
                producer.publish(BODY, routing_key=key, **broker.PERSISTENT_JSON)
            else:
                gateway.raw(BODY)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        gateway.close()
    return 1e6 * cpu / messages, messages / wall


def consume(settings: Settings, messages: int, *, read_ahead: bool) -> tuple[float, float]:
    """(CPU us per message, messages/s) draining ``messages`` (acked 1,000 at a time)."""
    received = 0

    def on_message(message: Message) -> None:
        nonlocal received
        received += 1
        if received % 1000 == 0 or received == messages:
            message.ack(multiple=True)

    with Connection(settings.broker_url) as conn:
        conn.ensure_connection()
        consumer = Consumer(
            conn.channel(),
            queues=broker.usage_queues(settings, consumed=True),
            on_message=on_message,
            prefetch_count=4000,
        )
        consumer.consume()
        if read_ahead and not amqp_reads.install(conn):
            raise SystemExit("the read-ahead needs a plain TCP connection")
        cpu, wall = time.process_time(), time.perf_counter()
        while received < messages:
            conn.drain_events(timeout=5)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return 1e6 * cpu / messages, messages / wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=30_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    settings = _settings()
    n = args.messages
    try:
        for round_ in range(1, args.rounds + 1):
            for i, (label, framing) in enumerate(PUBLISHERS.items()):
                us, rate = publish(settings, n, framing)
                print(f"round {round_} publish  {label:<28} {us:6.1f} us/message {rate:>9,.0f}/s")
                # drain what was just published, each way in turn
                read_ahead = (round_ * len(PUBLISHERS) + i) % 2 == 1
                us, rate = consume(settings, n, read_ahead=read_ahead)
                label = "read-ahead" if read_ahead else "py-amqp reads"
                print(f"round {round_} consume  {label:<28} {us:6.1f} us/message {rate:>9,.0f}/s")
    finally:
        with Connection(settings.broker_url) as conn:
            channel = conn.channel()
            for queue in broker.usage_queues(settings):
                queue(channel).delete()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
