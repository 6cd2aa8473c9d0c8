"""SocketChannel: QEMU's QIOChannelSocket over a Twisted stream transport.

A connected channel owns a small :class:`SocketProtocol` that Twisted drives;
bytes the transport delivers are buffered until someone reads them.  Memory
is bounded by the high-water mark, not by the stream: above it the transport
stops reading from the socket (``pauseProducing``) and resumes once reads
drain the buffer below the low-water mark.  On the write side the protocol is
registered as the transport's push producer, so a write that finds the
transport's buffer full waits (``Condition.OUT`` is false) until Twisted asks
for more.

Ways to get a channel, mirroring QEMU:

* :meth:`SocketChannel.connect` (``connect_async``): name resolution and the
  blocking ``connect()`` run in a worker thread as a :class:`~qiotwisted.task.Task`;
  the connected socket is then adopted by the reactor
  (``adoptStreamConnection``) in the reactor thread.
* :meth:`SocketChannel.listen` (``listen_sync``) / :meth:`listen_async`: a
  listening channel with :attr:`Feature.LISTEN`; :meth:`accept` hands out
  connected channels.
* :meth:`SocketChannel.new_fd` (``qio_channel_socket_new_fd``): adopt an
  already-open socket (connected, listening, or merely bound).
* Hand :attr:`SocketChannel.protocol` to any Twisted API that wants a protocol
  (``connectProtocol``, a factory's ``buildProtocol``...).

Why listening sockets are not Twisted ``Port`` objects: QEMU's semantics need
control Twisted's ports do not give.  A listening channel accepts a client
only when the application can take it (at most one accepted-but-not-taken
client; the rest wait in the kernel backlog, so ``backlog`` means what it
says), and a UNIX socket path is unlinked on close only when the channel has
``LISTEN`` (Twisted's UNIX port always unlinks).  Accepted sockets do become
ordinary Twisted transports via ``adoptStreamConnection``.

File descriptors (UNIX sockets, ``FD_PASS``): a write with fds waits until
Twisted's write buffer is empty and then sends all fds (at most
:data:`MAX_FDS`, "Only 16 FDs can be sent") in one ``sendmsg`` with the first
bytes, as QEMU does, so they stay with their data and the caller may close
them once the write returns.  Received fds get CLOEXEC and blocking mode
(QEMU's rules) and are handed out by :meth:`~Channel.read_full` together with
the bytes they came with; a plain :meth:`~Channel.read` that consumes those
bytes closes them, as the kernel drops fds for a ``recvmsg`` without room.

Bulk reads: after a ``recv`` that filled ``recv_size`` (64 KiB), a TCP channel
keeps reading in the same reactor turn (up to ``read_burst``), and a plain
``read`` returns buffered chunks without copying them together.  A pull loop
``while data := await ch.read(1 << 20)`` thus wakes once per burst instead of
once per chunk; ``benchmarks/bench_bulk.py`` compares it with a bare Twisted
protocol.

Thread contract: reactor thread only, like every channel, except the worker
functions of :meth:`connect`/:meth:`listen_async`, which run in a pool thread
and touch nothing but a fresh socket.
"""

from __future__ import annotations

import array
import errno
import os
import socket as _socket
import stat
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet import address as _twisted_address
from twisted.internet import tcp as _tcp
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IFileDescriptorReceiver,
    IHalfCloseableProtocol,
    IPushProducer,
    IReactorTime,
    IReadDescriptor,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from .._address import (
    AddressLike,
    FdSocketAddress,
    InetSocketAddress,
    SocketAddress,
    UnixSocketAddress,
    from_sockaddr,
    from_twisted,
    parse_address,
)
from ..errors import ChannelClosedError, ChannelError
from ._base import (
    _CONDITIONS,
    _READ_BITS,
    WOULD_BLOCK,
    Buffer,
    Channel,
    Condition,
    Feature,
    Shutdown,
    WouldBlock,
    _Waiter,
)

if TYPE_CHECKING:
    from ..task import Task

__all__ = [
    "DEFAULT_HIGH_WATER",
    "DEFAULT_LOW_WATER",
    "DEFAULT_READ_BURST",
    "DEFAULT_RECV_SIZE",
    "MAX_FDS",
    "SocketChannel",
    "SocketProtocol",
]

DEFAULT_HIGH_WATER = 4 * 1024 * 1024
DEFAULT_LOW_WATER = 1024 * 1024
#: Bytes asked of each ``recv`` (Twisted's ``bufferSize``, also its write-buffer
#: pause threshold).  64 KiB, Twisted's own default, measured best: larger recvs
#: copy out of cache and reopen the TCP window later, which slows the sender
#: (see benchmarks/bench_bulk.py).
DEFAULT_RECV_SIZE = 64 * 1024
#: After a full recv, read up to this much more in the same reactor turn.
DEFAULT_READ_BURST = 1024 * 1024
#: A buffered chunk at least this big is returned alone rather than joined
#: with the next ones to fill a larger read.
_NO_JOIN = 16 * 1024
_IN, _OUT, _ERR, _HUP = (
    int(c) for c in (Condition.IN, Condition.OUT, Condition.ERR, Condition.HUP)
)
#: QEMU's SOCKET_MAX_FDS.
MAX_FDS = 16
#: A write copies at most this much of mutable buffers (bytes objects are kept,
#: not copied), so one ``write`` of a huge bytearray cannot double memory.
_MAX_WRITE_COPY = 1024 * 1024


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
            self.channel._call_user(on_connect, self.channel, what="on_connect callback")

    def dataReceived(self, data: bytes) -> None:
        self.channel._data_received(data)

    def fileDescriptorReceived(self, descriptor: int) -> None:
        self.channel._fd_received(descriptor)

    def readConnectionLost(self) -> None:
        self.channel._read_eof()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.channel._connection_lost(reason)

    # IPushProducer, registered on our own transport: Twisted tells us when its
    # write buffer is full (pause) and when it has fully drained (resume).
    def pauseProducing(self) -> None:
        self.channel._write_paused = True

    def resumeProducing(self) -> None:
        channel = self.channel
        channel._write_paused = False
        channel._drained = True
        channel._ready_changed()

    def stopProducing(self) -> None:
        pass


class _OneProtocolFactory(Factory):
    """Hands one pre-built protocol to ``adoptStreamConnection``."""

    noisy = False

    def __init__(self, proto: Protocol) -> None:
        self._proto = proto

    def buildProtocol(self, addr: object) -> Protocol:
        return self._proto


@implementer(IReadDescriptor)
class _ListenReader:
    """Tells a listening channel when its socket has a client to accept."""

    def __init__(self, channel: SocketChannel, sock: _socket.socket) -> None:
        self.channel = channel
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return f"SocketChannel(listen {self.channel._local!s})"

    def doRead(self) -> None:
        self.channel._accept_ready()

    def connectionLost(self, reason: Failure) -> None:
        pass  # the channel closes the socket itself

    def loseConnection(self) -> None:
        """Close the listening channel (for code that tidies up stray selectables)."""
        self.channel.close()


class SocketChannel(Channel):
    """A stream socket (TCP, TCP6 or UNIX) as a channel: connected, listening or bare.

    Create one unconnected and hand :attr:`protocol` to Twisted, or use the
    class methods :meth:`connect`, :meth:`listen`, :meth:`listen_async` and
    :meth:`new_fd`.  A connected channel has ``SHUTDOWN`` and
    ``READ_MSG_PEEK`` (peeking is served from the channel's buffer, so every
    connected channel can do it), plus ``FD_PASS`` on UNIX sockets.

    :param high_water: pause reading from the socket when this many bytes are buffered.
    :param low_water: resume reading once reads drain the buffer below this
        (default: a quarter of *high_water*, at most 1 MiB).
    :param recv_size: bytes per ``recv`` (Twisted's ``bufferSize``; also
        Twisted's write-buffer pause threshold).  ``None`` keeps Twisted's 64 KiB.
    :param read_burst: on TCP, after a ``recv`` that filled *recv_size*, read
        up to this many more bytes in the same reactor turn (0: never), so a
        bulk reader wakes once per burst rather than once per chunk.
    :param on_connect: called with the channel when the connection is made.
    """

    def __init__(
        self,
        *,
        reactor: IReactorTime | None = None,
        name: str | None = None,
        high_water: int = DEFAULT_HIGH_WATER,
        low_water: int | None = None,
        recv_size: int | None = DEFAULT_RECV_SIZE,
        read_burst: int = DEFAULT_READ_BURST,
        on_connect: Callable[[SocketChannel], object] | None = None,
    ) -> None:
        super().__init__(reactor=reactor, name=name)
        if low_water is None:
            low_water = min(DEFAULT_LOW_WATER, high_water // 4)
        if not 0 <= low_water <= high_water:
            raise ValueError("need 0 <= low_water <= high_water")
        if recv_size is not None and recv_size <= 0:
            raise ValueError("recv_size must be positive")
        if read_burst < 0:
            raise ValueError("read_burst must not be negative")
        self.features = Feature.SHUTDOWN
        self.protocol = SocketProtocol(self, on_connect)
        self.transport: Any = None
        self._high_water = high_water
        self._low_water = low_water
        self._recv_size = recv_size
        self._read_burst = read_burst
        self._recv_full = recv_size or 65536  # a recv this long means "probably more"
        self._burst_sock: _socket.socket | None = None
        self._recv_error: OSError | None = None
        # read side
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._read_paused = False
        self._eof = False
        # write side
        self._write_paused = False
        self._write_shut = False
        self._drained = True
        # fd passing: (stream position of the byte that carried it, fd)
        self._fd_tags: deque[tuple[int, int]] = deque()
        self._fds_incoming: list[int] = []
        self._parked: tuple[object, int] = (None, 0)
        self._parked_attempt = self._read_parked
        self._recv_pos = 0
        self._read_pos = 0
        # lifecycle
        self._lost: Failure | None = None
        self._lost_d: Deferred[None] = Deferred()
        self.local_address: Any = None
        self.remote_address: Any = None
        self._local: SocketAddress | None = None
        self._remote: SocketAddress | None = None
        self._addresses_pending = False
        # listening mode
        self._lsock: _socket.socket | None = None
        self._reader: _ListenReader | None = None
        self._pending: deque[_socket.socket] = deque()
        self._accept_waiters: deque[Deferred[SocketChannel]] = deque()
        self._accept_error: ChannelError | None = None
        # bare mode: a socket that is neither connected nor listening (QEMU allows it)
        self._bare: _socket.socket | None = None

    @property
    def read_burst(self) -> int:
        """Bytes read past a full ``recv`` in the same reactor turn (see the constructor)."""
        return self._read_burst

    @read_burst.setter
    def read_burst(self, value: int) -> None:
        if value < 0:
            raise ValueError("read_burst must not be negative")
        self._read_burst = value

    def _child_kwargs(self) -> dict[str, Any]:
        return {
            "reactor": self._reactor_arg,
            "high_water": self._high_water,
            "low_water": self._low_water,
            "recv_size": self._recv_size,
            "read_burst": self._read_burst,
        }

    # ---- constructors ------------------------------------------------------------------

    @classmethod
    def listen(
        cls,
        address: AddressLike,
        backlog: int = 1,
        *,
        reactor: IReactorTime | None = None,
        name: str | None = None,
        high_water: int = DEFAULT_HIGH_WATER,
        low_water: int | None = None,
        recv_size: int | None = DEFAULT_RECV_SIZE,
        read_burst: int = DEFAULT_READ_BURST,
    ) -> SocketChannel:
        """QEMU's ``listen_sync``: a listening channel with ``LISTEN`` on *address*.

        Port 0 picks a free port (see :meth:`get_local_address`).  A stale UNIX
        socket file at the path is replaced, as QEMU does (only sockets are
        removed, never other files).  Runs in the calling thread: a host *name*
        is resolved there, so prefer IP literals in the reactor thread, or use
        :meth:`listen_async`.  Accepted channels inherit the buffer settings.
        Raises :class:`ChannelError` ("Failed to listen on ...").
        """
        addr = parse_address(address)
        sock = _listen_socket(addr, backlog)
        chan = cls(
            reactor=reactor,
            name=name,
            high_water=high_water,
            low_water=low_water,
            recv_size=recv_size,
            read_burst=read_burst,
        )
        chan._start_listening(sock, listen_feature=True)
        return chan

    @classmethod
    def listen_async(
        cls,
        address: AddressLike,
        backlog: int = 1,
        *,
        reactor: IReactorTime | None = None,
        pool: Any = None,
        func: Callable[[Task[SocketChannel], Any], object] | None = None,
        opaque: Any = None,
        destroy: Callable[[Any], object] | None = None,
        name: str | None = None,
        high_water: int = DEFAULT_HIGH_WATER,
        low_water: int | None = None,
        recv_size: int | None = DEFAULT_RECV_SIZE,
        read_burst: int = DEFAULT_READ_BURST,
    ) -> Task[SocketChannel]:
        """QEMU's ``listen_async``: resolve, bind and listen in a worker thread.

        Returns the :class:`~qiotwisted.task.Task` (its source is the channel).
        In the reactor thread the socket is attached to the channel, then
        ``func(task, opaque)`` runs; ``task.deferred`` fires with the listening
        channel, or fails with :class:`ChannelError`.
        """
        addr = parse_address(address)
        chan = cls(
            reactor=reactor,
            name=name,
            high_water=high_water,
            low_water=low_water,
            recv_size=recv_size,
            read_burst=read_burst,
        )

        def worker() -> _socket.socket:
            return _listen_socket(addr, backlog)

        def attach(sock: _socket.socket) -> None:
            chan._start_listening(sock, listen_feature=True)

        return _run_socket_task(
            chan, worker, attach, "listen", reactor, pool, func, opaque, destroy
        )

    @classmethod
    def connect(
        cls,
        address: AddressLike,
        *,
        reactor: IReactorTime | None = None,
        pool: Any = None,
        func: Callable[[Task[SocketChannel], Any], object] | None = None,
        opaque: Any = None,
        destroy: Callable[[Any], object] | None = None,
        name: str | None = None,
        high_water: int = DEFAULT_HIGH_WATER,
        low_water: int | None = None,
        recv_size: int | None = DEFAULT_RECV_SIZE,
        read_burst: int = DEFAULT_READ_BURST,
    ) -> Task[SocketChannel]:
        """QEMU's ``connect_async``: resolve and ``connect()`` in a worker thread.

        Returns the :class:`~qiotwisted.task.Task` at once (its source is the
        still-unconnected channel).  The worker tries each resolved address in
        turn, as QEMU does.  In the reactor thread the connected socket is
        adopted (``reactor.adoptStreamConnection``), then ``func(task,
        opaque)`` runs; ``task.deferred`` fires with the connected channel, or
        fails with :class:`ChannelError` ("Failed to connect to '...': ...").
        Cancelling the task before completion closes the socket the worker made.

        There is no ``connect_sync``: blocking the reactor thread on a connect
        would stall every other connection, so await ``task.deferred`` instead.
        """
        addr = parse_address(address)
        chan = cls(
            reactor=reactor,
            name=name,
            high_water=high_water,
            low_water=low_water,
            recv_size=recv_size,
            read_burst=read_burst,
        )

        def worker() -> _socket.socket:
            return _connect_socket(addr)

        return _run_socket_task(
            chan, worker, chan._adopt_connected, "connect", reactor, pool, func, opaque, destroy
        )

    @classmethod
    def new_fd(
        cls,
        fd: int,
        *,
        reactor: IReactorTime | None = None,
        name: str | None = None,
        high_water: int = DEFAULT_HIGH_WATER,
        low_water: int | None = None,
        recv_size: int | None = DEFAULT_RECV_SIZE,
        read_burst: int = DEFAULT_READ_BURST,
    ) -> SocketChannel:
        """QEMU's ``qio_channel_socket_new_fd``: wrap an already-open stream socket.

        On success the channel owns *fd* (it is closed with the channel); on
        failure (:class:`ChannelError`) the caller still owns it.  A connected
        socket becomes a Twisted transport (``adoptStreamConnection``); a
        listening one becomes an accepting channel *without* ``LISTEN`` (so
        close does not unlink a UNIX path, as in QEMU); a socket that is only
        bound (or fresh) is kept as it is, and I/O on it fails with "not
        connected".  ``FD_PASS`` is set for UNIX sockets.
        """
        try:
            probe = _socket.socket(fileno=os.dup(fd))
        except OSError as e:
            raise ChannelError(f"Unable to use file descriptor {fd}: {e.strerror}") from e
        handed_over = False  # True once the channel owns probe
        try:
            if probe.type != _socket.SOCK_STREAM:
                raise ChannelError(f"File descriptor {fd} is not a stream socket")
            listening = probe.getsockopt(_socket.SOL_SOCKET, _socket.SO_ACCEPTCONN) != 0
            try:
                probe.getpeername()
                connected = True
            except OSError as e:
                if e.errno != errno.ENOTCONN:
                    raise ChannelError(
                        f"Unable to query remote socket address: {e.strerror}"
                    ) from e
                connected = False
            chan = cls(
                reactor=reactor,
                name=name,
                high_water=high_water,
                low_water=low_water,
                recv_size=recv_size,
                read_burst=read_burst,
            )
            if probe.family == _socket.AF_UNIX:
                chan.features |= Feature.FD_PASS
            if connected:
                chan._adopt_connected(probe)
            elif listening:
                probe.setblocking(False)
                chan._start_listening(probe, listen_feature=False)
                handed_over = True
            else:
                chan._bare = probe
                chan._local = from_sockaddr(probe.family, probe.getsockname())
                handed_over = True
        finally:
            if not handed_over:
                probe.close()
        os.close(fd)  # success: the channel holds its own descriptor for this socket
        return chan

    # ---- Twisted side (connected mode) ----------------------------------------------------

    def _adopt_connected(self, sock: _socket.socket) -> None:
        """Make the connected *sock* this channel's transport; closes *sock* (Twisted dups it)."""
        try:
            if self._closed:
                raise ChannelClosedError()
            sock.setblocking(False)
            self.reactor.adoptStreamConnection(
                sock.fileno(), sock.family, _OneProtocolFactory(self.protocol)
            )
        except OSError as e:
            raise ChannelError(f"Unable to adopt socket: {e.strerror}") from e
        finally:
            sock.close()

    def _attach(self, transport: Any) -> None:
        self.transport = transport
        if self._recv_size is not None and hasattr(transport, "bufferSize"):
            transport.bufferSize = self._recv_size
        self.local_address = transport.getHost()
        self.remote_address = transport.getPeer()
        # The QEMU-style addresses are converted on first use: accepting is
        # hot, and most channels never ask.
        self._addresses_pending = True
        if isinstance(self.local_address, _twisted_address.UNIXAddress):
            self.features |= Feature.FD_PASS
        self.features |= Feature.READ_MSG_PEEK
        if self._closed:
            # Closed before the connection completed: do not leak it.
            transport.loseConnection()
            return
        if isinstance(transport, _tcp.Connection):
            sock = transport.getHandle()
            # TCP only: on UNIX sockets a plain recv would drop passed fds.
            if sock.family in (_socket.AF_INET, _socket.AF_INET6):
                self._burst_sock = sock
        transport.registerProducer(self.protocol, True)
        self._ready_changed()

    def _data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        self._recv_pos += len(data)
        if self._burst_sock is not None and len(data) >= self._recv_full:
            self._read_more()
        if self._fds_incoming:
            # The kernel ends a recvmsg right after the segment that carried
            # fds, so they belong to the last byte of this chunk: they go to
            # the read that returns that byte.
            tag = self._recv_pos - 1
            self._fd_tags.extend((tag, fd) for fd in self._fds_incoming)
            self._fds_incoming.clear()
        if self._buffered > self._high_water and not self._read_paused and self._lost is None:
            self._read_paused = True
            self.transport.pauseProducing()
        waiters = self._waiters
        reader = waiters["read"]
        if (
            reader is not None
            and reader is self._parked[0]
            and waiters["write"] is None
            and not self._watches
            and not self._fd_tags
        ):
            # Bulk fast path: the one parked plain read gets its bytes now,
            # without the generic readiness round trip.
            waiters["read"] = None
            reader.d.callback(self._take(self._parked[1], False))
            return
        self._ready_changed()

    def _read_more(self) -> None:
        """After a full ``recv``, keep reading in this reactor turn (TCP only).

        Twisted reads one ``bufferSize`` chunk per reactor iteration.  A full
        chunk means the kernel probably holds more, so we take up to
        ``read_burst`` more bytes now, in chunks of the same size: the copies
        stay cache-sized and the receive window reopens as promptly as with
        Twisted's own reads, while the reader wakes once for the lot instead
        of once per chunk.  A short read, EAGAIN, EOF (Twisted sees it on its
        next read) or the high-water mark ends the burst.
        """
        sock = self._burst_sock
        assert sock is not None
        size = self._recv_full
        budget = self._read_burst
        chunks = self._chunks
        while budget > 0 and self._buffered <= self._high_water:
            try:
                chunk = sock.recv(size)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # The error is consumed by this recv; Twisted's next read would
                # see a clean EOF.  Record it and drop the connection.
                self._recv_error = e
                self._burst_sock = None
                self.transport.abortConnection()
                return
            n = len(chunk)
            if not n:
                return  # EOF stays readable: Twisted's next doRead reports it
            chunks.append(chunk)
            self._buffered += n
            self._recv_pos += n
            budget -= n
            if n < size:
                return

    def _fd_received(self, fd: int) -> None:
        if self._closed:
            _close_fd(fd)
            return
        # QEMU: received fds get CLOEXEC and are reset to blocking mode
        # (O_NONBLOCK travels with the open file description).
        try:
            os.set_inheritable(fd, False)
            os.set_blocking(fd, True)
        except OSError:
            pass  # still a valid fd; the flags are a courtesy
        # Twisted reports the fds of a recvmsg before its data; tag them then.
        self._fds_incoming.append(fd)

    def _read_eof(self) -> None:
        self._eof = True
        self._ready_changed()

    def _connection_lost(self, reason: Failure) -> None:
        self._eof = True
        self._burst_sock = None
        if self._recv_error is not None:
            reason = Failure(self._recv_error)
        self._lost = reason
        self._ready_changed()
        self._lost_d.callback(None)

    def _fail(self, error: ChannelError) -> None:
        """Make every further I/O raise *error* (a set-up that failed after the fact)."""
        self._eof = True
        self._lost = Failure(error)
        self._ready_changed()

    # ---- the Channel contract --------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.transport is not None and self._lost is None

    @property
    def buffered(self) -> int:
        """Bytes received and not yet read (never much above ``high_water``)."""
        return self._buffered

    @property
    def bytes_received(self) -> int:
        """Bytes the transport has delivered since the connection was made."""
        return self._recv_pos

    @property
    def read_paused(self) -> bool:
        """True while reading from the socket is paused because the buffer is full."""
        return self._read_paused

    @property
    def write_paused(self) -> bool:
        """True while writes wait for the transport's buffer to drain."""
        return self._write_paused

    def _io_condition(self) -> Condition:
        # Plain int arithmetic: this runs several times per received chunk.
        if self._lsock is not None:
            return _CONDITIONS[_IN if self._pending or self._accept_error else 0]
        if self._bare is not None:
            return _CONDITIONS[_HUP]
        bits = _IN if self._buffered or self._eof else 0
        lost = self._lost
        if lost is not None:
            bits |= _HUP if lost.check(ConnectionDone) else _HUP | _ERR
        elif self._write_shut:
            # poll(): HUP once both directions are down (the peer's EOF alone
            # is just IN, like POLLRDHUP).
            if self._eof:
                bits |= _HUP
        elif self.transport is not None and not self._write_paused:
            bits |= _OUT
        return _CONDITIONS[bits]

    def read(self, nbytes: int, *, peek: bool = False) -> Deferred[bytes]:
        """See :meth:`Channel.read`.  Specialised for the bulk case.

        A plain read of a connected stream skips the generic layers: data
        already buffered is returned at once, and a reader that must wait is
        parked with a direct ``_take``.  Everything else (peek, fds, EOF,
        errors, closed) goes the generic way, so the semantics are the same.
        """
        if not peek and nbytes > 0 and not self._closed and not self._fd_tags:
            if self._buffered:
                return succeed(self._take(nbytes, False))
            if self._lost is None and not self._eof and self.transport is not None:
                return self._park_read(nbytes)
        return super().read(nbytes, peek=peek)

    def _park_read(self, nbytes: int) -> Deferred[bytes]:
        """Hold the read slot for a plain read of *nbytes* (nothing is buffered, no EOF)."""
        waiters = self._waiters
        if waiters["read"] is not None:
            return fail(ChannelError("Another coroutine is already waiting to read"))
        d: Deferred[bytes] = Deferred(self._cancel_parked)
        waiter = _Waiter(d, self._parked_attempt, _READ_BITS)
        waiters["read"] = waiter
        # _data_received hands the parked read its chunk directly; the
        # generic path (_ready_changed -> _fire) calls _parked_attempt.
        self._parked = (waiter, nbytes)
        return d

    def _cancel_parked(self, d: Deferred[bytes]) -> None:
        waiter = self._waiters["read"]
        if waiter is not None and waiter.d is d:
            self._waiters["read"] = None

    def _read_parked(self) -> bytes | WouldBlock:
        nbytes = self._parked[1]
        if self._buffered and not self._fd_tags and not self._closed:
            return self._take(nbytes, False)
        return self.read_nowait(nbytes)

    def _io_read(self, nbytes: int, *, peek: bool = False) -> bytes | WouldBlock:
        if not self._buffered:
            return self._read_empty("read")
        data = self._take(nbytes, peek)
        if self._fd_tags and not peek:
            # Nobody asked for these fds: drop them, as the kernel does for a
            # recvmsg without room for control data.
            for fd in self._fds_upto(self._read_pos):
                _close_fd(fd)
        return data

    def _io_read_full(self, nbytes: int) -> tuple[bytes, list[int]] | WouldBlock:
        if not self._buffered:
            data = self._read_empty("read")
            if data is WOULD_BLOCK:
                return WOULD_BLOCK
            return data, []
        data = self._take(nbytes, False)
        return data, self._fds_upto(self._read_pos)

    def _read_empty(self, what: str) -> bytes | WouldBlock:
        if (
            self._lsock is not None
            or self._bare is not None
            or (self.transport is None and self._closed)
        ):
            raise ChannelError(f"Unable to {what} from socket: Transport endpoint is not connected")
        if self._lost is not None and not self._lost.check(ConnectionDone):
            raise ChannelError(f"Unable to read from socket: {_reason(self._lost)}")
        if self._eof:
            return b""
        return WOULD_BLOCK

    def _take(self, nbytes: int, peek: bool) -> bytes:
        """Remove (or, peeking, copy) up to *nbytes* from the buffered chunks."""
        chunks = self._chunks
        first = chunks[0]
        size = len(first)
        if size >= nbytes:
            if size == nbytes:
                data = first
                if not peek:
                    chunks.popleft()
            else:
                data = first[:nbytes]
                if not peek:
                    chunks[0] = first[nbytes:]
        elif len(chunks) == 1 or size >= _NO_JOIN:
            # Less than asked for, which read() allows: handing out the chunk
            # as it is beats copying several chunks into one (the caller's
            # next read is an already-fired Deferred, far cheaper than a copy).
            data = first
            if not peek:
                chunks.popleft()
        else:
            parts: list[bytes] = []
            want = nbytes
            for chunk in chunks:
                if len(chunk) >= want:
                    parts.append(chunk[:want] if len(chunk) > want else chunk)
                    want = 0
                    break
                parts.append(chunk)
                want -= len(chunk)
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
            n = len(data)
            self._buffered -= n
            self._read_pos += n
            if self._read_paused and self._buffered <= self._low_water and self._lost is None:
                self._read_paused = False
                self.transport.resumeProducing()
        return data

    def _fds_upto(self, pos: int) -> list[int]:
        """Pop the fds carried by bytes before stream position *pos*."""
        tags = self._fd_tags
        fds: list[int] = []
        while tags and tags[0][0] < pos:
            fds.append(tags.popleft()[1])
        return fds

    def _io_write(self, chunks: Sequence[Buffer], fds: Sequence[int]) -> int | WouldBlock:
        transport = self.transport
        if transport is None:
            if self._lsock is not None or self._bare is not None:
                raise ChannelError("Unable to write to socket: Transport endpoint is not connected")
            return WOULD_BLOCK  # not connected yet: wait for connectionMade
        if self._lost is not None:
            raise ChannelError(f"Unable to write to socket: {_reason(self._lost)}")
        if self._write_shut:
            raise ChannelError("Unable to write to socket: Broken pipe")
        if self._write_paused:
            return WOULD_BLOCK
        if fds:
            return self._write_with_fds(chunks, fds)
        out: list[bytes] = []
        total = 0
        copied = 0
        for c in chunks:
            if type(c) is bytes:
                # Immutable: Twisted may keep it as it is, no copy.
                if c:
                    out.append(c)
                    total += len(c)
            else:
                room = _MAX_WRITE_COPY - copied
                if room <= 0:
                    break
                mv = c if isinstance(c, memoryview) else memoryview(c)
                piece = bytes(mv[:room]) if mv.nbytes > room else bytes(mv)
                if piece:
                    out.append(piece)
                    total += len(piece)
                    copied += len(piece)
            if total >= _MAX_WRITE_COPY:
                break
        self._drained = False
        transport.writeSequence(out)
        return total

    def _write_with_fds(self, chunks: Sequence[Buffer], fds: Sequence[int]) -> int | WouldBlock:
        """Send *fds* in one ``sendmsg`` with the first bytes, exactly as QEMU does.

        Twisted's own ``sendFileDescriptor`` sends each fd with one byte taken
        from whatever is queued at that moment, and only later, after the
        caller may have closed the fd.  So we wait until Twisted's write
        buffer is empty and the socket is writable, then ``sendmsg`` the fds
        with the data ourselves: they travel with these bytes and the caller
        may close them as soon as the write returns.
        """
        if len(fds) > MAX_FDS:
            raise ChannelError(f"Only {MAX_FDS} FDs can be sent")
        sock = getattr(self.transport, "socket", None)
        if sock is None or sock.family != _socket.AF_UNIX:
            raise ChannelError("Channel does not support file descriptor passing")
        if not self._drained:
            self._await_drain()
            return WOULD_BLOCK
        first = next(c for c in chunks if len(c))
        try:
            sent = sock.sendmsg(
                [first], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, array.array("i", fds))]
            )
        except BlockingIOError:
            self._await_drain()
            return WOULD_BLOCK
        except OSError as e:
            if e.errno == errno.ENOBUFS:
                self._await_drain()
                return WOULD_BLOCK
            raise ChannelError(f"Unable to write to socket: {e.strerror}") from e
        return sent

    def _await_drain(self) -> None:
        """Wait (OUT false) until Twisted's buffer is empty and the socket writable.

        Twisted resumes a paused streaming producer exactly when its buffer
        has fully drained, from ``doWrite`` (which runs only when the socket
        is writable), so marking ourselves paused and asking for a write
        event gets us a ``resumeProducing`` at the right moment.
        """
        self._write_paused = True
        self.transport.producerPaused = True
        self.transport.startWriting()

    def _io_shutdown(self, how: Shutdown) -> None:
        if self._lsock is not None or self._bare is not None:
            sock = self._lsock or self._bare
            assert sock is not None
            try:
                sock.shutdown({1: _socket.SHUT_RD, 2: _socket.SHUT_WR, 3: _socket.SHUT_RDWR}[how])
            except OSError as e:
                raise ChannelError(f"Unable to shutdown socket: {e.strerror}") from e
            return
        if self.transport is None or self._lost is not None:
            return
        if how & Shutdown.READ and not self._eof:
            sock = getattr(self.transport, "socket", None)
            if sock is not None:
                try:
                    sock.shutdown(_socket.SHUT_RD)
                except OSError as e:
                    raise ChannelError(f"Unable to shutdown socket: {e.strerror}") from e
            # Bytes already buffered stay readable; the transport then sees
            # EOF and reports it through readConnectionLost.
        if how & Shutdown.WRITE and not self._write_shut:
            self._write_shut = True
            # Twisted flushes what it holds first (QEMU has no user-space
            # buffer to flush), then shuts the write side -- but only with no
            # producer registered: while one is, doWrite resumes the producer
            # instead of honouring loseWriteConnection, and EOF is never sent.
            self.transport.unregisterProducer()
            self._write_paused = False
            self.transport.loseWriteConnection()

    def _io_set_delay(self, enabled: bool) -> None:
        sock = self._raw_socket()
        if sock is not None and sock.family in (_socket.AF_INET, _socket.AF_INET6):
            try:
                sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, int(not enabled))
            except OSError:
                pass  # a hint; QEMU ignores setsockopt failures here too

    def _io_set_cork(self, enabled: bool) -> None:
        sock = self._raw_socket()
        if sock is not None and sock.family in (_socket.AF_INET, _socket.AF_INET6):
            try:
                sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_CORK, int(enabled))
            except OSError:
                pass  # a hint, as in QEMU

    def _raw_socket(self) -> _socket.socket | None:
        if self.transport is not None and self._lost is None:
            return getattr(self.transport, "socket", None)
        return self._lsock or self._bare

    def set_send_buffer(self, size: int) -> None:
        """QEMU's ``qio_channel_socket_set_send_buffer``: ``SO_SNDBUF``."""
        sock = self._raw_socket()
        if sock is None:
            raise ChannelError("Unable to set socket send buffer size: not connected")
        try:
            sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_SNDBUF, size)
        except OSError as e:
            raise ChannelError(f"Unable to set socket send buffer size: {e.strerror}") from e

    def _io_close(self) -> Deferred[None] | None:
        for _, fd in self._fd_tags:
            _close_fd(fd)
        self._fd_tags.clear()
        for fd in self._fds_incoming:
            _close_fd(fd)
        self._fds_incoming.clear()
        if self._lsock is not None:
            self._close_listening()
            return None
        if self._bare is not None:
            self._bare.close()
            return None
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

    # ---- addresses -------------------------------------------------------------------

    def _convert_addresses(self) -> None:
        if self._addresses_pending:
            self._addresses_pending = False
            self._local = _convert(self.local_address)
            self._remote = _convert(self.remote_address)

    def get_local_address(self) -> SocketAddress:
        """The socket's own address (QEMU's ``get_local_address``)."""
        self._convert_addresses()
        if self._local is None:
            raise ChannelError("Unable to query local socket address: socket is not open")
        return self._local

    def get_remote_address(self) -> SocketAddress:
        """The peer's address; :class:`ChannelError` if the socket is not connected."""
        self._convert_addresses()
        if self._remote is None:
            raise ChannelError(
                "Unable to query remote socket address: Transport endpoint is not connected"
            )
        return self._remote

    # ---- listening mode ----------------------------------------------------------------

    def _start_listening(self, sock: _socket.socket, *, listen_feature: bool) -> None:
        if self._closed:
            sock.close()
            raise ChannelClosedError()
        self._lsock = sock
        self._local = from_sockaddr(sock.family, sock.getsockname())
        if sock.family == _socket.AF_UNIX:
            self.features |= Feature.FD_PASS
        if listen_feature:
            self.features |= Feature.LISTEN
        self._reader = _ListenReader(self, sock)
        self.reactor.addReader(self._reader)

    @property
    def listening(self) -> bool:
        return self._lsock is not None

    def _accept_ready(self) -> None:
        """The listening socket is readable: take one client from the kernel."""
        assert self._lsock is not None
        try:
            conn, _ = self._lsock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            if e.errno in (errno.ECONNABORTED, errno.EPROTO):
                return  # the client went away before we took it; nothing to report
            err = ChannelError(f"Unable to accept connection: {e.strerror}")
            self.log.error("accept on {channel!r} failed: {error}", channel=self, error=err)
            # Stop polling (a persistent EMFILE would spin) until someone asks again.
            self._stop_reading()
            if self._accept_waiters:
                self._accept_waiters.popleft().errback(err)
            else:
                self._accept_error = err
                self._ready_changed()
            return
        if self._accept_waiters:
            waiter = self._accept_waiters.popleft()
            try:
                chan = self._adopt_accepted(conn)
            except ChannelError:
                waiter.errback()
            else:
                waiter.callback(chan)
            return
        # Nobody is waiting: keep this one client and leave the rest in the
        # kernel's backlog until the application takes it (IN is now true).
        self._pending.append(conn)
        self._stop_reading()
        self._ready_changed()

    def _stop_reading(self) -> None:
        if self._reader is not None:
            self.reactor.removeReader(self._reader)

    def _start_reading(self) -> None:
        if self._reader is not None and not self._closed:
            self.reactor.addReader(self._reader)

    def _adopt_accepted(self, conn: _socket.socket) -> SocketChannel:
        chan = SocketChannel(**self._child_kwargs())
        try:
            chan._adopt_connected(conn)
        except ChannelError as e:
            raise ChannelError(f"Unable to accept connection: {e}") from e
        self.log.debug(
            "qio_channel_socket_accept_complete",
            listener=self,
            client=chan,
            thread=threading.get_ident(),
        )
        return chan

    def accept_nowait(self) -> SocketChannel | WouldBlock:
        """QEMU's ``qio_channel_socket_accept``: a connected channel, or WOULD_BLOCK.

        (QEMU reports EAGAIN as an error; a sentinel is easier to use.)
        Raises :class:`ChannelError` ("Unable to accept connection: ...").
        """
        self._check_open()
        if self._lsock is None:
            raise ChannelError("Unable to accept connection: socket is not listening")
        if self._accept_error is not None:
            err, self._accept_error = self._accept_error, None
            self._start_reading()
            raise err
        if not self._pending:
            return WOULD_BLOCK
        conn = self._pending.popleft()
        self._start_reading()
        return self._adopt_accepted(conn)

    def accept(self) -> Deferred[SocketChannel]:
        """Fire with the next client as a connected :class:`SocketChannel`.

        Any number of callers may wait; they are served in order.
        Cancelling a waiter drops it; closing the channel fails them with
        :class:`ChannelClosedError`.
        """
        try:
            got = self.accept_nowait()
        except Exception:
            return fail()
        if got is not WOULD_BLOCK:
            return succeed(got)

        def cancel(d: Deferred[SocketChannel]) -> None:
            if d in self._accept_waiters:
                self._accept_waiters.remove(d)

        waiter: Deferred[SocketChannel] = Deferred(cancel)
        self._accept_waiters.append(waiter)
        return waiter

    def _close_listening(self) -> None:
        sock = self._lsock
        assert sock is not None
        self._stop_reading()
        self._reader = None
        for conn in self._pending:
            conn.close()
        self._pending.clear()
        waiters, self._accept_waiters = self._accept_waiters, deque()
        for waiter in waiters:
            waiter.errback(ChannelClosedError())
        self._convert_addresses()
        local = self._local
        sock.close()
        # QEMU's socket_listen_cleanup: only a channel that did the listen()
        # owns the path; an adopted or merely bound socket leaves it alone.
        if (
            self.features & Feature.LISTEN
            and isinstance(local, UnixSocketAddress)
            and local.in_filesystem
        ):
            try:
                os.unlink(local.path)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise ChannelError(f"Failed to unlink socket {local.path}: {e.strerror}") from e


# ---- blocking socket set-up (safe in a worker thread) ------------------------------------


def _listen_socket(addr: SocketAddress, backlog: int) -> _socket.socket:
    """Create, bind and listen; returns a non-blocking socket.  May block (DNS)."""
    if isinstance(addr, FdSocketAddress):
        try:
            sock = _socket.socket(fileno=os.dup(addr.fd))
            sock.listen(backlog)
        except OSError as e:
            raise ChannelError(f"Failed to listen on '{addr}': {e.strerror}") from e
        os.close(addr.fd)  # ownership taken on success, as for new_fd
        sock.setblocking(False)
        return sock
    if isinstance(addr, UnixSocketAddress):
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            if addr.in_filesystem:
                _unlink_stale_socket(addr.path)
            sock.bind(addr.path)
            sock.listen(backlog)
        except OSError as e:
            sock.close()
            raise ChannelError(f"Failed to bind socket to {addr.path}: {e.strerror}") from e
        sock.setblocking(False)
        return sock
    last: OSError | None = None
    for family, socktype, proto, sockaddr in _resolve(addr, passive=True):
        sock = _socket.socket(family, socktype, proto)
        try:
            sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
            if family == _socket.AF_INET6:
                sock.setsockopt(_socket.IPPROTO_IPV6, _socket.IPV6_V6ONLY, int(addr.ipv4 is False))
            sock.bind(sockaddr)
            sock.listen(backlog)
        except OSError as e:
            sock.close()
            last = e
            continue
        sock.setblocking(False)
        return sock
    reason = last.strerror if last is not None else "no usable address"
    raise ChannelError(f"Failed to listen on '{addr}': {reason}")


def _connect_socket(addr: SocketAddress) -> _socket.socket:
    """Create and connect a socket (blocking); tries each resolved address in turn."""
    if isinstance(addr, FdSocketAddress):
        try:
            sock = _socket.socket(fileno=os.dup(addr.fd))
            sock.getpeername()
        except OSError as e:
            raise ChannelError(f"Failed to use '{addr}': {e.strerror}") from e
        os.close(addr.fd)
        return sock
    if isinstance(addr, UnixSocketAddress):
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            sock.connect(addr.path)
        except OSError as e:
            sock.close()
            raise ChannelError(f"Failed to connect to '{addr.path}': {e.strerror}") from e
        return sock
    last: OSError | None = None
    for family, socktype, proto, sockaddr in _resolve(addr, passive=False):
        sock = _socket.socket(family, socktype, proto)
        try:
            sock.connect(sockaddr)
        except OSError as e:
            sock.close()
            last = e
            continue
        return sock
    reason = last.strerror if last is not None else "no usable address"
    raise ChannelError(f"Failed to connect to '{addr}': {reason}")


def _resolve(addr: InetSocketAddress, *, passive: bool) -> list[tuple[Any, Any, Any, Any]]:
    try:
        infos = _socket.getaddrinfo(
            addr.host or None,
            addr.port,
            _socket.AF_UNSPEC,
            _socket.SOCK_STREAM,
            0,
            # No AI_ADDRCONFIG: it hides ::1 on hosts whose only IPv6 address is loopback.
            _socket.AI_PASSIVE if passive else 0,
        )
    except _socket.gaierror as e:
        raise ChannelError(f"address resolution failed for {addr}: {e.strerror}") from e
    families = addr.families
    return [(f, t, p, sa) for f, t, p, _, sa in infos if f in families]


def _unlink_stale_socket(path: str) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if stat.S_ISSOCK(st.st_mode):
        os.unlink(path)


# ---- Task wiring -------------------------------------------------------------------------


class _SocketHolder:
    """The worker's socket until the reactor thread takes it; closed if nobody does.

    ``release`` is the Task's destroy notifier: it may run while a cancelled
    worker is still connecting, so the hand-over is under a lock and a socket
    arriving after release is closed by the worker itself.
    """

    __slots__ = ("_dead", "_lock", "_sock")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: _socket.socket | None = None
        self._dead = False

    def put(self, sock: _socket.socket) -> bool:
        with self._lock:
            if not self._dead:
                self._sock = sock
                return True
        sock.close()
        return False

    def take(self) -> _socket.socket | None:
        with self._lock:
            sock, self._sock = self._sock, None
        return sock

    def release(self, _: object = None) -> None:
        with self._lock:
            self._dead = True
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


def _run_socket_task(
    chan: SocketChannel,
    make: Callable[[], _socket.socket],
    attach: Callable[[_socket.socket], None],
    what: str,
    reactor: Any,
    pool: Any,
    func: Callable[[Task[SocketChannel], Any], object] | None,
    opaque: Any,
    destroy: Callable[[Any], object] | None,
) -> Task[SocketChannel]:
    """Run *make* in a worker thread, then *attach* its socket to *chan* in the reactor thread."""
    from ..task import Task

    holder = _SocketHolder()

    def complete(task: Task[SocketChannel], _: object) -> None:
        # Reactor thread.  Attach before the user's func so it sees a usable channel.
        sock = holder.take()
        if sock is not None and (task.cancelled or task.has_error or chan.closed):
            # Nobody will use it: the task was cancelled, or the channel was
            # closed while the worker ran (close() then had nothing to close).
            sock.close()
        elif sock is not None:
            try:
                attach(sock)
            except ChannelError as e:
                # The Task's outcome is fixed once completion starts, so the
                # failure is recorded on the channel: its first I/O raises it.
                chan._fail(e)
                chan.log.error(
                    "qio_channel_socket_{what}_fail: {error}",
                    what=what,
                    channel=chan,
                    error=str(e),
                    thread=threading.get_ident(),
                )
            else:
                chan.log.debug(
                    "qio_channel_socket_{what}_complete",
                    what=what,
                    channel=chan,
                    thread=threading.get_ident(),
                )
        if func is not None:
            func(task, opaque)

    def worker(task: Task[SocketChannel], _: object) -> None:
        # Pool thread: touches only the new socket and the holder.
        try:
            sock = make()
        except ChannelError as e:
            task.set_error(e)
            return
        except Exception as e:
            task.set_error(ChannelError(f"{what} failed: {e}"))
            return
        if holder.put(sock):
            task.set_result(chan)

    task: Task[SocketChannel] = Task(chan, complete, opaque, destroy, reactor=reactor, pool=pool)
    chan.log.debug(
        "qio_channel_socket_{what}_async", what=what, channel=chan, thread=threading.get_ident()
    )
    task.run_in_thread(worker, None, holder.release)
    return task


# ---- helpers -----------------------------------------------------------------------------


def _convert(addr: object) -> SocketAddress | None:
    try:
        return from_twisted(addr)
    except ValueError:
        return None


def _reason(failure: Failure) -> str:
    """A short cause for "Unable to read from socket: ..." messages."""
    value = failure.value
    if isinstance(value, ChannelError):
        return str(value)
    if isinstance(value, ConnectionAborted):  # (a ConnectionLost subclass)
        return "Connection aborted"
    if isinstance(value, ConnectionLost):
        # Twisted maps ECONNRESET, EPIPE, ETIMEDOUT... all to ConnectionLost and
        # drops the errno; say what it can have been rather than nothing.
        return "Connection lost (reset by peer or network failure)"
    if isinstance(value, ConnectionDone):
        return "Connection closed"
    if isinstance(value, OSError) and value.strerror:
        return str(value.strerror)
    return str(value) or type(value).__name__


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass  # already closed by its owner; nothing else to release
