"""The gateway's buffer: envelopes by partition, closed when full or after a linger, and the
buffered publisher's guarantees (nothing lost, nothing twice, order per account) when publishing
fails and recovers. The sender here records bodies; tests/integration publishes to RabbitMQ."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import msgspec
import orjson
import pytest

from billing import broker
from billing.errors import BillingError
from billing.events import UsageEvent, decode_message

from .test_deploy_settings import make_event

ACCOUNTS = [f"acct-{i:03d}" for i in range(20)]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Sender:
    """Records what was published: (event ids, routing account) per message."""

    def __init__(self) -> None:
        self.messages: list[tuple[list[str], str]] = []
        self.broken = False

    def __call__(self, body: bytes, account_id: str) -> None:
        if self.broken:
            raise ConnectionError("broker unreachable")
        items = decode_message(body, datetime(2026, 11, 1, tzinfo=UTC), timedelta(days=3650), 10**7)
        assert all(isinstance(item, UsageEvent) for item in items)
        self.messages.append(
            ([item.event_id for item in items if isinstance(item, UsageEvent)], account_id)
        )

    @property
    def ids(self) -> list[str]:
        return [i for ids, _account in self.messages for i in ids]


def _partition(event_id: str, partitions: int) -> int:
    n = int(event_id.split("-")[1])
    return broker.partition_of(ACCOUNTS[n % len(ACCOUNTS)], partitions)


def _events(start: int, count: int) -> list[UsageEvent]:
    return [make_event(f"ev-{n}", ACCOUNTS[n % len(ACCOUNTS)]) for n in range(start, start + count)]


def _wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert condition(), "timed out"


def test_open_envelopes_close_when_full_or_after_the_linger() -> None:
    clock = Clock()
    held = broker.OpenEnvelopes(3, partitions=4, linger_s=0.05, clock=clock)
    events = _events(0, 40)
    by_partition: dict[int, list[UsageEvent]] = {}
    for e in events:
        by_partition.setdefault(broker.partition_of(e.account_id, 4), []).append(e)
    first, second = sorted(by_partition, key=lambda j: events.index(by_partition[j][0]))[:2]

    assert held.next_due_at() is None
    assert held.add(by_partition[first][0]) is None
    assert held.next_due_at() == pytest.approx(100.05)
    clock.now += 0.03
    assert held.add(by_partition[second][0]) is None
    assert held.add(by_partition[first][1]) is None
    assert held.events == 3
    full = held.add(by_partition[first][2])  # the third event of a partition closes its envelope
    assert full == by_partition[first][:3]
    assert held.events == 1

    clock.now += 0.03  # the second partition's envelope has waited 0.03 s: not yet due
    assert held.due() == []
    clock.now += 0.03
    assert held.due() == [by_partition[second][:1]]
    assert held.events == 0 and held.next_due_at() is None

    closed = [full for e in events[:10] if (full := held.add(e)) is not None]
    closed += held.drain()
    assert sorted(e.event_id for c in closed for e in c) == sorted(e.event_id for e in events[:10])
    assert held.events == 0 and held.drain() == []


def test_without_a_linger_each_call_publishes_its_own_events_by_partition() -> None:
    sender = Sender()
    publisher = broker.BufferedUsagePublisher(sender, size=100, partitions=4, linger_ms=0)
    publisher.add_many(_events(0, 100))
    assert publisher.held == 0
    assert len(sender.messages) == len({_partition(f"ev-{n}", 4) for n in range(100)})
    for ids, account in sender.messages:
        assert {_partition(i, 4) for i in ids} == {broker.partition_of(account, 4)}
    assert sorted(sender.ids) == sorted(f"ev-{n}" for n in range(100))
    publisher.close()


def test_envelopes_fill_across_calls_and_lingering_ones_go_out_on_their_own() -> None:
    sender = Sender()
    with broker.BufferedUsagePublisher(sender, size=10, partitions=2, linger_ms=30) as publisher:
        for n in range(0, 60, 3):  # 20 calls of 3 events: envelopes fill across calls
            publisher.add_many(_events(n, 3))
        assert all(len(ids) == 10 for ids, _account in sender.messages)
        assert len(sender.messages) >= 4
        _wait_for(lambda: publisher.held == 0)  # the partial envelopes, after the linger
        assert sorted(sender.ids) == sorted(f"ev-{n}" for n in range(60))
        for ids, account in sender.messages:
            assert {_partition(i, 2) for i in ids} == {broker.partition_of(account, 2)}
        before = len(sender.messages)
        publisher.add(_events(60, 1)[0])  # into an empty buffer: wakes the idle flusher
        _wait_for(lambda: len(sender.messages) == before + 1)
    # each account's events in publishing order
    for account in ACCOUNTS:
        mine = [i for i in sender.ids if ACCOUNTS[int(i.split("-")[1]) % 20] == account]
        assert mine == sorted(mine, key=lambda i: int(i.split("-")[1]))


def test_a_failed_publish_keeps_its_events_and_refuses_new_ones_until_the_broker_is_back() -> None:
    sender = Sender()
    publisher = broker.BufferedUsagePublisher(sender, size=5, partitions=1, linger_ms=60_000)
    sender.broken = True
    publisher.add_many(_events(0, 5))  # fills an envelope whose publish fails: kept, not raised
    assert publisher.held == 5 and isinstance(publisher.error, ConnectionError)
    with pytest.raises(ConnectionError):
        publisher.add(_events(5, 1)[0])  # the kept envelope still fails: this event is not taken
    assert publisher.held == 5
    with pytest.raises(ConnectionError):
        publisher.flush()
    sender.broken = False
    publisher.add_many(_events(5, 2))  # the kept envelope first, then these are taken
    assert sender.ids == [f"ev-{n}" for n in range(5)]
    assert publisher.held == 2 and publisher.error is None
    publisher.close()  # flushes
    assert sender.ids == [f"ev-{n}" for n in range(7)]  # each once, in order
    with pytest.raises(BillingError):
        publisher.add(_events(7, 1)[0])


def test_single_events_are_published_as_plain_events() -> None:
    bodies: list[bytes] = []
    publisher = broker.BufferedUsagePublisher(
        lambda body, _account: bodies.append(body), size=1, linger_ms=0
    )
    publisher.add_many(_events(0, 2))
    publisher.close()
    assert [orjson.loads(b)["event_id"] for b in bodies] == ["ev-0", "ev-1"]


def test_an_add_racing_close_is_refused_not_dropped() -> None:
    """close() refuses new events and flushes under one lock: an add that waited for the lock
    while close was publishing is refused (the caller keeps its event), never taken and lost."""
    release = threading.Event()
    publishing = threading.Event()
    sent: list[bytes] = []

    def slow_send(body: bytes, _account: str) -> None:
        publishing.set()
        release.wait(5)
        sent.append(body)

    publisher = broker.BufferedUsagePublisher(slow_send, size=10, linger_ms=60_000)
    publisher.add(_events(0, 1)[0])
    closer = threading.Thread(target=publisher.close)
    closer.start()
    assert publishing.wait(5)  # close is publishing the held event, holding the lock
    outcome: list[BaseException | None] = []

    def late_add() -> None:
        try:
            publisher.add(_events(1, 1)[0])
            outcome.append(None)
        except BillingError as exc:
            outcome.append(exc)

    adder = threading.Thread(target=late_add)
    adder.start()
    time.sleep(0.05)  # the adder now waits for the lock
    release.set()
    closer.join(5)
    adder.join(5)
    assert len(sent) == 1 and isinstance(outcome[0], BillingError)
    assert publisher.held == 0


def test_a_failing_iterator_takes_nothing_and_the_flusher_still_wakes() -> None:
    sender = Sender()
    with broker.BufferedUsagePublisher(sender, size=10, linger_ms=20) as publisher:

        def broken() -> Iterator[UsageEvent]:
            yield _events(0, 1)[0]
            raise ValueError("the gateway's iterator broke")

        with pytest.raises(ValueError):
            publisher.add_many(broken())
        assert publisher.held == 0
        publisher.add(_events(1, 1)[0])
        _wait_for(lambda: sender.ids == ["ev-1"], timeout=1.0)


def test_after_the_broker_recovers_lingering_envelopes_go_out_within_the_linger() -> None:
    sender = Sender()
    with broker.BufferedUsagePublisher(sender, size=2, linger_ms=20) as publisher:
        sender.broken = True
        publisher.add_many(_events(0, 2))  # a full envelope whose publish fails: kept
        assert publisher.error is not None
        time.sleep(0.05)  # the flusher retried, failed, and pauses a second before the next try
        sender.broken = False
        publisher.add(_events(2, 1)[0])  # the kept envelope goes first; this one lingers 20 ms
        started = time.monotonic()
        _wait_for(lambda: publisher.held == 0, timeout=2.0)
        assert time.monotonic() - started < 0.5  # not after the flusher's one-second pause
        assert sender.ids == ["ev-0", "ev-1", "ev-2"]


def test_an_envelope_over_the_workers_message_limit_is_split_until_each_part_fits() -> None:
    """The schema allows 10,000 events per envelope, the workers 1 MiB per message: a larger
    message was parked whole as too_large, beyond replay. The publishers split it instead."""
    events = _events(0, 100)
    whole = len(broker.message_body(events, 100))
    limit = whole // 3  # the 100 events need at least 4 messages of <= limit bytes
    messages = list(broker.usage_messages(events, 100, max_bytes=limit))
    assert len(messages) >= 4 and all(len(body) <= limit for body, _a, _n in messages)
    decoded = [
        item.event_id
        for body, _account, _count in messages
        for item in decode_message(body, datetime(2026, 11, 1, tzinfo=UTC), timedelta(3650), limit)
        if isinstance(item, UsageEvent)
    ]
    assert decoded == [e.event_id for e in events]  # all, once, in order
    assert sum(n for _b, _a, n in messages) == 100

    sender, calls = Sender(), 0

    def fails_on_the_third(body: bytes, account: str) -> None:
        nonlocal calls
        calls += 1
        sender.broken = calls == 3
        sender(body, account)

    publisher = broker.BufferedUsagePublisher(
        fails_on_the_third, size=100, linger_ms=60_000, max_bytes=limit
    )
    publisher.add_many(events)  # a full envelope: published in parts, the third part fails
    assert isinstance(publisher.error, ConnectionError)
    assert publisher.held == 100 - len(sender.ids)  # only the parts not sent are kept
    publisher.close()
    assert sender.ids == [e.event_id for e in events]  # each once, in order


def test_an_envelope_that_cannot_be_encoded_keeps_every_held_event() -> None:
    """The bodies were encoded before the publish loop's guard: one event that could not be
    encoded (a lone surrogate in a name) dropped every held event, and reported nothing."""
    sender = Sender()
    publisher = broker.BufferedUsagePublisher(sender, size=3, linger_ms=60_000)
    bad = msgspec.structs.replace(_events(1, 1)[0], model="openai/\ud800")
    publisher.add_many([*_events(0, 1), bad, *_events(2, 1)])  # the envelope is full: publish
    assert publisher.held == 3 and publisher.error is not None
    assert sender.messages == []
