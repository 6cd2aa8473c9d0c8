"""SocketChannel over real sockets: QEMU's tests/unit/test-io-channel-socket.c and more.

QEMU's set-up variants map as follows:

* "sync": ``SocketChannel.listen`` (QEMU's ``listen_sync``) and a client
  connected by Twisted itself (``connectProtocol`` with the channel's
  protocol), then ``wait(IN)`` on the listener and ``accept_nowait``;
* "async": ``SocketChannel.listen_async`` and ``SocketChannel.connect``
  (QEMU's ``listen_async``/``connect_async``: Tasks whose workers run in a
  thread), then ``wait(IN)`` and ``accept_nowait``.

QEMU's "unref without close" steps become explicit closes: Python has no
refcount finalizer that closes a socket deterministically, and the reactor
keeps live transports referenced anyway.  Every test closes what it opened;
the conftest hygiene fixture fails a test that leaves anything behind.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import termios
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import task
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    UNIXClientEndpoint,
    connectProtocol,
)

from qiotwisted.channel import (
    MAX_FDS,
    WOULD_BLOCK,
    Channel,
    Condition,
    FdSocketAddress,
    Feature,
    InetSocketAddress,
    Shutdown,
    SocketAddress,
    SocketChannel,
    UnixSocketAddress,
    parse_address,
)
from qiotwisted.errors import ChannelClosedError, ChannelEOFError, ChannelError
from qiotwisted.task import Task
from tests.channel_helpers import ChannelTest

SOCK_NAME = "test-io-channel-socket.sock"
TCP_CLOSE = 7  # tcpi_state after a reset
Setup = Callable[[Any, str], Awaitable[tuple[SocketChannel, SocketChannel, SocketChannel]]]


# ---- set-up helpers ------------------------------------------------------------------------------


def endpoint_for(reactor: Any, addr: SocketAddress) -> Any:
    if isinstance(addr, UnixSocketAddress):
        return UNIXClientEndpoint(reactor, addr.path, timeout=5)
    assert isinstance(addr, InetSocketAddress)
    if ":" in addr.host:
        return TCP6ClientEndpoint(reactor, addr.host, addr.port, timeout=5)
    return TCP4ClientEndpoint(reactor, addr.host, addr.port, timeout=5)


def socket_buffers(*channels: SocketChannel) -> None:
    """QEMU's test sets SO_SNDBUF to 64 KiB on both ends."""
    for ch in channels:
        ch.set_send_buffer(64 * 1024)


async def accept_one(lis: SocketChannel) -> SocketChannel:
    """QEMU's ``qio_channel_wait(lioc, G_IO_IN)`` + ``accept`` (asserted non-NULL)."""
    cond = await lis.wait(Condition.IN)
    assert cond == Condition.IN
    dst = lis.accept_nowait()
    assert isinstance(dst, SocketChannel)
    return dst


async def setup_sync(
    reactor: Any, listen_addr: str
) -> tuple[SocketChannel, SocketChannel, SocketChannel]:
    lis = SocketChannel.listen(listen_addr, 1)
    connect_addr = lis.get_local_address()  # the real port, when port 0 was asked for
    src = SocketChannel(reactor=reactor)
    await connectProtocol(endpoint_for(reactor, connect_addr), src.protocol)
    src.set_delay(False)
    dst = await accept_one(lis)
    socket_buffers(src, dst)
    return lis, src, dst


async def setup_async(
    reactor: Any, listen_addr: str
) -> tuple[SocketChannel, SocketChannel, SocketChannel]:
    lis = await SocketChannel.listen_async(listen_addr, 1).deferred
    src = await SocketChannel.connect(lis.get_local_address()).deferred
    dst = await accept_one(lis)
    src.set_delay(False)
    socket_buffers(src, dst)
    return lis, src, dst


def assert_features(src: SocketChannel, dst: SocketChannel, pass_fd: bool) -> None:
    for ch in (src, dst):
        assert ch.has_feature(Feature.FD_PASS) is pass_fd
        assert ch.has_feature(Feature.SHUTDOWN)
        assert ch.has_feature(Feature.READ_MSG_PEEK)
        assert not ch.has_feature(Feature.LISTEN)


async def close_all(*channels: Channel) -> None:
    for ch in channels:
        await ch.close()


async def pair(reactor: Any, listen_addr: str = "127.0.0.1:0", **kw: Any) -> tuple[Any, ...]:
    """A listener and a connected (client, server) pair via SocketChannel.connect."""
    lis = SocketChannel.listen(listen_addr, 1, **kw)
    src = await SocketChannel.connect(lis.get_local_address(), **kw).deferred
    dst = await lis.accept()
    return lis, src, dst


# ---- QEMU's common scenario ----------------------------------------------------------------------


@pytest.mark.timeout_s(30)
@pytest.mark.parametrize("setup", [setup_sync, setup_async], ids=["sync", "async"])
@pytest.mark.parametrize("family", ["ipv4", "ipv6", "unix"])
async def test_io_channel(reactor: Any, tmp_path: Path, setup: Setup, family: str) -> None:
    """/io/channel/socket/{ipv4,ipv6,unix}-{sync,async}."""
    path = tmp_path / SOCK_NAME
    listen_addr = {"ipv4": "127.0.0.1:0", "ipv6": "[::1]:0", "unix": f"unix:{path}"}[family]
    pass_fd = family == "unix"

    def path_exists() -> bool:
        return path.exists() if pass_fd else True

    lis, src, dst = await setup(reactor, listen_addr)
    assert lis.has_feature(Feature.LISTEN)
    assert_features(src, dst, pass_fd)
    assert path_exists()
    test = ChannelTest()
    await test.run(src, dst, blocking=True)
    test.validate()
    assert path_exists()
    await close_all(src, dst)
    assert path_exists(), "closing the clients leaves the listener's path"
    await lis.close()
    if pass_fd:
        assert not path.exists(), "closing a LISTEN channel unlinks its path"

    lis, src, dst = await setup(reactor, listen_addr)
    assert_features(src, dst, pass_fd)
    test = ChannelTest()
    await test.run(src, dst, blocking=False)
    test.validate()
    assert path_exists()
    await close_all(src, dst)
    assert path_exists()
    await lis.close()
    if pass_fd:
        assert not path.exists()
    assert lis.closed and src.closed and dst.closed


async def test_ipv4_fd(reactor: Any) -> None:
    """/io/channel/socket/ipv4-fd: a raw socket bound to loopback, adopted with new_fd."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    fd = sock.detach()
    ch = SocketChannel.new_fd(fd)
    assert type(ch) is SocketChannel  # QEMU: type name "qio-channel-socket"
    with pytest.raises(OSError) as exc:
        os.fstat(fd)  # ownership taken: the channel holds its own descriptor
    assert exc.value.errno == errno.EBADF
    assert ch.get_local_address() == InetSocketAddress("127.0.0.1", port)
    assert not ch.has_feature(Feature.FD_PASS)
    with pytest.raises(ChannelError, match="Transport endpoint is not connected"):
        ch.get_remote_address()
    with pytest.raises(ChannelError, match="Transport endpoint is not connected"):
        ch.read_nowait(1)
    await ch.close()


async def test_new_fd_on_socketpair_carries_the_pattern(reactor: Any) -> None:
    a, b = socket.socketpair()
    src = SocketChannel.new_fd(a.detach())
    dst = SocketChannel.new_fd(b.detach())
    assert_features(src, dst, pass_fd=True)
    test = ChannelTest()
    await test.run(src, dst, blocking=True)
    test.validate()
    await close_all(src, dst)


async def test_new_fd_on_listening_tcp_socket_accepts_without_listen_feature(
    reactor: Any,
) -> None:
    raw = socket.socket()
    raw.bind(("127.0.0.1", 0))
    raw.listen(4)
    lis = SocketChannel.new_fd(raw.detach())
    assert not lis.has_feature(Feature.LISTEN), "QEMU: only listen() sets LISTEN"
    src = await SocketChannel.connect(lis.get_local_address()).deferred
    dst = await lis.accept()
    await src.write_all(b"ping")
    assert await dst.read_all(4) == b"ping"
    await close_all(src, dst, lis)


async def test_new_fd_rejects_a_pipe_and_leaves_it_to_the_caller(reactor: Any) -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(ChannelError):
            SocketChannel.new_fd(r)
        os.fstat(r)  # still open: failure leaves ownership with the caller
    finally:
        os.close(r)
        os.close(w)


# ---- fd passing ----------------------------------------------------------------------------------


@pytest.mark.timeout_s(20)
async def test_unix_fd_pass(reactor: Any, tmp_path: Path) -> None:
    """/io/channel/socket/unix-fd-pass: 3 fds of one open file travel with 12 bytes."""
    lis, src, dst = await setup_sync(reactor, f"unix:{tmp_path / SOCK_NAME}")
    assert src.has_feature(Feature.FD_PASS) and dst.has_feature(Feature.FD_PASS)
    testfd = os.open(tmp_path / "test-io-channel-socket.txt", os.O_RDWR | os.O_CREAT, 0o600)
    msg = b"Hello World\0"
    fdrecv: list[int] = []
    try:
        await src.write_all(msg, [testfd, testfd, testfd])
        data, fdrecv = await dst.read_full(len(msg))
        assert len(fdrecv) == 3
        assert data == msg
        for fd in fdrecv:
            assert fd != testfd
            assert not os.get_inheritable(fd), "received fds get CLOEXEC"
        assert len(set(fdrecv)) == 3
        # The received fds share the open file with testfd.
        assert os.write(fdrecv[0], msg) == len(msg)
        os.lseek(testfd, 0, os.SEEK_SET)
        assert os.read(testfd, len(msg)) == msg
    finally:
        for fd in fdrecv:
            os.close(fd)
        os.close(testfd)
        await close_all(src, dst, lis)


async def test_fds_stay_with_their_bytes(reactor: Any, tmp_path: Path) -> None:
    lis, src, dst = await pair(reactor, f"unix:{tmp_path / SOCK_NAME}")
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    got: list[int] = []
    try:
        await src.write_all(b"hdr")  # plain bytes first: the fd write must wait for them
        await src.write_all(b"one", [w1])
        await src.write_all(b"two", [w2])
        os.close(w1)  # the sender may close as soon as the write returned
        os.close(w2)
        assert await dst.read_all_full(3) == (b"hdr", [])
        d1, f1 = await dst.read_all_full(3)
        d2, f2 = await dst.read_all_full(3)
        got = f1 + f2
        assert (d1, len(f1), d2, len(f2)) == (b"one", 1, b"two", 1)
        os.write(f1[0], b"A")
        os.write(f2[0], b"B")
        assert os.read(r1, 1) == b"A" and os.read(r2, 1) == b"B", "each fd came with its message"
    finally:
        for fd in [r1, r2, *got]:
            os.close(fd)
        await close_all(src, dst, lis)


async def test_fds_queued_behind_data_keep_their_position(reactor: Any, tmp_path: Path) -> None:
    """An fd written while Twisted still holds earlier bytes is sent with its own bytes."""
    lis, src, dst = await pair(reactor, f"unix:{tmp_path / SOCK_NAME}", high_water=64 * 1024)
    bulk = b"x" * (2 * 1024 * 1024)
    r, w = os.pipe()
    received: list[int] = []
    try:
        pending = src.write_all(bulk)  # far more than the socket buffers hold
        marker = src.write_all(b"M", [w])
        assert not marker.called, "the fd waits until the bytes ahead of it are out"
        pos = 0
        where = None
        for _ in range(10_000):
            data, fds = await dst.read_full(64 * 1024)
            assert data
            if fds:
                received.extend(fds)
                where = (pos, pos + len(data))
            pos += len(data)
            if pos == len(bulk) + 1:
                break
        await pending
        await marker
        assert len(received) == 1 and where is not None
        assert where[0] <= len(bulk) < where[1], "the fd arrived with the 'M' byte"
    finally:
        for fd in [r, w, *received]:
            os.close(fd)
        await close_all(src, dst, lis)


async def test_plain_read_drops_fds_nobody_asked_for(reactor: Any, tmp_path: Path) -> None:
    lis, src, dst = await pair(reactor, f"unix:{tmp_path / SOCK_NAME}")
    r, w = os.pipe()
    try:
        before = set(os.listdir("/proc/self/fd"))
        await src.write_all(b"data", [w])
        assert await dst.read_all(4) == b"data"
        after = set(os.listdir("/proc/self/fd"))
        assert after <= before, f"received fd leaked: {after - before}"
    finally:
        os.close(r)
        os.close(w)
        await close_all(src, dst, lis)


async def test_fd_limits(reactor: Any, tmp_path: Path) -> None:
    lis, src, dst = await pair(reactor, f"unix:{tmp_path / SOCK_NAME}")
    tcp_lis, tcp_src, tcp_dst = await pair(reactor)
    try:
        with pytest.raises(ChannelError, match=f"^Only {MAX_FDS} FDs can be sent$"):
            await src.write_all(b"x" * 32, [0] * (MAX_FDS + 1))
        with pytest.raises(ChannelError, match="does not support file descriptor passing"):
            await tcp_src.write_all(b"x", [0])
        with pytest.raises(ChannelError, match="does not support file descriptor passing"):
            await tcp_dst.read_full(1)
    finally:
        await close_all(src, dst, lis, tcp_src, tcp_dst, tcp_lis)


# ---- UNIX path lifecycle -------------------------------------------------------------------------


async def test_unix_listen_cleanup(reactor: Any, tmp_path: Path) -> None:
    """/io/channel/socket/unix-listen-cleanup: a bound socket without LISTEN keeps its path."""
    path = tmp_path / SOCK_NAME
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    ch = SocketChannel.new_fd(sock.detach())
    assert not ch.has_feature(Feature.LISTEN)
    assert ch.get_local_address() == UnixSocketAddress(str(path))
    assert path.exists()
    await ch.close()
    assert path.exists(), "close without LISTEN must not unlink"


async def test_adopted_listening_unix_socket_keeps_its_path(reactor: Any, tmp_path: Path) -> None:
    path = tmp_path / SOCK_NAME
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(1)
    lis = SocketChannel.new_fd(sock.detach())
    src = await SocketChannel.connect(f"unix:{path}").deferred
    dst = await lis.accept()
    await close_all(src, dst, lis)
    assert path.exists()


async def test_listen_replaces_a_stale_socket_but_not_a_file(reactor: Any, tmp_path: Path) -> None:
    path = tmp_path / SOCK_NAME
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the path remains, as after a crash
    lis = SocketChannel.listen(f"unix:{path}")
    await lis.close()
    assert not path.exists()
    path.write_bytes(b"precious")
    with pytest.raises(ChannelError, match=r"Failed to bind socket to .*Address already in use"):
        SocketChannel.listen(f"unix:{path}")
    assert path.read_bytes() == b"precious"


# ---- EOF, errors, peek, half-close ---------------------------------------------------------------


async def test_read_all_eof_message(reactor: Any) -> None:
    lis, src, dst = await pair(reactor)
    await src.write_all(b"abc")
    await src.close()
    with pytest.raises(ChannelEOFError) as exc:
        await dst.read_all(10)
    assert str(exc.value) == "Unexpected end-of-file before all data were read"
    await close_all(dst, lis)


async def test_read_all_eof_returns_empty_on_clean_eof(reactor: Any) -> None:
    lis, src, dst = await pair(reactor)
    await src.write_all(b"12345678")
    src.shutdown(Shutdown.WRITE)
    assert await dst.read_all_eof(8) == b"12345678"
    assert await dst.read_all_eof(8) == b""
    assert await dst.readv_all_eof([bytearray(4)]) is False
    with pytest.raises(ChannelEOFError):
        await dst.read_all(1)
    await close_all(src, dst, lis)


async def test_reset_peer_gives_a_clear_error(reactor: Any) -> None:
    lis = SocketChannel.listen("127.0.0.1:0")
    addr = lis.get_local_address()
    assert isinstance(addr, InetSocketAddress)
    raw = socket.socket()
    raw.setblocking(False)
    assert raw.connect_ex((addr.host, addr.port)) in (0, errno.EINPROGRESS)
    dst = await lis.accept()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.close()  # linger 0: the kernel sends RST
    with pytest.raises(ChannelError) as exc:
        await dst.read(10)
    assert not isinstance(exc.value, ChannelEOFError)
    assert str(exc.value) == (
        "Unable to read from socket: Connection lost (reset by peer or network failure)"
    )
    assert dst.condition() & Condition.ERR
    with pytest.raises(ChannelError, match=r"^Unable to write to socket: Connection lost"):
        await dst.write_all(b"x")
    await close_all(dst, lis)


async def test_peek_does_not_consume(reactor: Any) -> None:
    lis, src, dst = await pair(reactor)
    await src.write_all(b"hello")
    await dst.wait(Condition.IN)
    for _ in range(1000):  # data is in flight on loopback
        if dst.buffered >= 5:
            break
        await task.deferLater(reactor, 0.001)
    assert dst.buffered == 5
    assert await dst.read(3, peek=True) == b"hel"
    assert await dst.read(10, peek=True) == b"hello"
    await src.write_all(b" world")
    assert await dst.read_all(11) == b"hello world"
    d = dst.read(1, peek=True)
    assert not d.called
    await src.write_all(b"!")
    assert await d == b"!"
    assert await dst.read(1) == b"!"
    await close_all(src, dst, lis)


async def test_half_close(reactor: Any) -> None:
    lis, src, dst = await pair(reactor)
    await src.write_all(b"request")
    src.shutdown(Shutdown.WRITE)
    assert await dst.read_all(7) == b"request"
    assert await dst.read(100) == b"", "the peer's EOF is seen"
    await dst.write_all(b"response")  # while we can still write
    assert await src.read_all(8) == b"response"
    with pytest.raises(ChannelError, match="Broken pipe"):
        await src.write_all(b"more")
    dst.shutdown(Shutdown.WRITE)
    assert await src.read(1) == b""
    await close_all(src, dst, lis)


async def test_half_close_after_a_write_that_filled_the_transport(reactor: Any) -> None:
    """Regression: with the write producer paused, Twisted never sent the EOF."""
    lis, src, dst = await pair(reactor)
    payload = bytes(range(256)) * 8192  # 2 MiB: well past Twisted's 64 KiB pause mark
    await src.write_all(payload)
    src.shutdown(Shutdown.WRITE)
    assert await dst.read_all(len(payload)) == payload
    assert await dst.read(100) == b""
    await close_all(src, dst, lis)


async def test_shutdown_read(reactor: Any) -> None:
    lis, src, dst = await pair(reactor)
    src.shutdown(Shutdown.READ)
    assert await src.read(10) == b"", "a read-shut channel reads EOF"
    await src.write_all(b"still writes")
    assert await dst.read_all(12) == b"still writes"
    await close_all(src, dst, lis)


async def test_set_delay_and_cork(reactor: Any) -> None:
    lis, src, dst = await pair(reactor)
    sock = src.transport.socket
    src.set_delay(False)
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    src.set_delay(True)
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
    src.set_cork(True)
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK) == 1
    src.set_cork(False)
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK) == 0
    await close_all(src, dst, lis)


async def test_addresses(reactor: Any) -> None:
    lis, src, dst = await pair(reactor, "[::1]:0")
    laddr = lis.get_local_address()
    assert isinstance(laddr, InetSocketAddress) and laddr.host == "::1" and laddr.port > 0
    assert src.get_remote_address() == laddr
    assert dst.get_local_address() == laddr
    assert dst.get_remote_address() == src.get_local_address()
    with pytest.raises(ChannelError, match="Unable to query remote socket address"):
        lis.get_remote_address()
    await close_all(src, dst, lis)


async def test_close_flushes_pending_output(reactor: Any) -> None:
    lis, src, dst = await pair(reactor)
    payload = os.urandom(3 * 1024 * 1024)
    src.write_nowait(payload)  # Twisted holds most of it; close must not drop it
    closing = src.close()
    assert await dst.read_all(len(payload)) == payload
    assert await dst.read(1) == b""
    await closing
    await close_all(dst, lis)


async def test_abort_resets_the_peer(reactor: Any) -> None:
    lis, src, dst = await pair(reactor)
    await src.abort()
    with pytest.raises(ChannelError, match=r"^Unable to read from socket: "):
        await dst.read(1)
    await close_all(dst, lis)


async def test_write_copies_mutable_buffers_and_bounds_the_copy(reactor: Any) -> None:
    lis, src, dst = await pair(reactor)
    buf = bytearray(b"a" * 100)
    assert src.write_nowait(buf) == 100
    buf[:] = b"b" * 100  # the caller may reuse its buffer at once
    assert await dst.read_all(100) == b"a" * 100
    big = bytearray(3 * 1024 * 1024)
    accepted = src.write_nowait(big)
    assert accepted == 1024 * 1024, "one write copies at most 1 MiB of a mutable buffer"
    got = 0
    for _ in range(10_000):
        if not src.write_paused:
            break
        got += len(await dst.read(1 << 20))
    assert not src.write_paused
    frozen = bytes(3 * 1024 * 1024)
    assert src.write_nowait(frozen) == len(frozen), "bytes are taken whole, without a copy"
    rest = accepted + len(frozen) - got
    assert await dst.read_all(rest) == bytes(rest)
    await close_all(src, dst, lis)


async def test_watch_sees_eof_then_hangup(reactor: Any) -> None:
    """As poll() does: the peer's EOF makes IN true; HUP needs both directions down."""
    lis, src, dst = await pair(reactor)
    seen: list[Condition] = []
    fired: list[Deferred[None]] = [Deferred(), Deferred()]

    def watch(ch: Channel, cond: Condition, data: Any) -> bool:
        seen.append(cond)
        fired[len(seen) - 1].callback(None)
        return len(seen) < 2

    assert dst.condition() == Condition.OUT
    await src.close()
    assert await dst.read(1) == b""
    dst.add_watch(Condition.IN | Condition.HUP, watch)
    await fired[0]
    assert seen == [Condition.IN]
    dst.shutdown(Shutdown.WRITE)
    assert dst.condition() & Condition.HUP
    assert not dst.condition() & Condition.ERR
    await fired[1]
    assert seen[1] == Condition.IN | Condition.HUP
    await close_all(dst, lis)


async def test_on_connect_that_raises_is_logged(reactor: Any) -> None:
    from twisted.logger import capturedLogs

    lis = SocketChannel.listen("127.0.0.1:0")

    def boom(ch: SocketChannel) -> None:
        raise RuntimeError("callback bug")

    src = SocketChannel(reactor=reactor, on_connect=boom)
    with capturedLogs() as events:
        await connectProtocol(endpoint_for(reactor, lis.get_local_address()), src.protocol)
    assert any(
        e.get("log_failure") is not None and isinstance(e["log_failure"].value, RuntimeError)
        for e in events
    )
    assert src.connected, "the connection survives its callback's bug"
    dst = await lis.accept()
    await close_all(src, dst, lis)


# ---- backpressure --------------------------------------------------------------------------------


def twisted_unsent(transport: Any) -> int:
    """Bytes Twisted holds for a transport but has not yet given to the kernel."""
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


@pytest.mark.timeout_s(30)
async def test_slow_reader_keeps_sender_paused(reactor: Any) -> None:
    high, low, recv = 256 * 1024, 64 * 1024, 64 * 1024
    lis, src, dst = await pair(reactor, high_water=high, low_water=low, recv_size=recv)
    for ch in (src, dst):
        ch.set_send_buffer(64 * 1024)
        ch.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    kernel = sum(
        ch.transport.socket.getsockopt(socket.SOL_SOCKET, opt)
        for ch in (src, dst)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF)
    )
    chunk, nchunks = 256 * 1024, 64  # 16 MiB, far above every buffer on the way
    accepted = 0
    peak_unsent = 0

    async def produce() -> None:
        nonlocal accepted, peak_unsent
        for i in range(nchunks):
            await src.write_all(bytes([i]) * chunk)
            accepted += chunk
            peak_unsent = max(peak_unsent, twisted_unsent(src.transport))

    producer = Deferred.fromCoroutine(produce())
    # Let the stream run into the wall: stop when nothing moved for 10 polls.
    last, still = (-1, -1), 0
    for _ in range(1000):
        await task.deferLater(reactor, 0.005)
        now = (accepted, dst.bytes_received)
        still = still + 1 if now == last else 0
        last = now
        if still >= 10 and dst.read_paused and src.write_paused:
            break
    assert still >= 10, "the transfer never stalled"
    assert not producer.called, "the writer must be held back by the reader"
    assert dst.read_paused and src.write_paused
    assert dst.buffered <= high + recv
    assert twisted_unsent(src.transport) <= recv + chunk
    in_flight = accepted - dst.bytes_received
    assert in_flight <= (recv + chunk) + kernel, (in_flight, kernel)
    assert accepted < nchunks * chunk // 2

    # Now read slowly; the bounds hold all the way.
    received = 0
    for _ in range(100_000):
        data = await dst.read(48 * 1024)
        assert data
        first = received // chunk
        assert data[0] == first, "bytes arrive in order"
        received += len(data)
        assert dst.buffered <= high + recv
        assert accepted - received <= high + recv + (recv + chunk) + kernel
        if received == nchunks * chunk:
            break
    await producer
    assert peak_unsent <= recv + chunk
    await close_all(src, dst, lis)


# ---- read bursts (TCP) ------------------------------------------------------------------------


async def kernel_queue(reactor: Any, ch: SocketChannel, nbytes: int, *, closed: bool) -> None:
    """Wait until *ch*'s socket holds *nbytes* unread (and, if *closed*, the peer's RST)."""
    sock = ch.transport.getHandle()
    for _ in range(2000):
        queued = struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0" * 4))[0]
        state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
        if queued == nbytes and (not closed or state == TCP_CLOSE):
            return
        await task.deferLater(reactor, 0.002)
    raise AssertionError(f"kernel queue never reached {nbytes} bytes")


async def paused_raw_pair(reactor: Any, recv_size: int) -> tuple[Any, ...]:
    """A listener, a raw blocking client socket, and the accepted channel with reading paused."""
    lis = SocketChannel.listen("127.0.0.1:0", recv_size=recv_size)
    addr = lis.get_local_address()
    assert isinstance(addr, InetSocketAddress)
    raw = socket.create_connection((addr.host, addr.port))
    dst = await lis.accept()
    dst.transport.pauseProducing()  # before the reactor ever reads it
    return lis, raw, dst


async def test_full_recv_reads_a_burst_in_one_turn(reactor: Any) -> None:
    lis, raw, dst = await paused_raw_pair(reactor, recv_size=4096)
    calls: list[int] = []
    real = dst._data_received

    def counting(data: bytes) -> None:
        calls.append(len(data))  # before: the reader resumes inside this call
        real(data)

    try:
        dst._data_received = counting
        raw.sendall(b"b" * 65536)
        await kernel_queue(reactor, dst, 65536, closed=False)
        dst.transport.resumeProducing()
        assert await dst.read_all(65536) == b"b" * 65536
        assert calls == [4096], "Twisted's one 4 KiB recv was followed by a burst of the rest"
        raw.close()
        assert await dst.read(1) == b""
    finally:
        raw.close()
        await close_all(dst, lis)


async def test_reset_during_a_burst_keeps_the_error(reactor: Any) -> None:
    """ECONNRESET met by a burst read is reported, not mistaken for a clean EOF."""
    lis, raw, dst = await paused_raw_pair(reactor, recv_size=4096)
    try:
        raw.sendall(b"r" * 65536)  # 16 full chunks: the burst reads on into the RST
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        raw.close()
        await kernel_queue(reactor, dst, 65536, closed=True)
        dst.transport.resumeProducing()
        assert await dst.read_all(65536) == b"r" * 65536, "data before the reset is delivered"
        with pytest.raises(ChannelError) as exc:
            await dst.read(1)
        assert str(exc.value) == "Unable to read from socket: Connection reset by peer"
    finally:
        raw.close()
        await close_all(dst, lis)


# ---- listening -----------------------------------------------------------------------------------


async def test_listener_watch_reports_pending_client(reactor: Any) -> None:
    lis = SocketChannel.listen("127.0.0.1:0", 4)
    fired: Deferred[Condition] = Deferred()

    def on_in(ch: Channel, cond: Condition, data: Any) -> bool:
        fired.callback(cond)
        return False

    lis.add_watch(Condition.IN | Condition.HUP, on_in)
    assert lis.condition() == Condition(0)
    src = await SocketChannel.connect(lis.get_local_address()).deferred
    assert await fired == Condition.IN
    dst = lis.accept_nowait()
    assert isinstance(dst, SocketChannel)
    assert lis.accept_nowait() is WOULD_BLOCK
    assert dst.get_remote_address() == src.get_local_address()
    await close_all(src, dst, lis)


async def test_accept_waiters_are_served_in_order_and_can_cancel(reactor: Any) -> None:
    lis = SocketChannel.listen("127.0.0.1:0", 4)
    first, cancelled, second = lis.accept(), lis.accept(), lis.accept()
    cancelled.cancel()
    with pytest.raises(CancelledError):
        await cancelled
    c1 = await SocketChannel.connect(lis.get_local_address()).deferred
    s1 = await first
    c2 = await SocketChannel.connect(lis.get_local_address()).deferred
    s2 = await second
    assert s1.get_remote_address() == c1.get_local_address()
    assert s2.get_remote_address() == c2.get_local_address()
    await close_all(c1, c2, s1, s2, lis)


async def test_close_listener_fails_waiters_and_drops_pending(reactor: Any) -> None:
    lis = SocketChannel.listen("127.0.0.1:0", 4)
    src = await SocketChannel.connect(lis.get_local_address()).deferred
    await lis.wait(Condition.IN)  # one client accepted from the kernel, not yet taken
    waiter = lis.wait(Condition.OUT)
    await lis.close()
    with pytest.raises(ChannelClosedError):
        await waiter
    with pytest.raises(ChannelClosedError):
        await lis.accept()
    assert await src.read(1) == b"", "the untaken client was closed"
    await src.close()


async def test_listener_refuses_data_io(reactor: Any) -> None:
    lis = SocketChannel.listen("127.0.0.1:0")
    with pytest.raises(ChannelError, match="not connected"):
        lis.read_nowait(1)
    with pytest.raises(ChannelError, match="not connected"):
        await lis.write_all(b"x")
    await lis.close()


# ---- connect / listen tasks ----------------------------------------------------------------------


async def test_connect_task_contract(reactor: Any) -> None:
    lis = SocketChannel.listen("127.0.0.1:0")
    seen: dict[str, Any] = {}

    def done(task: Task[SocketChannel], opaque: Any) -> None:
        seen["thread"] = threading.get_ident()
        seen["opaque"] = opaque
        seen["error"] = task.propagate_error()
        src = task.get_source()
        assert isinstance(src, SocketChannel)
        seen["connected"] = src.connected

    t = SocketChannel.connect(lis.get_local_address(), func=done, opaque="op")
    assert isinstance(t.source, SocketChannel) and not t.source.connected
    src = await t.deferred
    assert src is t.source
    assert seen == {
        "thread": threading.get_ident(),
        "opaque": "op",
        "error": None,
        "connected": True,
    }
    assert src.has_feature(Feature.READ_MSG_PEEK)
    dst = await lis.accept()
    await close_all(src, dst, lis)


async def test_connect_refused(reactor: Any) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    with pytest.raises(ChannelError) as exc:
        await SocketChannel.connect(f"127.0.0.1:{port}").deferred
    assert str(exc.value) == f"Failed to connect to '127.0.0.1:{port}': Connection refused"


async def test_connect_unix_missing(reactor: Any, tmp_path: Path) -> None:
    path = tmp_path / "nobody.sock"
    with pytest.raises(ChannelError, match=f"^Failed to connect to '{path}': No such file"):
        await SocketChannel.connect(f"unix:{path}").deferred


async def test_listen_async_failure(reactor: Any, tmp_path: Path) -> None:
    path = tmp_path / "missing-dir" / SOCK_NAME
    with pytest.raises(ChannelError, match=r"^Failed to bind socket to .*No such file"):
        await SocketChannel.listen_async(f"unix:{path}").deferred


async def test_cancelled_connect_leaves_nothing_behind(reactor: Any) -> None:
    lis = SocketChannel.listen("127.0.0.1:0", 4)
    t = SocketChannel.connect(lis.get_local_address())
    t.cancel()
    with pytest.raises(Exception, match="cancelled"):
        await t.deferred
    source = t.source
    assert isinstance(source, SocketChannel) and not source.connected
    await lis.close()


# ---- addresses -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tcp:127.0.0.1:5000", InetSocketAddress("127.0.0.1", 5000)),
        ("127.0.0.1:0", InetSocketAddress("127.0.0.1", 0)),
        ("localhost:80", InetSocketAddress("localhost", 80)),
        ("[::1]:4444", InetSocketAddress("::1", 4444)),
        ("tcp:[::]:1", InetSocketAddress("::", 1)),
        (":1234", InetSocketAddress("", 1234)),
        ("127.0.0.1:7,ipv4=on", InetSocketAddress("127.0.0.1", 7, ipv4=True)),
        ("h:7,ipv6=off", InetSocketAddress("h", 7, ipv6=False)),
        ("unix:/run/qemu.sock", UnixSocketAddress("/run/qemu.sock")),
        ("unix:rel/x:y.sock", UnixSocketAddress("rel/x:y.sock")),
        ("fd:3", FdSocketAddress(3)),
        (("127.0.0.1", 9), InetSocketAddress("127.0.0.1", 9)),
        (Path("/tmp/a.sock"), UnixSocketAddress("/tmp/a.sock")),
        (5, FdSocketAddress(5)),
    ],
)
def test_parse_address(text: Any, expected: SocketAddress) -> None:
    assert parse_address(text) == expected
    assert parse_address(str(expected)) == expected, "str() round-trips"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("127.0.0.1", "missing ':PORT'"),
        ("127.0.0.1:http", "error parsing port"),
        ("127.0.0.1:70000", "out of range"),
        ("[::1:80", "error parsing IPv6 address"),
        ("::1:80", "brackets"),
        ("unix:", "empty UNIX socket path"),
        ("fd:name", "fd must be a number"),
        ("h:1,keep-alive=on", "unsupported option 'keep-alive'"),
        ("h:1,ipv4=off,ipv6=off", "Cannot disable IPv4 and IPv6"),
        ("vsock:2:1234", "vsock is not supported"),
    ],
)
def test_parse_address_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_address(text)


def test_inet_families() -> None:
    assert InetSocketAddress("h", 1).families == (socket.AF_INET6, socket.AF_INET)
    assert InetSocketAddress("h", 1, ipv4=True).families == (socket.AF_INET,)
    assert InetSocketAddress("h", 1, ipv6=False).families == (socket.AF_INET,)
    assert InetSocketAddress("h", 1, ipv6=True).families == (socket.AF_INET6,)
