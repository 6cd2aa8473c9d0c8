"""SocketChannel: QEMU's QIOChannelSocket over a Twisted stream transport.

The channel owns a small :class:`SocketProtocol` that Twisted drives; bytes the
transport delivers are buffered until someone reads them.  Memory is bounded by
the high-water mark, not by the stream: above it the transport stops reading
from the socket (``pauseProducing``) and resumes once reads drain the buffer
below the low-water mark.  On the write side the protocol is registered as the
transport's push producer, so a write that finds the transport's buffer full
waits (``Condition.OUT`` is false) until Twisted asks for more.

Thread contract: reactor thread only, like every channel.
"""

from __future__ import annotations

import socket as _socket
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import address as _address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IFileDescriptorReceiver,
    IHalfCloseableProtocol,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from ..errors import ChannelError
from ._base import WOULD_BLOCK, Buffer, Channel, Condition, Feature, Shutdown, WouldBlock

__all__ = ["DEFAULT_HIGH_WATER", "DEFAULT_LOW_WATER", "SocketChannel", "SocketProtocol"]

DEFAULT_HIGH_WATER = 4 * 1024 * 1024
DEFAULT_LOW_WATER = 1024 * 1024
#: QEMU's SOCKET_MAX_FDS.
MAX_FDS = 16


@implementer(IPushProducer, IHalfCloseableProtocol, IFileDescriptorReceiver)
class SocketProtocol(Protocol):
    """The Twisted side of a :class:`SocketChannel`; it only moves bytes and events.

    *on_connect* (if given) is called with the channel once the connection is
    made, in the reactor thread.
    """

    def __init__(
        self,
        channel: SocketChannel,
        on_connect: Callable[[SocketChannel], object] | None = None,
    ) -> None:
        self.channel = channel
        self._on_connect = on_connect

    def connectionMade(self) -> None:
        self.channel._attach(self.transport)
        if self._on_connect is not None:
            on_connect, self._on_connect = self._on_connect, None
            on_connect(self.channel)

    def dataReceived(self, data: bytes) -> None:
        self.channel._data_received(data)

    def fileDescriptorReceived(self, descriptor: int) -> None:
        self.channel._fd_received(descriptor)

    def readConnectionLost(self) -> None:
        self.channel._read_eof()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:  # type: ignore[assignment]
        self.channel._connection_lost(reason)

    # IPushProducer, registered on our own transport: Twisted tells us when its
    # write buffer is full (pause) and when it has drained (resume).
    def pauseProducing(self) -> None:
        self.channel._write_paused = True

    def resumeProducing(self) -> None:
        self.channel._write_paused = False
        self.channel._ready_changed()

    def stopProducing(self) -> None:
        pass


class SocketChannel(Channel):
    """A stream socket (TCP, TCP6 or UNIX) as a channel.

    Create one unconnected and hand :attr:`protocol` to Twisted (a factory's
    ``buildProtocol``, ``connectProtocol``, ``adoptStreamConnection``...); the
    channel becomes usable once the connection is made.

    :param high_water: pause reading from the socket when this many bytes are buffered.
    :param low_water: resume reading once reads drain the buffer below this.
    """

    def __init__(
        self,
        *,
        reactor: IReactorTime | None = None,
        name: str | None = None,
        high_water: int = DEFAULT_HIGH_WATER,
        low_water: int = DEFAULT_LOW_WATER,
        on_connect: Callable[[SocketChannel], object] | None = None,
    ) -> None:
        super().__init__(reactor=reactor, name=name)
        if not 0 <= low_water <= high_water:
            raise ValueError("need 0 <= low_water <= high_water")
        self.features = Feature.SHUTDOWN
        self.protocol = SocketProtocol(self, on_connect)
        self.transport: Any = None
        self._high_water = high_water
        self._low_water = low_water
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._read_paused = False
        self._write_paused = False
        self._eof = False
        self._write_shut = False
        self._lost: Failure | None = None
        self._lost_d: Deferred[None] = Deferred()
        self._fds: deque[int] = deque()
        self.local_address: Any = None
        self.remote_address: Any = None

    # ---- Twisted side --------------------------------------------------------------

    def _attach(self, transport: Any) -> None:
        self.transport = transport
        self.local_address = transport.getHost()
        self.remote_address = transport.getPeer()
        if isinstance(self.local_address, _address.UNIXAddress):
            self.features |= Feature.FD_PASS
        self.features |= Feature.READ_MSG_PEEK
        transport.registerProducer(self.protocol, True)
        self._ready_changed()

    def _data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > self._high_water and not self._read_paused and self._lost is None:
            self._read_paused = True
            self.transport.pauseProducing()
        self._ready_changed()

    def _fd_received(self, fd: int) -> None:
        self._fds.append(fd)

    def _read_eof(self) -> None:
        self._eof = True
        self._ready_changed()

    def _connection_lost(self, reason: Failure) -> None:
        self._eof = True
        self._lost = reason
        self.transport = self.transport  # keep addresses; the transport is dead now
        self._ready_changed()
        self._lost_d.callback(None)

    # ---- the Channel contract --------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.transport is not None and self._lost is None

    def _io_condition(self) -> Condition:
        cond = Condition(0)
        if self._buffered or self._eof:
            cond |= Condition.IN
        if self._lost is not None:
            cond |= Condition.HUP
            if not self._lost.check(ConnectionDone):
                cond |= Condition.ERR
        elif self.transport is not None and not self._write_paused and not self._write_shut:
            cond |= Condition.OUT
        return cond

    def _io_read(self, nbytes: int, *, peek: bool = False) -> bytes | WouldBlock:
        if not self._buffered:
            if self._lost is not None and not self._lost.check(ConnectionDone):
                raise ChannelError(f"Unable to read from socket: {_reason(self._lost)}")
            if self._eof:
                return b""
            return WOULD_BLOCK
        chunks = self._chunks
        first = chunks[0]
        if len(first) >= nbytes or len(chunks) == 1:
            data = first[:nbytes] if len(first) > nbytes else first
            if not peek:
                if len(first) > nbytes:
                    chunks[0] = first[nbytes:]
                else:
                    chunks.popleft()
        else:
            parts: list[bytes] = []
            want = nbytes
            for chunk in chunks:
                if len(chunk) > want:
                    parts.append(chunk[:want])
                    want = 0
                    break
                parts.append(chunk)
                want -= len(chunk)
                if not want:
                    break
            data = b"".join(parts)
            if not peek:
                for _ in range(len(parts) - 1):
                    chunks.popleft()
                last = chunks[0]
                if len(last) > len(parts[-1]):
                    chunks[0] = last[len(parts[-1]) :]
                else:
                    chunks.popleft()
        if not peek:
            self._buffered -= len(data)
            if self._read_paused and self._buffered <= self._low_water and self._lost is None:
                self._read_paused = False
                self.transport.resumeProducing()
        return data

    def _io_write(self, chunks: Sequence[Buffer], fds: Sequence[int]) -> int | WouldBlock:
        if self._lost is not None:
            raise ChannelError(f"Unable to write to socket: {_reason(self._lost)}")
        if self.transport is None:
            return WOULD_BLOCK
        if self._write_shut:
            raise ChannelError("Unable to write to socket: Broken pipe")
        if self._write_paused:
            return WOULD_BLOCK
        if len(fds) > MAX_FDS:
            raise ChannelError(f"Only {MAX_FDS} FDs can be sent")
        for fd in fds:
            self.transport.sendFileDescriptor(fd)
        total = 0
        data: list[bytes] = []
        for c in chunks:
            b = c if isinstance(c, bytes) else bytes(c)
            data.append(b)
            total += len(b)
        self.transport.writeSequence(data)
        return total

    def _io_take_fds(self) -> list[int]:
        fds = list(self._fds)
        self._fds.clear()
        return fds

    def _io_shutdown(self, how: Shutdown) -> None:
        if self.transport is None or self._lost is not None:
            return
        if how & Shutdown.WRITE and not self._write_shut:
            self._write_shut = True
            self.transport.loseWriteConnection()
        if how & Shutdown.READ and not self._eof:
            sock = getattr(self.transport, "socket", None)
            if sock is not None:
                try:
                    sock.shutdown(_socket.SHUT_RD)
                except OSError as e:
                    raise ChannelError(f"Unable to shutdown socket: {e.strerror}") from e
            self._eof = True

    def _io_set_delay(self, enabled: bool) -> None:
        if self.transport is not None and hasattr(self.transport, "setTcpNoDelay"):
            try:
                self.transport.setTcpNoDelay(not enabled)
            except OSError:
                pass  # a hint; QEMU ignores setsockopt failures here too

    def _io_set_cork(self, enabled: bool) -> None:
        sock = getattr(self.transport, "socket", None)
        if sock is not None and sock.family in (_socket.AF_INET, _socket.AF_INET6):
            try:
                sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_CORK, int(enabled))
            except OSError:
                pass  # a hint, as in QEMU

    def _io_close(self) -> Deferred[None] | None:
        for fd in self._io_take_fds():
            _close_fd(fd)
        if self.transport is None or self._lost is not None:
            return None
        self.transport.unregisterProducer()
        self.transport.loseConnection()
        return self._lost_d

    def abort(self) -> Deferred[None]:
        """Drop the connection at once, discarding unsent output (TCP RST where possible)."""
        if self.transport is not None and self._lost is None:
            self.transport.abortConnection()
        return self.close()


def _reason(failure: Failure) -> str:
    value = failure.value
    if isinstance(value, OSError) and value.strerror:
        return str(value.strerror)
    text = str(value)
    return text.split(": ", 1)[-1].rstrip(".") if ": " in text else text or type(value).__name__


def _close_fd(fd: int) -> None:
    import os

    try:
        os.close(fd)
    except OSError:
        pass  # already closed by its owner; nothing else to release
