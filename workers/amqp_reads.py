"""Read-ahead for the usage consumer's AMQP socket.

py-amqp (5.x) reads a frame with three ``recv`` calls of exactly the size it needs (header,
payload, end byte), and sets and restores the socket timeout around every frame. A delivered
message is three frames, so one event per message cost the worker about 15 system calls, and a
py-spy profile of a single-event worker had those reads as its largest single cost.

``install`` switches one connection's transport to ``ReadAheadTCPTransport``: each ``recv`` asks
for up to 64 KiB and keeps what it did not need, and while a whole frame is already buffered the
socket's timeout is left alone. py-amqp still parses every frame; only where its bytes come from
changes. The buffer is py-amqp's own ``_read_buffer`` (a ``bytearray`` here: taking bytes off its
front is cheap), so a frame that py-amqp pushes back after a timeout mid-frame is kept in order.
TLS connections keep py-amqp's reads (``install`` returns False).

Two limits, both outside how the usage consumer uses its connection: a write with a timeout
(``basic_publish(timeout=...)``) made while a frame is buffered runs without that timeout (the
consumer's connection publishes nothing: wallet events go out on another), and an event loop
that waits for the socket to become readable (a Celery hub) would not see bytes already in the
buffer (``ConsumerMixin`` only calls ``drain_events``, which reads the buffer first).
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from amqp.transport import TCPTransport

READ_AHEAD_BYTES = 65536
_FRAME_HEADER = 7  # type (1), channel (2), payload size (4); then the payload and an end byte


class ReadAheadTCPTransport(TCPTransport):
    __slots__ = ()  # the same layout as TCPTransport: an instance's class can be switched

    def _read(
        self, n: int, initial: bool = False, _errnos: tuple[int, ...] = (errno.EAGAIN, errno.EINTR)
    ) -> bytes:
        """``n`` bytes, from the buffer first; the socket is read ``READ_AHEAD_BYTES`` at a time."""
        buf: bytes | bytearray = self._buffer()
        if not isinstance(buf, bytearray):  # py-amqp pushed back a partial frame (bytes)
            buf = self._read_buffer = bytearray(buf)
        assert self.sock is not None  # connected
        recv = self.sock.recv
        while len(buf) < n:
            try:
                chunk = recv(max(n - len(buf), READ_AHEAD_BYTES))
            except OSError as exc:
                if exc.errno in _errnos:
                    if initial and self.raise_on_initial_eintr:
                        raise TimeoutError() from None
                    continue
                raise
            if not chunk:
                raise OSError("Server unexpectedly closed connection")
            buf += chunk
        result = bytes(buf[:n])
        del buf[:n]
        return result

    def _buffer(self) -> bytes | bytearray:
        buf: bytes | bytearray = self._read_buffer  # untyped in py-amqp's __init__
        return buf

    def frame_buffered(self) -> bool:
        """Whether a whole frame is already buffered (reading it needs no socket call)."""
        buf = self._buffer()
        if len(buf) < _FRAME_HEADER:
            return False
        return len(buf) > _FRAME_HEADER + int.from_bytes(buf[3:_FRAME_HEADER], "big")

    @contextmanager
    def having_timeout(self, timeout: float | None) -> Iterator[Any]:
        if self.frame_buffered():
            yield self.sock
            return
        with super().having_timeout(timeout) as sock:
            yield sock


def install(connection: Any) -> bool:
    """Give a kombu connection's py-amqp transport the read-ahead; False if it is not plain TCP."""
    transport = getattr(getattr(connection, "connection", None), "transport", None)
    if type(transport) is TCPTransport:
        transport.__class__ = ReadAheadTCPTransport
        return True
    return isinstance(transport, ReadAheadTCPTransport)
