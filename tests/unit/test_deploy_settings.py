"""Deployment settings (queue topology, partitions, upkeep) and the queue arguments they give."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import quote

import pytest
from kombu import Connection

from billing import broker
from billing.errors import BillingError, ConfigError
from billing.events import Usage, UsageEvent
from billing.settings import Settings


def make_event(event_id: str, account_id: str) -> UsageEvent:
    return UsageEvent(
        schema="usage.v1",
        event_id=event_id,
        occurred_at=datetime(2026, 11, 1, tzinfo=UTC),
        account_id=account_id,
        api_key_id="key-1",
        model="openai/o4-mini",
        provider="openai",
        byok=False,
        usage=Usage(input_tokens=1000, output_tokens=500),
    )


def test_defaults_serve_the_embedded_mode() -> None:
    s = Settings.from_env({})
    assert (s.usage_queue_type, s.usage_queue_max_length, s.usage_partitions) == ("classic", 0, 1)
    assert broker.usage_queue_arguments(s) == {}
    assert broker.usage_queue_names(s) == ["billing.usage"]
    assert broker.dead_letter_queue(s) is None
    assert (s.partition_months_ahead, s.payload_retention_days, s.db_pool_size) == (3, 90, 2)


def test_production_topology_arguments() -> None:
    s = Settings.from_env(
        {
            "BILLING_USAGE_QUEUE_TYPE": "quorum",
            "BILLING_USAGE_QUEUE_MAX_LENGTH": "1000",
            "BILLING_USAGE_DEAD_LETTER_EXCHANGE": "dlx",
            "BILLING_USAGE_DELIVERY_LIMIT": "5",
        }
    )
    assert broker.usage_queue_arguments(s) == {
        "x-queue-type": "quorum",
        "x-delivery-limit": 5,
        "x-dead-letter-exchange": "dlx",
        "x-max-length": 1000,
        "x-overflow": "reject-publish",
    }
    dlq = broker.dead_letter_queue(s)
    assert dlq is not None and dlq.name == "dlx.queue"


def test_partitions_and_the_ones_a_worker_consumes() -> None:
    s = Settings.from_env(
        {"BILLING_USAGE_PARTITIONS": "4", "BILLING_USAGE_CONSUME_PARTITIONS": "3, 1,1"}
    )
    assert broker.usage_queue_names(s) == [f"billing.usage.{i}" for i in range(4)]
    assert [q.name for q in broker.usage_queues(s, consumed=True)] == [
        "billing.usage.1",
        "billing.usage.3",
    ]
    assert [q.routing_key for q in broker.usage_queues(s)] == [f"usage.{i}" for i in range(4)]
    assert [q.routing_key for q in broker.usage_queues(s, consumed=True)] == ["usage.1", "usage.3"]
    assert broker.usage_exchange(s).type == "direct"  # the publisher names the partition


# The documented partition function (docs/usage-events.md): CRC-32 as zlib, Java's CRC32, Go's
# crc32.ChecksumIEEE and Node's zlib.crc32 compute it ("123456789" is the standard check value).
@pytest.mark.parametrize(
    ("account_id", "crc", "partitions", "partition"),
    [
        ("123456789", 0xCBF43926, 16, 6),
        ("acct-00000", 3385744441, 4, 1),
        ("acct-00001", 3200871599, 4, 3),
        ("org_2Xk9", 1496170178, 16, 2),
        ("Ünïcode-acct", 3803947136, 4, 0),  # UTF-8 bytes
    ],
)
def test_partition_of_an_account_is_crc32_of_its_id(
    account_id: str, crc: int, partitions: int, partition: int
) -> None:
    assert crc % partitions == partition
    assert broker.partition_of(account_id, partitions) == partition
    assert broker.partition_of(account_id, 1) == 0
    s = Settings.from_env({"BILLING_USAGE_PARTITIONS": str(partitions)})
    assert broker.usage_routing_key(s, account_id) == f"usage.{partition}"
    assert broker.usage_routing_key(Settings.from_env({}), account_id) == "usage"


def test_partitioned_envelopes_carry_one_partition_each_in_order() -> None:
    accounts = [f"acct-{i:05d}" for i in range(40)]
    events = [make_event(f"ev-{n:04d}", accounts[(n * 7) % 40]) for n in range(1000)]
    chunks = list(broker.envelopes(events, 100, partitions=4))
    assert sorted(e.event_id for c in chunks for e in c) == [e.event_id for e in events]
    assert all(len(c) <= 100 for c in chunks)
    # a batch of 1,000 over 4 partitions: full envelopes, at most one partial one per partition
    assert sum(1 for c in chunks if len(c) < 100) <= 4
    for chunk in chunks:
        assert len({broker.partition_of(e.account_id, 4) for e in chunk}) == 1
    # each account's events keep their order across envelopes
    seen = [e.event_id for c in chunks for e in c]
    for account in accounts:
        mine = [e.event_id for e in events if e.account_id == account]
        assert [i for i in seen if i in set(mine)] == mine
    assert list(broker.envelopes(events, 100)) == [events[i : i + 100] for i in range(0, 1000, 100)]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"BILLING_USAGE_QUEUE_TYPE": "stream"}, "BILLING_USAGE_QUEUE_TYPE must be one of"),
        ({"BILLING_USAGE_QUEUE_MAX_LENGTH": "-1"}, "BILLING_USAGE_QUEUE_MAX_LENGTH must be >= 0"),
        ({"BILLING_USAGE_PARTITIONS": "0"}, "BILLING_USAGE_PARTITIONS must be >= 1"),
        ({"BILLING_PUBLISH_LINGER_MS": "-5"}, "BILLING_PUBLISH_LINGER_MS must be >= 0"),
        ({"BILLING_PUBLISH_ENVELOPE_SIZE": "0"}, "BILLING_PUBLISH_ENVELOPE_SIZE must be >= 1"),
        (
            {"BILLING_USAGE_PARTITIONS": "2", "BILLING_USAGE_CONSUME_PARTITIONS": "2"},
            "BILLING_USAGE_CONSUME_PARTITIONS: '2' is not a partition number 0..1",
        ),
        ({"BILLING_USAGE_CONSUME_PARTITIONS": "x"}, "'x' is not a partition number 0..0"),
        ({"BILLING_DB_POOL_SIZE": "many"}, "BILLING_DB_POOL_SIZE must be an integer"),
        ({"BILLING_PARTITION_MONTHS_AHEAD": "0"}, "BILLING_PARTITION_MONTHS_AHEAD must be >= 1"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        Settings.from_env(env)


def test_partitions_are_assigned_to_workers_by_their_traffic() -> None:
    # a Zipf-like stream: the hottest partition alone is a quarter of the events
    traffic = {0: 250, 1: 130, 2: 120, 3: 110, 4: 100, 5: 90, 6: 80, 7: 70, 8: 50}
    groups = broker.assign_partitions(traffic, 10, 3)  # partition 9 has no traffic
    assert sorted(j for g in groups for j in g) == list(range(10))  # each exactly once
    loads = [sum(traffic.get(j, 0) for j in g) for g in groups]
    assert sum(loads) == 1000 and loads == [320, 320, 360]
    best_possible = max(1000 / 3, 250)
    assert max(loads) <= 4 / 3 * best_possible  # the greedy rule's guarantee
    modulo = [sum(traffic.get(j, 0) for j in range(10) if j % 3 == i) for i in range(3)]
    assert max(loads) < max(modulo)  # (j mod 3 gives 410, 320, 270)
    assert broker.assign_partitions({}, 4, 2) == [(0, 2), (1, 3)]  # no traffic: spread evenly
    assert broker.assign_partitions({0: 900, 1: 50, 2: 50}, 3, 2) == [(0,), (1, 2)]
    assert broker.assign_partitions(traffic, 10, 3) == groups  # deterministic
    with pytest.raises(ConfigError, match="cannot split 2 partition"):
        broker.assign_partitions({}, 2, 3)


def test_broker_login_decodes_the_url_as_kombu_does() -> None:
    url = "amqp://billing:p%40ss%2Fw%3Ard@mq.internal:5672/billing"
    assert broker.broker_login(url) == ("billing", "p@ss/w:rd", "billing")
    assert broker.broker_login("amqps://u:p@mq:5671//")[2] == "/"
    assert broker.broker_login("amqp://u:p@mq:5672")[2] == "/"
    assert broker.broker_login("amqp://u:p@mq/a%2Fb")[2] == "a/b"


@pytest.mark.parametrize(
    "url",
    [
        "amqp://billing:p%40ss%2Fw%3Ard@mq.internal:5672/billing",
        "amqps://u:p@mq:5671//",
        "amqp://u:p@mq:5672",
        "amqp://u:p@mq/",
        "amqp://u:p@mq/%2F",
        "amqp://u:p@mq/a%2Fb",
        "amqp://u:p%3Bw@mq/billing",
        # a failover list (kombu and Celery log in with the first URL, then the others in turn)
        "amqp://u:S3cret@mq-0.internal:5672/billing;amqp://u:S3cret@mq-1.internal:5672/billing",
        "amqp://u:p@mq/a;b",
    ],
)
def test_broker_login_is_the_login_kombu_uses(url: str) -> None:
    """The user --create-broker-user creates is the one the billing processes log in as."""
    conn = Connection(url)
    assert broker.broker_login(url) == (conn.userid, conn.password, conn.virtual_host)
    assert "S3cret" not in broker.broker_login(url)[2]  # the vhost, quoted in errors


@pytest.mark.parametrize(
    "url",
    [
        "amqp://S3cret@rabbit.internal:5672/billing",  # no password
        "amqp://rabbit.internal:5672/billing",
        "S3cret",
        "amqp://u:S3cret@[::1/internal",  # a broken IPv6 host
    ],
)
def test_broker_login_needs_a_user_and_password_and_never_repeats_the_url(url: str) -> None:
    with pytest.raises(ConfigError, match="BILLING_BROKER_URL") as error:
        broker.broker_login(url)
    assert "S3cret" not in str(error.value) and "internal" not in str(error.value)


def test_ensure_user_refuses_the_administrator_before_calling_the_api() -> None:
    with pytest.raises(ConfigError, match="administrator 'billing'"):
        broker.ensure_user("http://127.0.0.1:1", "billing", "x", "amqp://billing:pw@mq/billing")


class _Quoting(BaseHTTPRequestHandler):
    """A management API (or a proxy in front of it) whose refusal quotes the request, its JSON
    escaped, after ``pad`` characters of its own."""

    pad = 0

    def do_PUT(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        answer = json.dumps({"error": "bad_request", "reason": "x" * self.pad + body}).encode()
        self.send_response(400)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("pad", [0, 440, 460, 480])
@pytest.mark.parametrize("password", ["S3cretPassw0rdS3cretPassw0rd", 'S3cret"Pa\\ss/w0rd'])
def test_a_refusal_never_repeats_the_password_not_even_in_part(pad: int, password: str) -> None:
    """The refusal is cut to 500 characters: masked before the cut, or a cut through the
    password leaves its start in the message; and masked as JSON quotes it too."""
    handler = type("Quoting", (_Quoting,), {"pad": pad})
    server = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"amqp://billing:{quote(password, safe='')}@mq/billing"
    try:
        with pytest.raises(BillingError, match="RabbitMQ refused the user 'billing'") as error:
            broker.ensure_user(f"http://127.0.0.1:{server.server_port}", "admin", "x", url, 1)
    finally:
        server.shutdown()
        server.server_close()
    assert "S3cret" not in str(error.value)
