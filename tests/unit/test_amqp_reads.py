"""The consumer's read-ahead AMQP transport returns the frames py-amqp's own reads return, in
order, whatever the split of the bytes on the socket, including a frame cut by a read timeout
(py-amqp pushes its start back into the buffer). A local socket pair stands in for RabbitMQ;
tests/integration runs every worker on RabbitMQ with the read-ahead on."""

from __future__ import annotations

import random
import socket
import struct
import threading
import time

import pytest
from amqp.transport import TCPTransport

from workers.amqp_reads import READ_AHEAD_BYTES, ReadAheadTCPTransport

FRAME_END = b"\xce"


def frame(frame_type: int, channel: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", frame_type, channel, len(payload)) + payload + FRAME_END


def transport_on(sock: socket.socket, read_ahead: bool) -> TCPTransport:
    transport = TCPTransport("127.0.0.1:5672")
    transport.sock = sock
    transport._setup_transport()
    if read_ahead:
        transport.__class__ = ReadAheadTCPTransport
    return transport


def frames_sample(seed: int) -> list[tuple[int, int, bytes]]:
    rng = random.Random(seed)
    sizes = [0, 1, 6, 7, 8, 300, 4096, READ_AHEAD_BYTES - 8, READ_AHEAD_BYTES + 5, 200_000]
    sizes += [rng.randrange(0, 2000) for _ in range(300)]
    rng.shuffle(sizes)
    return [(rng.choice((1, 2, 3, 8)), rng.randrange(4), rng.randbytes(n)) for n in sizes]


@pytest.mark.parametrize("read_ahead", [False, True])
def test_frames_come_back_whole_and_in_order_whatever_the_split(read_ahead: bool) -> None:
    expected = frames_sample(7)
    data = b"".join(frame(t, c, p) for t, c, p in expected)
    ours, theirs = socket.socketpair()
    transport = transport_on(ours, read_ahead)

    def send_in_random_pieces() -> None:
        rng = random.Random(11)
        i = 0
        while i < len(data):
            n = rng.choice((1, 3, 7, 100, 5000, 70_000))
            theirs.sendall(data[i : i + n])
            i += n

    sender = threading.Thread(target=send_in_random_pieces)
    sender.start()
    got = [transport.read_frame() for _ in expected]
    sender.join()
    assert [(t, c, bytes(p)) for t, c, p in got] == expected
    assert len(transport._read_buffer) == 0
    ours.close()
    theirs.close()


def test_a_frame_cut_by_a_timeout_is_read_whole_on_the_next_call() -> None:
    first, second = frame(1, 1, b"a" * 50), frame(3, 1, b"b" * 1000)
    ours, theirs = socket.socketpair()
    transport = transport_on(ours, read_ahead=True)
    theirs.sendall(first + second[:520])  # the second frame cut in its payload
    with transport.having_timeout(0.05):
        assert transport.read_frame() == (1, 1, b"a" * 50)
    assert not transport.frame_buffered()  # only part of the next frame: the timeout applies
    started = time.monotonic()
    with pytest.raises(TimeoutError), transport.having_timeout(0.05):
        transport.read_frame()
    assert time.monotonic() - started >= 0.04
    theirs.sendall(second[520:] + first)
    with transport.having_timeout(0.05):
        assert transport.read_frame() == (3, 1, b"b" * 1000)
    assert transport.frame_buffered()  # the next frame came in the same recv
    with transport.having_timeout(0.05):
        assert transport.read_frame() == (1, 1, b"a" * 50)
    ours.close()
    theirs.close()


def test_a_closed_socket_is_an_error_not_a_hang() -> None:
    ours, theirs = socket.socketpair()
    transport = transport_on(ours, read_ahead=True)
    theirs.sendall(frame(1, 1, b"x")[:5])
    theirs.close()
    with pytest.raises(OSError, match="closed"):
        transport.read_frame()
    ours.close()
