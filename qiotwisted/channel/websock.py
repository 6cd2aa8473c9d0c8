"""WebsockChannel: QEMU's QIOChannelWebsock (server side) over any channel.

A websocket server end layered on a *master* channel (a :class:`SocketChannel`,
a :class:`TLSChannel`, anything with the :class:`Channel` contract).  The
protocol itself lives in the sans-IO :mod:`qiotwisted.channel._wsproto`; this
module only moves bytes between it and the master and schedules.

Life of a channel::

    ws = WebsockChannel.new_server(sock)         # qio_channel_websock_new_server
    await ws.handshake().deferred                  # qio_channel_websock_handshake
    data = await ws.read(65536)                    # payload bytes, frames are invisible
    await ws.write_all(b"...")                     # sent as binary frames
    await ws.close()                               # close frame 1000, then the master

The handshake is a :class:`~qiotwisted.task.Task`: it starts on the next
reactor turn, reads the HTTP upgrade request (QEMU's rules and status codes,
see :mod:`._wsproto`), writes the 101 response, and completes in the reactor
thread with the channel as its result.  A request that fails validation gets
its error response (400, 403 or 404) written first; the Task then fails with
:class:`~qiotwisted.channel._wsproto.HandshakeError`.  Closing the master
after a failure is the caller's job, as in QEMU.

After the handshake the channel is a byte stream: ``read`` returns payload
bytes of binary frames in order, across frame and message boundaries (a read
may join several frames, or return part of one).  Pings are answered with a
pong carrying the same payload (while one pong is still unsent, further pings
are not answered, as QEMU does, so a ping flood cannot grow memory); pongs are
ignored.  A close frame from the peer is answered with a close frame echoing
its status, and reads then return ``b""`` (EOF) once buffered bytes are
consumed; the peer's status is in :attr:`WebsockChannel.close_code`.  A
protocol violation (unmasked frame: 1002, text frame: 1003, ...) sends a close
frame with the matching code, and reads raise
:class:`~qiotwisted.channel._wsproto.WebsockProtocolError` after the bytes
received before it.  Writes after the peer's close or EOF fail with "Broken
pipe", as in QEMU.

Differences from QEMU, on purpose: a peer's close frame is end-of-file, not an
error ("websocket closed by peer"); control frames in the middle of a
fragmented message do not break its reassembly; :meth:`close` waits (up to
*close_timeout*) for the peer's close frame before closing the master, as
RFC 6455 asks, instead of shutting the master at once.

Memory is bounded: the master is read ahead only while fewer than
*high_water* decoded bytes wait to be read (then the master's own
backpressure holds the peer back), frames are decoded as a stream (a 1 GiB
frame needs no 1 GiB buffer), and writes are accepted only while fewer than
*write_buffer* encoded bytes wait for the master.

Thread contract: reactor thread only, like every channel; the handshake's
completion function runs in the reactor thread.
"""

from __future__ import annotations

import enum
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Final

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from ..errors import ChannelClosedError, ChannelError
from ..task import Task, trace_enabled
from ._base import (
    _CONDITIONS,
    WOULD_BLOCK,
    Buffer,
    Channel,
    Condition,
    Feature,
    Shutdown,
    WouldBlock,
)
from ._wsproto import (
    NEED_DATA,
    Accepted,
    Close,
    CloseCode,
    Data,
    EndOfStream,
    HandshakeError,
    Ping,
    Request,
    Role,
    ServerHandshake,
    WebsockConnection,
    WebsockProtocolError,
)

__all__ = [
    "DEFAULT_CLOSE_TIMEOUT",
    "DEFAULT_FRAME_SIZE",
    "DEFAULT_HIGH_WATER",
    "DEFAULT_WRITE_BUFFER",
    "HandshakeError",
    "WebsockChannel",
    "WebsockProtocolError",
]

#: Largest payload of one outgoing frame.  Big enough that the per-frame
#: Python work is noise next to the copy, small enough for any client's
#: message limit (websockets defaults to 1 MiB, browsers have none).
DEFAULT_FRAME_SIZE: Final = 64 * 1024
#: Read ahead from the master while fewer decoded bytes than this are buffered.
DEFAULT_HIGH_WATER: Final = 1024 * 1024
#: Accept writes while fewer encoded bytes than this wait for the master.
DEFAULT_WRITE_BUFFER: Final = 256 * 1024
#: How long :meth:`WebsockChannel.close` waits for the peer's close frame.
DEFAULT_CLOSE_TIMEOUT: Final = 2.0
#: Bytes asked of the master per read once the handshake is done.
_READ_CHUNK: Final = 256 * 1024
#: Rounds of a pump before it yields to the reactor (fairness; each round
#: moves at least one chunk).
_MAX_ROUNDS: Final = 64

_IN, _OUT, _ERR, _HUP = (
    int(c) for c in (Condition.IN, Condition.OUT, Condition.ERR, Condition.HUP)
)


class _Phase(enum.Enum):
    NEW = "new"  # created; handshake() not called yet
    HANDSHAKE = "handshake"  # reading the upgrade request
    REPLYING = "replying"  # request accepted; the 101 is being written
    OPEN = "open"  # websocket stream
    FAILED = "failed"  # the handshake failed or was cancelled


def _as_channel_error(failure: Failure, what: str) -> ChannelError:
    value = failure.value
    if isinstance(value, ChannelError):
        return value
    return ChannelError(f"{what}: {value}")


class WebsockChannel(Channel):
    """The server end of a websocket over *master* (``qio_channel_websock_new_server``).

    The channel owns *master* from now on: it reads and writes it and closes
    it on :meth:`close`.  It has ``SHUTDOWN`` when the master does.

    :param frame_size: largest payload of an outgoing binary frame.
    :param high_water: read ahead from the master while fewer decoded bytes
        than this wait to be read.
    :param write_buffer: accept writes while fewer encoded bytes than this
        wait to go to the master (beyond it, writes wait: backpressure).
    :param close_timeout: seconds :meth:`close` waits for the close frames to
        be written and the peer's close frame (or EOF) to arrive; 0 closes the
        master right after writing ours.
    """

    def __init__(
        self,
        master: Channel,
        *,
        reactor: IReactorTime | None = None,
        name: str | None = None,
        frame_size: int = DEFAULT_FRAME_SIZE,
        high_water: int = DEFAULT_HIGH_WATER,
        write_buffer: int = DEFAULT_WRITE_BUFFER,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
    ) -> None:
        if reactor is None:
            reactor = master._reactor_arg  # share the master's reactor, still resolved late
        super().__init__(reactor=reactor, name=name)
        if frame_size <= 0 or high_water <= 0 or write_buffer <= 0:
            raise ValueError("frame_size, high_water and write_buffer must be positive")
        if close_timeout < 0:
            raise ValueError("close_timeout must not be negative")
        self._master = master
        if master.has_feature(Feature.SHUTDOWN):
            self.features |= Feature.SHUTDOWN
        self._frame_size = frame_size
        self._high_water = high_water
        self._low_water = high_water // 2
        self._write_buffer = write_buffer
        self._close_timeout = close_timeout
        self._phase = _Phase.NEW
        self._hs = ServerHandshake()
        self._conn = WebsockConnection(Role.SERVER)
        self._task: Task[WebsockChannel] | None = None
        self._start_call: Any = None
        self._turn_call: Any = None
        #: The parsed upgrade request, once the handshake accepted it.
        self.request: Request | None = None
        #: ``"binary"`` if the client asked for a subprotocol (it is the only one).
        self.subprotocol: str | None = None
        #: The status code and reason of the peer's close frame, once it came.
        self.close_code: int | None = None
        self.close_reason: str | None = None
        # decoded input
        self._rawin: deque[bytes] = deque()
        self._rawin_bytes = 0
        self._eof = False
        self._error: ChannelError | None = None
        # encoded output
        self._out: deque[bytes] = deque()
        self._out_bytes = 0
        self._out_queued = 0  # totals since creation, to know when a pong has left
        self._out_sent = 0
        self._pong_end = 0
        self._write_error: ChannelError | None = None
        # pumps
        self._reading: Deferred[bytes] | None = None
        self._writing: Deferred[Condition] | None = None
        self._pumping_in = False
        self._pump_in_again = False
        self._pumping_out = False
        self._pump_out_again = False
        self._in_io = False
        self._shut = False
        self._flush_waiters: list[Deferred[None]] = []
        self._end_waiters: list[Deferred[None]] = []
        self._trace("qio_channel_websock_new_server", master=master)

    @classmethod
    def new_server(cls, master: Channel, **kwargs: Any) -> WebsockChannel:
        """``qio_channel_websock_new_server``: the same as calling the class."""
        return cls(master, **kwargs)

    @property
    def master(self) -> Channel:
        return self._master

    @property
    def buffered(self) -> int:
        """Decoded payload bytes received and not yet read (about ``high_water`` at most)."""
        return self._rawin_bytes

    @property
    def output_pending(self) -> int:
        """Encoded bytes (frames, handshake response) not yet taken by the master."""
        return self._out_bytes

    # ---- handshake -----------------------------------------------------------------------

    def handshake(
        self,
        func: Callable[[Task[WebsockChannel], Any], object] | None = None,
        opaque: Any = None,
        destroy: Callable[[Any], object] | None = None,
    ) -> Task[WebsockChannel]:
        """``qio_channel_websock_handshake``: serve the opening handshake as a Task.

        Returns the Task at once; the work starts on the next reactor turn.
        ``func(task, opaque)`` runs in the reactor thread when the handshake
        is over, then ``task.deferred`` fires with this channel, or fails with
        :class:`HandshakeError` (the error response, if any, was written
        first), the master's :class:`ChannelError`, or
        :class:`ChannelClosedError` if the channel is closed first.
        Cancelling the task stops the handshake; the channel is then unusable.
        """
        self._check_open()
        if self._phase is not _Phase.NEW:
            raise ChannelError("Websocket handshake already started")

        def complete(task: Task[WebsockChannel], opaque: Any) -> None:
            if task.cancelled and self._phase is not _Phase.FAILED:
                self._fail(ChannelError("Websocket handshake was cancelled"))
            if func is not None:
                func(task, opaque)

        task: Task[WebsockChannel] = Task(
            self, complete, opaque, destroy, reactor=self._reactor_arg
        )
        self._task = task
        self._phase = _Phase.HANDSHAKE
        self._trace("qio_channel_websock_handshake_start")
        # QEMU starts from a watch, so the completion never runs inside this call.
        self._start_call = self.reactor.callLater(0, self._start_handshake)
        return task

    def _start_handshake(self) -> None:
        self._start_call = None
        self._pump_in()

    def _handshake_input(self, data: bytes) -> None:
        hs = self._hs
        hs.receive_data(data)
        try:
            event = hs.next_event()
        except HandshakeError as e:
            self._trace("qio_channel_websock_handshake_fail", error=str(e))
            self._fail(e)
            if e.response:
                self._queue(e.response)
            self._flushed().addBoth(lambda _: self._complete_task())
            return
        if event is NEED_DATA:
            self._trace("qio_channel_websock_handshake_pending", condition="IN")
            return
        assert isinstance(event, Accepted)
        self.request = event.request
        self.subprotocol = event.subprotocol
        self._phase = _Phase.REPLYING
        self._trace("qio_channel_websock_handshake_reply")
        self._queue(event.response)
        self._flushed().addCallbacks(self._handshake_replied, self._handshake_write_failed)
        if hs.trailing_data:
            # The client did not wait for our 101: its first frames came along.
            self._frame_input(hs.trailing_data)

    def _handshake_replied(self, _: object) -> None:
        task = self._task
        if self._phase is not _Phase.REPLYING or task is None or task.completed:
            return
        self._phase = _Phase.OPEN
        self._trace("qio_channel_websock_handshake_complete")
        task.set_result(self)
        task.complete()
        self._notify()
        self._pump_in()

    def _handshake_write_failed(self, failure: Failure) -> None:
        if self._phase is not _Phase.REPLYING:
            return
        err = _as_channel_error(failure, "Unable to write websocket handshake response")
        self._trace("qio_channel_websock_handshake_fail", error=str(err))
        self._fail(err)
        self._complete_task()

    def _fail(self, error: ChannelError) -> None:
        """The handshake is over without a websocket: stop reading, fail I/O with *error*."""
        self._phase = _Phase.FAILED
        if self._error is None:
            self._error = error
        if self._start_call is not None and self._start_call.active():
            self._start_call.cancel()
        self._start_call = None
        self._cancel_reading()
        self._notify()

    def _complete_task(self) -> None:
        task = self._task
        if task is None or task.completed:
            return
        task.set_error(self._error)
        task.complete()

    # ---- input pump ------------------------------------------------------------------------

    def _want_input(self) -> bool:
        if self._reading is not None or self._shut:
            return False
        phase = self._phase
        if phase is _Phase.HANDSHAKE:
            return self._start_call is None
        if phase is not _Phase.OPEN and phase is not _Phase.REPLYING:
            return False
        if self._eof or self._error is not None:
            return False
        if self._closed:
            return True  # closing: look for the peer's close frame, drop data
        return self._rawin_bytes < self._high_water

    def _pump_in(self) -> None:
        """Keep one read outstanding on the master while input is wanted."""
        if self._pumping_in:
            self._pump_in_again = True
            return
        self._pumping_in = True
        try:
            for _ in range(_MAX_ROUNDS):
                self._pump_in_again = False
                if not self._want_input():
                    return
                size = self._hs.bytes_wanted if self._phase is _Phase.HANDSHAKE else _READ_CHUNK
                d = self._master.read(size)
                self._reading = d
                # Fires at once when the master has data buffered: _on_input
                # then asks for another round instead of recursing.
                d.addCallbacks(self._on_input, self._on_input_error)
                if not self._pump_in_again:
                    return
            self._schedule_turn()
        finally:
            self._pumping_in = False

    def _on_input(self, data: bytes) -> None:
        self._reading = None
        phase = self._phase
        if phase is _Phase.HANDSHAKE:
            self._handshake_input(data)
        elif phase is _Phase.OPEN or phase is _Phase.REPLYING:
            self._frame_input(data)
        self._pump_in()

    def _on_input_error(self, failure: Failure) -> None:
        self._reading = None
        if failure.check(CancelledError) or self._shut:
            return
        err = _as_channel_error(failure, "Unable to read from websocket")
        if self._phase is _Phase.HANDSHAKE:
            self._trace("qio_channel_websock_handshake_fail", error=str(err))
            self._fail(err)
            self._complete_task()
        elif self._error is None:
            self._error = err
            self._input_ended()

    def _cancel_reading(self) -> None:
        d, self._reading = self._reading, None
        if d is not None:
            d.cancel()

    def _frame_input(self, data: bytes) -> None:
        conn = self._conn
        conn.receive_data(data)
        changed = False
        # Terminates: every event consumes buffered bytes, except the single
        # EndOfStream, after which the connection only says NEED_DATA.
        while True:
            try:
                event = conn.next_event()
            except WebsockProtocolError as e:
                self._protocol_error(e)
                return
            if event is NEED_DATA:
                break
            if isinstance(event, Data):
                if event.data and not self._closed:
                    self._rawin.append(event.data)
                    self._rawin_bytes += len(event.data)
                    changed = True
            elif isinstance(event, Ping):
                self._send_pong(event.payload)
            elif isinstance(event, Close):
                self._peer_close(event)
                return
            elif isinstance(event, EndOfStream):
                self._input_ended()
                return
            # Pong: nothing to do (QEMU ignores them too).
        if changed and self._phase is _Phase.OPEN:
            self._notify()

    def _send_pong(self, payload: bytes) -> None:
        if self._conn.close_sent or self._out_sent < self._pong_end:
            return  # QEMU: drop the reply while the previous pong is still queued
        self._queue(self._conn.send_pong(payload))
        self._pong_end = self._out_queued

    def _peer_close(self, event: Close) -> None:
        self.close_code = event.code
        self.close_reason = event.reason
        self._trace("qio_channel_websock_peer_close", code=event.code, reason=event.reason)
        if not self._conn.close_sent:
            # Echo the status, as RFC 6455 suggests; the peer then closes the TCP.
            self._queue(self._conn.send_close(event.code))
        self._input_ended()

    def _protocol_error(self, error: WebsockProtocolError) -> None:
        self.log.info("websocket protocol error on {ioc!r}: {error}", ioc=self, error=str(error))
        if self._error is None:
            self._error = error
        if error.code is not None and not self._conn.close_sent:
            self._queue(self._conn.send_close(error.code, error.reason))
        self._input_ended()

    def _input_ended(self) -> None:
        """No more input will come (EOF, the peer's close, or an error)."""
        self._eof = True
        waiters, self._end_waiters = self._end_waiters, []
        for d in waiters:
            d.callback(None)
        self._notify()

    # ---- output pump -----------------------------------------------------------------------

    def _queue(self, data: bytes) -> None:
        if self._write_error is not None or self._shut:
            return
        self._out.append(data)
        self._out_bytes += len(data)
        self._out_queued += len(data)
        self._pump_out()

    def _pump_out(self) -> None:
        """Hand queued bytes to the master; wait for its OUT when it is full."""
        if self._pumping_out:
            self._pump_out_again = True
            return
        self._pumping_out = True
        before = self._out_bytes
        try:
            for _ in range(_MAX_ROUNDS):
                self._pump_out_again = False
                if not self._out or self._writing is not None or self._write_error is not None:
                    break
                try:
                    n = self._master.writev_nowait(list(self._out))
                except Exception:
                    self._output_failed(Failure())
                    break
                if n is WOULD_BLOCK:
                    d = self._master.wait(Condition.OUT)
                    self._writing = d
                    d.addCallbacks(self._on_writable, self._on_writable_error)
                    if not self._pump_out_again:
                        break
                    continue
                self._consume_out(n)
            else:
                if self._out and self._writing is None:
                    self._schedule_turn()
        finally:
            self._pumping_out = False
        if not self._out and self._flush_waiters:
            waiters, self._flush_waiters = self._flush_waiters, []
            for fw in waiters:
                fw.callback(None)
        if before >= self._write_buffer > self._out_bytes:
            self._notify()  # room for writers again

    def _consume_out(self, n: int) -> None:
        self._out_bytes -= n
        self._out_sent += n
        out = self._out
        while n:
            first = out[0]
            if len(first) <= n:
                out.popleft()
                n -= len(first)
            else:
                out[0] = first[n:]
                n = 0

    def _on_writable(self, _: object) -> None:
        self._writing = None
        self._pump_out()

    def _on_writable_error(self, failure: Failure) -> None:
        self._writing = None
        if failure.check(CancelledError) or self._shut:
            return
        self._output_failed(failure)

    def _output_failed(self, failure: Failure) -> None:
        err = _as_channel_error(failure, "Unable to write to websocket")
        if self._write_error is None:
            self._write_error = err
        self._out.clear()
        self._out_bytes = 0
        waiters, self._flush_waiters = self._flush_waiters, []
        for d in waiters:
            d.errback(err)
        self._notify()

    def _flushed(self) -> Deferred[None]:
        """Fire once every queued byte went to the master (fail if writing failed)."""
        if self._write_error is not None:
            return fail(self._write_error)
        if not self._out:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._flush_waiters.append(d)
        self._pump_out()
        return d

    def _input_done(self) -> Deferred[None]:
        """Fire once no more input will come (the peer's close frame, EOF, an error)."""
        if self._eof or self._error is not None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._end_waiters.append(d)
        self._pump_in()
        return d

    # ---- scheduling -------------------------------------------------------------------------

    def _notify(self) -> None:
        """Readiness may have changed.

        Never synchronously inside ``_io_read``/``_io_write``: the base class
        is then in the middle of serving a waiter, and waking it again from
        inside would serve it twice.  The next reactor turn does it instead.
        """
        if self._in_io:
            self._schedule_turn()
        else:
            self._ready_changed()

    def _schedule_turn(self) -> None:
        if self._turn_call is None and not self._shut:
            self._turn_call = self.reactor.callLater(0, self._turn)

    def _turn(self) -> None:
        self._turn_call = None
        self._pump_out()
        self._pump_in()
        self._ready_changed()

    # ---- the Channel contract ------------------------------------------------------------------

    def _io_condition(self) -> Condition:
        phase = self._phase
        if phase is _Phase.FAILED:
            return _CONDITIONS[_IN | _ERR]
        if phase is not _Phase.OPEN:
            return _CONDITIONS[0]
        bits = 0
        if self._rawin_bytes or self._eof or self._error is not None:
            bits |= _IN
        if self._error is not None or self._write_error is not None:
            bits |= _ERR
        elif self._eof:
            bits |= _HUP
        elif not self._conn.close_sent and self._out_bytes < self._write_buffer:
            bits |= _OUT
        return _CONDITIONS[bits]

    def _not_open(self) -> WouldBlock:
        """I/O before the websocket is open: raise, or wait for the handshake."""
        if self._phase is _Phase.NEW:
            raise ChannelError("Websocket handshake has not been started")
        if self._phase is _Phase.FAILED and self._error is not None:
            raise self._error.with_traceback(None)
        return WOULD_BLOCK

    def _io_read(self, nbytes: int, *, peek: bool = False) -> bytes | WouldBlock:
        if self._phase is not _Phase.OPEN:
            return self._not_open()
        if self._rawin_bytes:
            self._in_io = True
            try:
                return self._take(nbytes)
            finally:
                self._in_io = False
        if self._error is not None:
            raise self._error.with_traceback(None)
        if self._eof:
            return b""
        return WOULD_BLOCK

    def _take(self, nbytes: int) -> bytes:
        chunks = self._rawin
        first = chunks[0]
        if len(first) > nbytes:
            data = first[:nbytes]
            chunks[0] = first[nbytes:]
        elif len(first) == nbytes or len(chunks) == 1:
            data = chunks.popleft()
        else:
            parts: list[bytes] = []
            want = nbytes
            while chunks and want:
                piece = chunks[0]
                if len(piece) <= want:
                    parts.append(chunks.popleft())
                    want -= len(piece)
                else:
                    parts.append(piece[:want])
                    chunks[0] = piece[want:]
                    want = 0
            data = b"".join(parts)
        self._rawin_bytes -= len(data)
        if self._rawin_bytes <= self._low_water and self._want_input():
            self._schedule_turn()  # resume reading the master, outside this call
        return data

    def _io_write(self, chunks: Sequence[Buffer], fds: Sequence[int]) -> int | WouldBlock:
        if self._phase is not _Phase.OPEN:
            return self._not_open()
        if self._write_error is not None:
            raise self._write_error.with_traceback(None)
        if self._error is not None:
            raise self._error.with_traceback(None)
        if self._eof or self._conn.close_sent:
            raise ChannelError("Unable to write to websocket: Broken pipe")
        room = self._write_buffer - self._out_bytes
        if room <= 0:
            return WOULD_BLOCK
        self._in_io = True
        try:
            taken = self._encode(chunks, room)
            self._pump_out()
        finally:
            self._in_io = False
        if self._write_error is not None:
            raise self._write_error.with_traceback(None)
        return taken

    def _encode(self, chunks: Sequence[Buffer], limit: int) -> int:
        """Frame up to *limit* bytes of *chunks* into the output queue; return the count."""
        size = self._frame_size
        taken = 0
        frame: list[bytes] = []
        flen = 0
        for c in chunks:
            mv = memoryview(c).cast("B")
            n = len(mv)
            pos = 0
            while pos < n and taken < limit:
                k = min(n - pos, size - flen, limit - taken)
                # A whole immutable chunk is kept as it is; anything else is
                # copied, since the caller may reuse its buffer at once.
                frame.append(c if k == n and type(c) is bytes else bytes(mv[pos : pos + k]))
                flen += k
                pos += k
                taken += k
                if flen == size:
                    self._queue_frame(frame)
                    frame, flen = [], 0
            if taken >= limit:
                break
        if frame:
            self._queue_frame(frame)
        return taken

    def _queue_frame(self, payload: list[bytes]) -> None:
        pieces = self._conn.send_data(payload[0] if len(payload) == 1 else b"".join(payload))
        encoded = 0
        for p in pieces:
            encoded += len(p)
        self._out.extend(pieces)
        self._out_bytes += encoded
        self._out_queued += encoded

    def _io_shutdown(self, how: Shutdown) -> None:
        self._master.shutdown(how)

    def _io_set_delay(self, enabled: bool) -> None:
        self._master.set_delay(enabled)

    def _io_set_cork(self, enabled: bool) -> None:
        self._master.set_cork(enabled)

    def _io_close(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._close())

    async def _close(self) -> None:
        self._trace("qio_channel_websock_close")
        phase = self._phase
        if phase is _Phase.OPEN:
            if self._write_error is None:
                await self._close_handshake()
        elif phase is not _Phase.FAILED:
            # Before the websocket is open there is nobody to say goodbye to:
            # fail a pending handshake Task and just close the master.
            self._fail(ChannelClosedError())
            self._complete_task()
        self._shut = True
        if self._turn_call is not None and self._turn_call.active():
            self._turn_call.cancel()
        self._turn_call = None
        self._cancel_reading()
        d, self._writing = self._writing, None
        if d is not None:
            d.cancel()
        await self._master.close()

    async def _close_handshake(self) -> None:
        """Send our close frame (unless one went already), then await the peer's."""
        if not self._conn.close_sent:
            self._queue(self._conn.send_close(CloseCode.NORMAL))
        if self._close_timeout == 0:
            return

        async def both() -> None:
            await self._flushed()
            await self._input_done()

        try:
            await Deferred.fromCoroutine(both()).addTimeout(self._close_timeout, self.reactor)
        except TimeoutError:
            self.log.debug(
                "websocket close handshake on {ioc!r} timed out after {timeout} s",
                ioc=self,
                timeout=self._close_timeout,
            )
        except ChannelError as e:
            self.log.debug(
                "websocket close handshake on {ioc!r} failed: {error}", ioc=self, error=str(e)
            )

    # ---- tracing ---------------------------------------------------------------------------------

    def _trace(self, event: str, **fields: Any) -> None:
        """A QEMU-style trace event: debug level, gated like the Task's (``QIOTWISTED_TRACE``)."""
        if trace_enabled():
            self.log.debug(
                event + " ioc={ioc!r}",
                ioc=self,
                event=event,
                thread_id=threading.get_ident(),
                **fields,
            )
