"""WebsockChannel: QEMU's QIOChannelWebsock (server side) on a pipe and on real sockets.

Two layers, as everywhere in this project:

* fast tests over an in-memory :func:`pipe_pair`, whose client end is driven
  by the ``websockets`` package's sans-IO ``ClientProtocol`` (a reference
  implementation nobody here wrote) or by hand-made frames where the point
  is an invalid one;
* interop over real loopback sockets against the ``websockets`` sync client,
  run in a thread while our server runs in the reactor, plain and over
  :class:`TLSChannel`.
"""

from __future__ import annotations

import os
import ssl
import threading
from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK, InvalidStatus
from websockets.frames import Frame
from websockets.frames import Opcode as WsOpcode
from websockets.http11 import Response
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from qiotwisted.channel import (
    WOULD_BLOCK,
    Channel,
    Condition,
    Feature,
    Shutdown,
    SocketChannel,
    port_of,
)
from qiotwisted.channel._wsproto import MAX_HANDSHAKE_SIZE, Opcode, encode_frame
from qiotwisted.channel.pipe import PipeChannel, pipe_pair
from qiotwisted.channel.websock import (
    HandshakeError,
    WebsockChannel,
    WebsockProtocolError,
)
from qiotwisted.errors import ChannelClosedError, ChannelError, TaskCancelledError
from qiotwisted.task import Task
from tests.channel_helpers import CHUNK, NCHUNKS, TOTAL, ChannelTest
from tests.pki import TestPKI, pki_fixture  # noqa: F401  (the "pki" fixture)

MASK = b"\x01\x02\x03\x04"
# Generous for a sync client's blocking calls: they must end even if the server is broken.
CLIENT_TIMEOUT = 8.0


# ---- a reference client on a pipe ------------------------------------------------------------


class PipeClient:
    """The far end of a pipe, speaking websocket through ``websockets``' sans-IO client."""

    def __init__(self, end: PipeChannel, path: str = "/") -> None:
        self.end = end
        self.proto = ClientProtocol(
            parse_uri(f"ws://localhost{path}"), subprotocols=[Subprotocol("binary")], max_size=None
        )
        self.response: Response | None = None
        self.frames: list[Frame] = []
        self.eof = False

    async def send_request(self) -> None:
        self.proto.send_request(self.proto.connect())
        await self.flush()

    async def flush(self) -> None:
        peer = self.end.peer
        if self.end.closed or peer is None or peer.closed:
            self.proto.data_to_send()  # nobody left to send it to
            return
        for data in self.proto.data_to_send():
            if data:
                await self.end.write_all(data)
            elif not self.end.closed:
                self.end.shutdown(Shutdown.WRITE)  # websockets' "half-close now"

    async def receive(self, until: Callable[[PipeClient], bool], *, reply: bool = True) -> None:
        """Read and parse until *until* holds (or EOF).

        With *reply*, the reference client's automatic replies (pong, close) are sent.
        """
        for _ in range(10_000):
            if until(self) or self.eof:
                return
            data = await self.end.read(1 << 20)
            if data:
                self.proto.receive_data(data)
            else:
                self.eof = True
                self.proto.receive_eof()
            for ev in self.proto.events_received():
                if isinstance(ev, Response):
                    self.response = ev
                elif isinstance(ev, Frame):
                    self.frames.append(ev)
            if reply:
                await self.flush()
        raise AssertionError("receive() did not finish")

    async def upgrade(self) -> None:
        await self.send_request()
        await self.receive(lambda c: c.response is not None)
        assert self.proto.handshake_exc is None, self.proto.handshake_exc

    def data(self) -> bytes:
        return b"".join(bytes(f.data) for f in self.frames if f.opcode == WsOpcode.BINARY)

    def of(self, opcode: WsOpcode) -> list[Frame]:
        return [f for f in self.frames if f.opcode == opcode]


async def pipe_server(**kw: Any) -> tuple[PipeClient, WebsockChannel]:
    """A websocket over a pipe, handshake done."""
    a, b = pipe_pair(capacity=kw.pop("capacity", 1 << 20))
    client = PipeClient(a)
    ws = WebsockChannel.new_server(b, **kw)
    hs = ws.handshake()
    await client.upgrade()
    assert await hs.deferred is ws
    return client, ws


async def finish(client: PipeClient, ws: WebsockChannel) -> None:
    """Close the server end while the client answers its close frame, as a peer would."""
    closing = ws.close()
    await client.receive(lambda c: False)  # until EOF
    await closing
    await client.end.close()


def raw_request(path: str = "/", extra: str = "") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Sec-WebSocket-Version: 13\r\n{extra}\r\n"
    ).encode()


# ---- handshake ---------------------------------------------------------------------------------


async def test_handshake_is_a_task_completed_in_the_reactor_thread(reactor: Any) -> None:
    a, b = pipe_pair()
    client = PipeClient(a)
    await client.send_request()  # the whole request is there before handshake() runs
    ws = WebsockChannel.new_server(b)
    calls: list[tuple[Any, ...]] = []
    reactor_thread = threading.get_ident()

    def done(t: Task[WebsockChannel], opaque: Any) -> None:
        calls.append(("func", t, opaque, threading.get_ident(), t.has_error))

    hs = ws.handshake(done, "opaque", lambda o: calls.append(("destroy", o)))
    assert calls == [], "completion never runs inside handshake()"
    with pytest.raises(ChannelError, match="already started"):
        ws.handshake()
    assert await hs.deferred is ws
    assert calls == [("func", hs, "opaque", reactor_thread, False)]
    assert hs.source is ws
    await client.receive(lambda c: c.response is not None)
    assert client.proto.handshake_exc is None  # the reference client checked the accept key
    assert client.response is not None and client.response.status_code == 101
    assert ws.subprotocol == "binary"
    assert ws.request is not None and ws.request.header("host") == "localhost"
    await task.deferLater(reactor, 0)
    assert calls[1:] == [("destroy", "opaque")]
    await finish(client, ws)


@pytest.mark.parametrize(
    "request_bytes,status",
    [
        (raw_request("/nowhere"), 404),
        (raw_request().replace(b"GET", b"POST"), 400),
        (raw_request().replace(b"HTTP/1.1", b"HTTP/1.0"), 400),
        (raw_request().replace(b"Version: 13", b"Version: 7"), 400),
        (raw_request(extra="Sec-WebSocket-Protocol: chat\r\n"), 400),
        (raw_request().replace(b"Upgrade\r\n", b"keep-alive\r\n"), 400),
        (b"GET / HTTP/1.1\r\nX-Big: " + b"x" * MAX_HANDSHAKE_SIZE, 403),
    ],
)
async def test_rejection_is_sent_before_the_task_fails(
    reactor: Any, request_bytes: bytes, status: int
) -> None:
    a, b = pipe_pair()
    ws = WebsockChannel.new_server(b)
    seen: list[bytes] = []

    def done(t: Task[WebsockChannel], _: Any) -> None:
        # The response is already in the client's pipe when the task completes.
        got = a.read_nowait(1 << 16)
        assert isinstance(got, bytes)
        seen.append(got)

    hs = ws.handshake(done)
    await a.write_all(request_bytes)
    with pytest.raises(HandshakeError) as info:
        await hs.deferred
    assert info.value.status == status
    assert seen and seen[0].startswith(f"HTTP/1.1 {status} ".encode())
    assert seen[0] == info.value.response
    assert ws.condition() & Condition.ERR
    with pytest.raises(HandshakeError):
        await ws.read(10)
    with pytest.raises(HandshakeError):
        await ws.write(b"x")
    await ws.close()
    await a.close()


async def test_eof_before_the_end_of_headers(reactor: Any) -> None:
    a, b = pipe_pair()
    ws = WebsockChannel.new_server(b)
    hs = ws.handshake()
    await a.write_all(raw_request()[:-2])
    a.shutdown(Shutdown.WRITE)
    with pytest.raises(HandshakeError, match="End of headers not found before connection closed"):
        await hs.deferred
    assert a.read_nowait(100) is WOULD_BLOCK, "no response"
    await ws.close()
    await a.close()


async def test_close_during_the_handshake_fails_the_task(reactor: Any) -> None:
    a, b = pipe_pair()
    ws = WebsockChannel.new_server(b)
    hs = ws.handshake()
    await a.write_all(raw_request()[:20])
    await task.deferLater(reactor, 0.01)
    await ws.close()
    with pytest.raises(ChannelClosedError):
        await hs.deferred
    assert b.closed
    await a.close()


async def test_cancelling_the_handshake_stops_it(reactor: Any) -> None:
    a, b = pipe_pair()
    ws = WebsockChannel.new_server(b)
    hs = ws.handshake()
    hs.cancel()
    with pytest.raises(TaskCancelledError):
        await hs.deferred
    await a.write_all(raw_request())
    await task.deferLater(reactor, 0.01)
    assert a.condition() & Condition.IN == 0, "nothing was answered"
    with pytest.raises(ChannelError, match="cancelled"):
        await ws.read(1)
    await ws.close()
    await a.close()


async def test_frames_sent_right_behind_the_request_are_kept(reactor: Any) -> None:
    a, b = pipe_pair()
    await a.write_all(raw_request() + encode_frame(Opcode.BINARY, b"eager", mask=MASK))
    ws = WebsockChannel.new_server(b, close_timeout=0)
    with pytest.raises(ChannelError, match="has not been started"):
        await ws.read(5)
    with pytest.raises(ChannelError, match="has not been started"):
        await ws.write(b"x")
    hs = ws.handshake()
    early = ws.read(5)  # waits for the handshake
    assert not early.called
    await hs.deferred
    assert await early == b"eager"
    await ws.close()
    await a.close()


async def test_features_and_control_go_to_the_master(reactor: Any) -> None:
    client, ws = await pipe_server()
    assert ws.has_feature(Feature.SHUTDOWN)
    assert ws.master is client.end.peer
    ws.set_delay(False)  # the pipe ignores the hints; they must not raise
    ws.set_cork(True)
    ws.shutdown(Shutdown.WRITE)
    assert await client.end.read(10) == b"", "the master's write side was shut"
    await finish(client, ws)


# ---- data ----------------------------------------------------------------------------------------


async def test_reads_cross_frame_boundaries(reactor: Any) -> None:
    client, ws = await pipe_server()
    for piece in (b"ab", b"cde", b"", b"fghij"):
        client.proto.send_binary(piece)
    client.proto.send_binary(b"k" * 100)
    await client.flush()
    assert await ws.read_all(10) == b"abcdefghij"
    assert await ws.read(30) == b"k" * 30
    assert await ws.read(1000) == b"k" * 70
    assert ws.buffered == 0
    await finish(client, ws)


async def test_fragmented_message_with_a_ping_inside(reactor: Any) -> None:
    client, ws = await pipe_server()
    client.proto.send_binary(b"frag-1|", fin=False)
    client.proto.send_ping(b"in the middle")
    client.proto.send_continuation(b"frag-2|", fin=False)
    client.proto.send_continuation(b"frag-3", fin=True)
    await client.flush()
    assert await ws.read_all(20) == b"frag-1|frag-2|frag-3"
    await client.receive(lambda c: bool(c.of(WsOpcode.PONG)))
    assert [bytes(f.data) for f in client.of(WsOpcode.PONG)] == [b"in the middle"]
    await finish(client, ws)


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
async def test_writes_become_bounded_binary_frames(reactor: Any, kind: type) -> None:
    client, ws = await pipe_server(frame_size=1000)
    payload = os.urandom(2500)
    await ws.write_all(kind(payload))
    await ws.writev_all([b"x" * 10, bytearray(b"y" * 995)])
    await client.receive(lambda c: len(c.data()) >= 3505)
    # websockets refuses masked server frames, so these were unmasked.
    frames = client.of(WsOpcode.BINARY)
    assert [len(f.data) for f in frames] == [1000, 1000, 500, 1000, 5]
    assert all(f.fin for f in frames)
    assert client.data() == payload + b"x" * 10 + b"y" * 995
    await finish(client, ws)


async def test_ping_gets_its_payload_back_and_pong_is_ignored(reactor: Any) -> None:
    client, ws = await pipe_server()
    client.proto.send_pong(b"unsolicited")
    client.proto.send_ping(b"\x00\xffping")
    client.proto.send_binary(b"after")
    await client.flush()
    assert await ws.read_all(5) == b"after"
    await client.receive(lambda c: bool(c.of(WsOpcode.PONG)))
    assert [bytes(f.data) for f in client.of(WsOpcode.PONG)] == [b"\x00\xffping"]
    await finish(client, ws)


async def test_ping_flood_from_a_peer_that_never_reads_stays_bounded(reactor: Any) -> None:
    client, ws = await pipe_server(capacity=4096)
    for i in range(300):
        client.proto.send_ping(bytes([i % 256]) * 100)
    client.proto.send_binary(b"end")
    await client.flush()
    assert await ws.read_all(3) == b"end"
    # The pipe toward the client holds 4096 bytes; at most one pong waits beyond it.
    assert ws.output_pending <= 102
    await client.receive(lambda c: c.end.condition() & Condition.IN == 0)
    pongs = client.of(WsOpcode.PONG)
    assert 1 <= len(pongs) < 300
    assert all(len(f.data) == 100 for f in pongs)
    await finish(client, ws)


# ---- close ---------------------------------------------------------------------------------------


async def test_client_close_is_echoed_then_reads_see_eof(reactor: Any) -> None:
    client, ws = await pipe_server()
    client.proto.send_binary(b"last words")
    client.proto.send_close(1001, "going away")
    await client.flush()
    assert await ws.read_all(10) == b"last words"
    assert await ws.read(10) == b""
    assert ws.close_code == 1001 and ws.close_reason == "going away"
    cond = await ws.wait(Condition.IN)
    assert cond & Condition.HUP
    with pytest.raises(ChannelError, match="Broken pipe"):
        await ws.write(b"too late")
    await client.receive(lambda c: bool(c.of(WsOpcode.CLOSE)))
    assert client.proto.close_rcvd is not None and client.proto.close_rcvd.code == 1001
    await ws.close()
    await client.receive(lambda c: False)  # until EOF: we closed the transport
    assert client.eof
    await client.end.close()


async def test_server_close_sends_1000_and_waits_for_the_reply(reactor: Any) -> None:
    client, ws = await pipe_server()
    closing = ws.close()
    await client.receive(lambda c: bool(c.of(WsOpcode.CLOSE)))
    assert client.proto.close_rcvd is not None and client.proto.close_rcvd.code == 1000
    assert not closing.called, "close waits for the peer's close frame"
    assert not ws.master.closed
    await client.flush()  # the reference client's automatic reply
    await closing
    assert ws.close_code == 1000
    assert ws.master.closed
    await client.receive(lambda c: False)
    assert client.eof
    await client.end.close()


async def test_server_close_gives_up_on_a_silent_peer(reactor: Any) -> None:
    client, ws = await pipe_server(close_timeout=0.05)
    await ws.close()  # nobody answers; the timeout ends the wait
    assert ws.master.closed and ws.close_code is None
    await client.receive(lambda c: False, reply=False)
    assert client.proto.close_rcvd is not None and client.proto.close_rcvd.code == 1000
    await client.end.close()


async def test_close_is_idempotent_and_fails_waiters(reactor: Any) -> None:
    client, ws = await pipe_server(close_timeout=0)
    reader = ws.read(10)
    first, second = ws.close(), ws.close()
    with pytest.raises(ChannelClosedError):
        await reader
    await first
    await second
    await client.end.close()


# ---- protocol errors and EOF ---------------------------------------------------------------------


async def test_unmasked_frame_is_refused_with_1002(reactor: Any) -> None:
    client, ws = await pipe_server()
    await client.end.write_all(
        encode_frame(Opcode.BINARY, b"ok", mask=MASK) + encode_frame(Opcode.BINARY, b"bad")
    )
    assert await ws.read_all(2) == b"ok", "bytes before the violation are delivered"
    with pytest.raises(WebsockProtocolError, match="client websocket frames must be masked"):
        await ws.read(10)
    assert ws.condition() & Condition.ERR
    with pytest.raises(WebsockProtocolError):
        await ws.write(b"x")
    await client.receive(lambda c: c.eof or client.proto.close_rcvd is not None)
    assert client.proto.close_rcvd is not None
    assert client.proto.close_rcvd.code == 1002
    assert client.proto.close_rcvd.reason == "client frames must be masked"
    await finish(client, ws)


async def test_text_frame_is_refused_with_1003_as_qemu_does(reactor: Any) -> None:
    client, ws = await pipe_server()
    client.proto.send_text(b"hello")
    await client.flush()
    with pytest.raises(WebsockProtocolError, match="unsupported opcode") as info:
        await ws.read(10)
    assert info.value.code == 1003
    await client.receive(lambda c: client.proto.close_rcvd is not None)
    assert client.proto.close_rcvd is not None and client.proto.close_rcvd.code == 1003
    await finish(client, ws)


async def test_eof_inside_a_frame_is_an_error(reactor: Any) -> None:
    client, ws = await pipe_server()
    await client.end.write_all(encode_frame(Opcode.BINARY, b"abcdef", mask=MASK)[:9])
    client.end.shutdown(Shutdown.WRITE)
    assert await ws.read_all(3) == b"abc"
    with pytest.raises(WebsockProtocolError, match="end-of-file in the middle"):
        await ws.read(10)
    await finish(client, ws)


async def test_eof_between_frames_is_eof(reactor: Any) -> None:
    client, ws = await pipe_server()
    client.proto.send_binary(b"bye")
    await client.flush()
    client.end.shutdown(Shutdown.WRITE)
    assert await ws.read_all_eof(3) == b"bye"
    assert await ws.read_all_eof(3) == b""
    with pytest.raises(ChannelError, match="Broken pipe"):
        await ws.write(b"x")
    await finish(client, ws)


# ---- readiness and backpressure ------------------------------------------------------------------


async def test_wait_and_watches_see_decoded_bytes_already_buffered(reactor: Any) -> None:
    client, ws = await pipe_server()
    assert await ws.wait(Condition.OUT) & Condition.OUT
    pending = ws.wait(Condition.IN)
    assert not pending.called
    client.proto.send_binary(b"0123456789")
    await client.flush()
    assert await pending & Condition.IN
    assert await ws.read(4) == b"0123"
    # The master has nothing left to read: only our decoded buffer says IN.
    assert client.end.peer is not None and client.end.peer.condition() & Condition.IN == 0
    assert ws.wait(Condition.IN).called
    seen: list[Condition] = []
    fired: Deferred[None] = Deferred()

    def watch(ch: Channel, cond: Condition, data: Any) -> bool:
        seen.append(cond)
        fired.callback(None)
        return False

    ws.add_watch(Condition.IN | Condition.HUP, watch)
    await fired
    assert seen == [Condition.IN]
    assert await ws.read(100) == b"456789"
    later = ws.wait(Condition.IN)
    await task.deferLater(reactor, 0.01)
    assert not later.called, "nothing buffered, nothing arrived"
    later.cancel()
    await finish(client, ws)


@pytest.mark.timeout_s(30)
async def test_a_reader_that_does_not_read_holds_the_peer_back(reactor: Any) -> None:
    high = 64 * 1024
    client, ws = await pipe_server(capacity=64 * 1024, high_water=high)
    total, sent = 8 * 1024 * 1024, 0
    payload = bytes(range(256)) * 256  # 64 KiB frames

    async def produce() -> None:
        nonlocal sent
        for _ in range(total // len(payload)):
            client.proto.send_binary(payload)
            await client.flush()
            sent += len(payload)

    producer = Deferred.fromCoroutine(produce())
    last, still = -1, 0
    for _ in range(500):
        await task.deferLater(reactor, 0.002)
        still = still + 1 if sent == last else 0
        last = sent
        if still >= 10:
            break
    assert still >= 10, "the producer never stalled"
    assert not producer.called
    assert ws.buffered <= high + 256 * 1024, "read ahead stops at the high-water mark"
    assert sent < total // 4
    # Byte p of the stream is p % 256; a read may span frames.
    pattern = bytes(range(256)) * (100_000 // 256 + 2)
    got = 0
    for _ in range(100_000):
        data = await ws.read(100_000)
        assert data == pattern[got % 256 : got % 256 + len(data)]
        got += len(data)
        assert ws.buffered <= high + 256 * 1024
        if got == total:
            break
    await producer
    await finish(client, ws)


@pytest.mark.timeout_s(30)
async def test_a_peer_that_does_not_read_holds_the_writer_back(reactor: Any) -> None:
    client, ws = await pipe_server(capacity=64 * 1024, write_buffer=128 * 1024)
    payload = os.urandom(4 * 1024 * 1024)
    writer = ws.write_all(payload)
    await task.deferLater(reactor, 0.02)
    assert not writer.called
    assert ws.output_pending <= 128 * 1024 + 64 * 1024 + 14, "bounded by write_buffer"
    await client.receive(lambda c: len(c.data()) >= len(payload))
    await writer
    assert client.data() == payload
    await finish(client, ws)


# ---- interop: the websockets sync client over real sockets ---------------------------------------


def in_thread(reactor: Any, fn: Callable[[], Any]) -> tuple[threading.Thread, Deferred[Any]]:
    """Run *fn* in a new thread; the Deferred fires in the reactor thread with its outcome."""
    d: Deferred[Any] = Deferred()

    def run() -> None:
        try:
            result = fn()
        except BaseException:
            f = Failure()
            reactor.callFromThread(d.errback, f)
        else:
            reactor.callFromThread(d.callback, result)

    t = threading.Thread(target=run, name="websockets-client", daemon=True)
    t.start()
    return t, d


async def joined(reactor: Any, t: threading.Thread) -> None:
    """Wait for the client thread without blocking the reactor it may still need."""
    for _ in range(int(CLIENT_TIMEOUT / 0.01) + 100):
        if not t.is_alive():
            return
        await task.deferLater(reactor, 0.01)
    raise AssertionError("the client thread did not finish")


def ws_connect(port: int, path: str = "/", **kw: Any) -> ClientConnection:
    kw.setdefault("subprotocols", ["binary"])
    return connect(
        f"{kw.pop('scheme', 'ws')}://localhost:{port}{path}",
        proxy=None,
        compression=None,
        ping_interval=None,
        open_timeout=CLIENT_TIMEOUT,
        close_timeout=CLIENT_TIMEOUT,
        max_size=None,
        **kw,
    )


class Server:
    """A listening socket; ``await accept()`` gives a WebsockChannel, handshake done."""

    def __init__(self, **ws_kw: Any) -> None:
        self.lis = SocketChannel.listen("127.0.0.1:0")
        self.port = port_of(self.lis.get_local_address())
        self.ws_kw = ws_kw

    async def accept(self) -> WebsockChannel:
        sock = await self.lis.accept()
        ws = WebsockChannel.new_server(sock, **self.ws_kw)
        await ws.handshake().deferred
        return ws

    async def close(self) -> None:
        await self.lis.close()


async def run_client(
    reactor: Any, server: Server, client: Callable[[], Any], serve: Callable[[WebsockChannel], Any]
) -> Any:
    """Run *client* in a thread against *server*; *serve* gets the channel in the reactor."""
    t, done = in_thread(reactor, client)
    try:
        ws = await server.accept()
        try:
            await serve(ws)
        finally:
            await ws.close()
        return await done
    finally:
        await server.close()
        await joined(reactor, t)


@pytest.mark.timeout_s(30)
async def test_interop_binary_round_trip_of_1_mib(reactor: Any) -> None:
    """QEMU's 1 MiB test pattern up as one 64-bit-length frame, back as 64 KiB frames."""
    pattern = ChannelTest()
    server = Server()

    def client() -> tuple[bytes, list[int]]:
        with ws_connect(server.port) as ws:
            ws.send(pattern.input)
            got, sizes = bytearray(), []
            while len(got) < TOTAL:
                msg = ws.recv(timeout=CLIENT_TIMEOUT)
                assert isinstance(msg, bytes)
                sizes.append(len(msg))
                got += msg
            return bytes(got), sizes

    async def serve(ws: WebsockChannel) -> None:
        assert ws.subprotocol == "binary"
        await ws.readv_all(pattern.outputv)
        pattern.validate()
        await ws.writev_all(pattern.inputv)

    echoed, sizes = await run_client(reactor, server, client, serve)
    assert echoed == pattern.input
    assert len(pattern.inputv) == NCHUNKS and len(pattern.inputv[0]) == CHUNK
    # Frames are at most 64 KiB: websockets hands us one message per frame.
    assert max(sizes) == 64 * 1024 and len(sizes) >= -(-TOTAL // (64 * 1024))


async def test_interop_fragmented_message(reactor: Any) -> None:
    server = Server()
    parts = [os.urandom(n) for n in (1, 125, 126, 70_000, 3)]

    def client() -> bytes:
        with ws_connect(server.port) as ws:
            ws.send(iter(parts))  # websockets' fragment API: one frame per item
            reply = ws.recv(timeout=CLIENT_TIMEOUT)
            assert isinstance(reply, bytes)
            return reply

    async def serve(ws: WebsockChannel) -> None:
        data = await ws.read_all(sum(map(len, parts)))
        assert data == b"".join(parts)
        await ws.write_all(b"got %d" % len(data))

    assert await run_client(reactor, server, client, serve) == b"got 70255"


async def test_interop_ping_pong(reactor: Any) -> None:
    server = Server()

    def client() -> tuple[bool, bool]:
        with ws_connect(server.port) as ws:
            first = ws.ping(b"payload \x00\xff").wait(CLIENT_TIMEOUT)
            second = ws.ping().wait(CLIENT_TIMEOUT)  # random 4-byte payload
            ws.send(b"done")
            return first, second

    async def serve(ws: WebsockChannel) -> None:
        assert await ws.read_all(4) == b"done"

    # websockets sets the event only for a pong carrying the ping's payload.
    assert await run_client(reactor, server, client, serve) == (True, True)


async def test_interop_client_initiated_close(reactor: Any) -> None:
    server = Server()

    def client() -> tuple[Any, Any]:
        with ws_connect(server.port) as ws:
            ws.send(b"hello")
            ws.close(1000, "client done")
            return ws.protocol.close_rcvd, ws.protocol.close_exc

    async def serve(ws: WebsockChannel) -> None:
        assert await ws.read_all(5) == b"hello"
        assert await ws.read(10) == b""
        assert ws.close_code == 1000 and ws.close_reason == "client done"

    rcvd, exc = await run_client(reactor, server, client, serve)
    assert rcvd is not None and rcvd.code == 1000, "we echoed the status"
    assert isinstance(exc, ConnectionClosedOK)


async def test_interop_server_initiated_close(reactor: Any) -> None:
    server = Server()
    closed: list[WebsockChannel] = []

    def client() -> Any:
        with ws_connect(server.port) as ws:
            try:
                ws.recv(timeout=CLIENT_TIMEOUT)
            except ConnectionClosedOK as e:
                return e
        raise AssertionError("recv() returned instead of raising ConnectionClosedOK")

    async def serve(ws: WebsockChannel) -> None:
        await ws.close()  # sends 1000, waits for the client's close frame
        closed.append(ws)

    exc = await run_client(reactor, server, client, serve)
    assert exc.rcvd is not None and exc.rcvd.code == 1000
    assert exc.sent is not None and exc.sent.code == 1000
    assert closed and closed[0].close_code == 1000, "the client's reply arrived before we closed"


async def test_interop_handshake_refused_with_404(reactor: Any) -> None:
    server = Server()

    def client() -> Any:
        try:
            ws_connect(server.port, "/elsewhere")
        except InvalidStatus as e:
            return e.response.status_code
        raise AssertionError("the connection was accepted")

    t, done = in_thread(reactor, client)
    sock = await server.lis.accept()
    ws = WebsockChannel.new_server(sock)
    with pytest.raises(HandshakeError, match="Unexpected HTTP path /elsewhere"):
        await ws.handshake().deferred
    await ws.close()
    assert await done == 404
    await server.close()
    await joined(reactor, t)


async def test_interop_text_frame_is_refused_with_1003(reactor: Any) -> None:
    server = Server()

    def client() -> Any:
        with ws_connect(server.port) as ws:
            ws.send("text")
            try:
                ws.recv(timeout=CLIENT_TIMEOUT)
            except ConnectionClosedError as e:
                return e.rcvd
        raise AssertionError("no close")

    async def serve(ws: WebsockChannel) -> None:
        with pytest.raises(WebsockProtocolError, match="unsupported opcode"):
            await ws.read(10)

    rcvd = await run_client(reactor, server, client, serve)
    assert rcvd is not None and rcvd.code == 1003


# ---- interop: websocket over TLS over a socket (a browser's wss://) ------------------------------


@pytest.mark.timeout_s(30)
@pytest.mark.parametrize("client_cert", [False, True], ids=["no-client-cert", "client-cert"])
async def test_interop_websocket_over_tls(reactor: Any, pki: TestPKI, client_cert: bool) -> None:
    """wss:// as a browser does it: websockets + ssl against Websock over TLS over a socket."""
    from qiotwisted.channel.tls import TLSChannel
    from qiotwisted.crypto import TLSCreds

    creds = TLSCreds.load_sync(pki.server_dir, endpoint="server", verify_peer=client_cert)
    lis = SocketChannel.listen("127.0.0.1:0")
    port = port_of(lis.get_local_address())
    context = ssl.create_default_context(cafile=str(pki.server_dir / "ca-cert.pem"))
    if client_cert:
        context.load_cert_chain(
            pki.client_dir / "client-cert.pem", pki.client_dir / "client-key.pem"
        )
    payload = os.urandom(300_000)

    def client() -> tuple[bytes, bool, Any]:
        with ws_connect(port, scheme="wss", ssl=context) as ws:
            ws.send(payload)
            got = bytearray()
            while len(got) < len(payload):
                msg = ws.recv(timeout=CLIENT_TIMEOUT)
                assert isinstance(msg, bytes)
                got += msg
            pong = ws.ping(b"over tls").wait(CLIENT_TIMEOUT)
            ws.send(b"pinged")
            try:
                ws.recv(timeout=CLIENT_TIMEOUT)
            except ConnectionClosedOK as e:
                return bytes(got), pong, e.rcvd
        raise AssertionError("no close from the server")

    t, done = in_thread(reactor, client)
    try:
        sock = await lis.accept()
        tls = TLSChannel.new_server(sock, creds)
        await tls.handshake()
        assert (tls.get_peer_dn() is not None) == client_cert
        ws = WebsockChannel.new_server(tls)
        await ws.handshake().deferred
        assert ws.request is not None and ws.request.header("host") == f"localhost:{port}"
        data = await ws.read_all(len(payload))
        await ws.write_all(data)
        assert await ws.read_all(6) == b"pinged"
        await ws.close()
        assert ws.close_code == 1000, "the client's close frame came back"
        echoed, pong, rcvd = await done
    finally:
        await lis.close()
        await joined(reactor, t)
    assert echoed == payload
    assert pong is True
    assert rcvd is not None and rcvd.code == 1000
