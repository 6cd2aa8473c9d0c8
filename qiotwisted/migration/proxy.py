"""The migration proxy behind ``twistd qio proxy``.

Every channel a QEMU source opens is forwarded over its own upstream
connection to a QEMU destination, bytes both ways (QEMU may use a return
path), each direction with backpressure: a read is only followed by the next
once the write it fed has been accepted.  TLS can be terminated on either side
independently, and ``--record`` taps the source's bytes into a recorder.

Order matters to a QEMU 7.2 destination, which does not peek and takes the
first connection (with TLS: the first finished handshake) as its main channel
(``qemu-interop.md`` trap 3).  So upstream connections are opened strictly in
the order the source's connections were accepted, one after another, and the
multifd ones only after main has written its first bytes upstream.

The proxy never writes to the source on its own; the only bytes that go back
are the destination's.  Thread contract: reactor thread only.  (A plain TCP
pair without a tap has its source -> destination bytes moved by a
:class:`_Pump` thread with ``splice(2)``; it reports to the reactor thread.)
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.logger import Logger

from .._address import AddressLike
from .._pool import WorkerPool
from ..channel import WOULD_BLOCK, Channel, Shutdown, SocketChannel
from ..channel.pipe import pipe_pair
from . import wire
from .limits import ConnectionLimiter, IdleWatchdog, Limits
from .recorder import Recorder, _host, _is_timeout

__all__ = ["Proxy"]

READ_SIZE = 1024 * 1024
# How much of the main stream's end is kept to judge, at the source's EOF,
# whether the stream ended with QEMU's device description (98 KB for a pc).
TAIL_KEEP = 1 << 20
STOPPED_REASON = "the service stopped"
Upgrade = Callable[[Channel], Deferred[Channel]]


class _Group:
    """The connections of one migration, as accepted: index 0 is main.

    A migration lives or dies whole (QEMU fails it when any channel fails), so
    the first failure of any channel closes every other one: :meth:`fail`.
    """

    def __init__(self) -> None:
        self.count = 0
        self.live = 0
        self.last_ready: Deferred[None] = succeed(None)
        self.main_started: Deferred[None] = Deferred()
        self.channels: set[Channel] = set()
        self.failed: str | None = None

    def fail(self, reason: str, *, spare: tuple[Channel, ...] = ()) -> bool:
        """Record the first *reason* and abort every channel but *spare*; False if not first."""
        if self.failed is not None:
            return False
        self.failed = reason
        for channel in list(self.channels):
            if channel not in spare:
                _abort(channel)
        return True


class _Tail:
    """The last bytes of a stream, kept as the chunks that carried them (no copies)."""

    def __init__(self, keep: int = TAIL_KEEP) -> None:
        self.keep = keep
        self.chunks: deque[bytes] = deque()
        self.size = 0

    def add(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)
        while len(self.chunks) > 1 and self.size - len(self.chunks[0]) >= self.keep:
            self.size -= len(self.chunks.popleft())

    def value(self) -> bytes:
        return b"".join(self.chunks)


def looks_complete(tail: bytes) -> bool:
    """Whether a main stream that ends with *tail* ended where QEMU ends one.

    QEMU 7.2 ends a main stream with ``QEMU_VM_EOF`` (``00``), then
    ``QEMU_VM_VMDESCRIPTION`` (``06``), a be32 length and that many bytes of
    JSON; machines that suppress the description end at the ``00``.  This only
    decides what the proxy logs and whether the other channels of the
    migration are closed at once: the bytes themselves are always forwarded.
    """
    if tail.endswith(b"\x00"):
        return True
    if not tail.endswith(b"}"):
        return False
    pos = len(tail)
    for _ in range(1024):  # bounded: candidates are rare in JSON text
        pos = tail.rfind(b"\x00\x06", 0, pos)
        if pos < 0:
            return False
        if pos + 6 <= len(tail):
            n = int.from_bytes(tail[pos + 2 : pos + 6], "big")
            if pos + 6 + n == len(tail) and tail[pos + 6 : pos + 7] == b"{":
                return True
    return False


class Proxy:
    """Forwards migrations to *to*; plug :meth:`client_func` into a NetListener.

    :param server_tls: turns an accepted channel into a handshaken TLS channel
        (TLS from the source), or None for plain.
    :param client_tls: the same for upstream channels (TLS to the destination).
    :param recorder: also files each migration as a session while it passes.
    :param limits: connections admitted (``max_connections``,
        ``max_connections_per_peer``), time to identify (``handshake_timeout``:
        a source channel must send its first 4 bytes, a migration magic, before
        anything is opened toward the destination, so a port probe never
        reaches it) and ``idle_timeout`` (no byte either way on a channel).

    A failure on any channel (the source or the destination reset, went
    idle, or the source closed the main channel mid-stream) is logged with
    its reason and closes every channel of that migration, on both sides.
    """

    log = Logger()

    def __init__(
        self,
        to: AddressLike,
        *,
        server_tls: Upgrade | None = None,
        client_tls: Upgrade | None = None,
        recorder: Recorder | None = None,
        reactor: Any = None,
        pool: WorkerPool | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.to = to
        self._server_tls = server_tls
        self._client_tls = client_tls
        self.recorder = recorder
        self._reactor = reactor
        self._pool = pool
        self.limits = limits if limits is not None else Limits()
        self.admission = ConnectionLimiter(
            self.limits.max_connections, self.limits.max_connections_per_peer
        )
        self._group = _Group()
        self._channels: set[Channel] = set()
        self._active: set[Deferred[None]] = set()
        self._stopping = False
        self.forwarded: list[tuple[str, int, str | None]] = []  # (peer, bytes, error)

    @property
    def reactor(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    def start(self) -> Deferred[Any]:
        """Start the recording tap's recorder, if any (see :meth:`Recorder.start`)."""
        if self.recorder is None:
            return succeed(None)
        return self.recorder.start()

    def client_func(self, listener: object, channel: Channel, data: object = None) -> None:
        peer = _peer(channel)
        key = _host(peer)
        refusal = "the service is stopping" if self._stopping else self.admission.try_admit(key)
        if refusal is not None:
            self.log.warn("refused {peer}: {reason}", peer=peer, reason=refusal)
            channel.close().addErrback(lambda _: None)
            return
        group = self._group
        index = group.count
        group.count += 1
        group.live += 1
        previous = group.last_ready
        ready: Deferred[None] = Deferred()
        group.last_ready = ready
        self._channels.add(channel)
        group.channels.add(channel)
        d = Deferred.fromCoroutine(self._handle(group, index, channel, previous, ready, peer))
        self._active.add(d)
        d.addErrback(lambda f: self.log.failure("proxying {channel!r} failed", f, channel=channel))

        def done(_: object) -> None:
            self._active.discard(d)
            self._channels.discard(channel)
            group.channels.discard(channel)
            self.admission.release(key)
            group.live -= 1
            if group.live == 0 and self._group is group:
                self._group = _Group()  # the next connection starts a new migration

        d.addBoth(done)

    async def _handle(
        self,
        group: _Group,
        index: int,
        incoming: Channel,
        previous: Deferred[None],
        ready: Deferred[None],
        peer: str,
    ) -> None:
        what = "main" if index == 0 else f"channel {index}"
        upstream: Channel | None = None
        try:
            if self._server_tls is not None:
                try:
                    incoming = await self._server_tls(incoming)
                except Exception as e:
                    self.log.warn(
                        "{peer} ({what}): TLS from the source failed: {error}",
                        peer=peer,
                        what=what,
                        error=e,
                    )
                    await incoming.close()
                    return
                self._channels.add(incoming)
                group.channels.add(incoming)
            head = await self._identify(incoming, peer, what)
            if head is None:
                if index == 0:
                    group.fail("its main channel was refused")
                return
            await _settled(previous)
            if index > 0:
                await _settled(group.main_started)
            if group.failed is not None:
                self.log.warn(
                    "{peer} ({what}): not forwarded: the migration failed ({reason})",
                    peer=peer,
                    what=what,
                    reason=group.failed,
                )
                _abort(incoming)
                return
            try:
                upstream = await self._connect()
            except Exception as e:
                reason = f"cannot reach the destination {self.to}: {e}"
                self.log.warn(
                    "{peer} ({what}): {reason}; closing the source side",
                    peer=peer,
                    what=what,
                    reason=reason,
                )
                _abort(incoming)
                group.fail(reason)
                return
            finally:
                _fire_after(previous, ready)
            self._channels.add(upstream)
            group.channels.add(upstream)
            self.log.info("{peer} ({what}) -> {to}", peer=peer, what=what, to=str(self.to))
            tap = self._tap(incoming) if self.recorder is not None else None
            on_first = group.main_started if index == 0 else None
            await self._run_pair(group, index, peer, what, incoming, upstream, tap, on_first, head)
        finally:
            _fire_after(previous, ready)
            if upstream is not None:
                self._channels.discard(upstream)
                group.channels.discard(upstream)
            self._channels.discard(incoming)
            group.channels.discard(incoming)
            if index == 0 and not group.main_started.called:
                group.main_started.callback(None)

    async def _identify(self, incoming: Channel, peer: str, what: str) -> bytes | None:
        """The channel's first 4 bytes if they are a migration magic; else refuse it (None)."""
        timeout = self.limits.handshake_timeout
        try:
            d = incoming.read_all_eof(4)
            head = await (d.addTimeout(timeout, self.reactor) if timeout else d)
        except Exception as e:
            if _is_timeout(e):
                reason = f"sent no migration stream header within {timeout:g} s (handshake-timeout)"
            else:
                reason = f"no migration magic ({e})"
            head = None
        else:
            if not head:
                reason = "closed without sending anything"
            elif wire.classify(head) in (wire.ChannelKind.MAIN, wire.ChannelKind.MULTIFD):
                return head
            else:
                reason = wire.classify_reason(head)
        self.log.warn("refused {peer} ({what}): {reason}", peer=peer, what=what, reason=reason)
        await incoming.close()
        return None

    def _connect(self) -> Deferred[Channel]:
        d: Deferred[Any] = SocketChannel.connect(
            self.to, reactor=self.reactor, pool=self._pool
        ).deferred
        if self._client_tls is not None:
            d.addCallback(self._client_tls)
        return d

    def _tap(self, incoming: Channel) -> Channel:
        assert self.recorder is not None
        ours, theirs = pipe_pair(reactor=self.reactor, names=("proxy-tap", "recorder-tap"))
        theirs.remote_address = getattr(incoming, "remote_address", None)
        self.recorder.client_func(None, theirs)
        return ours

    async def _run_pair(
        self,
        group: _Group,
        index: int,
        peer: str,
        what: str,
        incoming: Channel,
        upstream: Channel,
        tap: Channel | None,
        on_first: Deferred[None] | None,
        head: bytes,
    ) -> None:
        errors: list[str] = []
        timeout = self.limits.idle_timeout

        def on_idle() -> None:
            if not errors:
                errors.append(f"no data either way for {timeout:g} s (idle-timeout)")
            _abort(upstream)
            _abort(incoming)

        watchdog = IdleWatchdog(self.reactor, timeout, on_idle).start()
        tail = _Tail() if index == 0 else None
        forward = self._forward(incoming, upstream, tap, on_first, errors, watchdog, tail, head)
        back = Deferred.fromCoroutine(
            self._copy(upstream, incoming, None, None, errors, "destination", "source", watchdog)
        )

        def stop_other(result: object) -> object:
            # When either direction fails, both sides are closed.
            if errors:
                _abort(upstream)
                _abort(incoming)
            return result

        forward.addBoth(stop_other)
        back.addBoth(stop_other)
        sent = await forward
        if not errors and group.failed is not None:
            errors.append(f"closed: the migration failed ({group.failed})")
            _abort(upstream)
            _abort(incoming)
        if errors:
            await back
        else:
            if tail is not None and not looks_complete(tail.value()):
                # The bytes all go on (the destination judges them); the other
                # channels of this migration are closed now, not after the
                # destination notices.
                reason = (
                    f"the source closed the main channel mid-stream, after {sent} bytes "
                    "(no end-of-migration marker)"
                )
                self.log.warn("{peer} ({what}): {reason}", peer=peer, what=what, reason=reason)
                group.fail(reason, spare=(incoming, upstream))
            await _finish(upstream)
            await back
        watchdog.stop()
        await incoming.close()
        await upstream.close()
        if tap is not None:
            await tap.close()
        self.forwarded.append((peer, sent, errors[0] if errors else None))
        if errors:
            self.log.warn("{peer} ({what}): {error}", peer=peer, what=what, error=errors[0])
            others = len(group.channels - {incoming, upstream})
            if group.fail(f"{what}: {errors[0]}") and others:
                self.log.warn(
                    "migration from {peer} failed ({what}: {error}): closing its other "
                    "{n} connection(s)",
                    peer=peer,
                    what=what,
                    error=errors[0],
                    n=others,
                )
        elif group.failed is not None:
            self.log.warn(
                "{peer} ({what}): ended, {sent} bytes forwarded; the migration failed ({reason})",
                peer=peer,
                what=what,
                sent=sent,
                reason=group.failed,
            )
        else:
            self.log.info("{peer} ({what}): done", peer=peer, what=what)

    def _forward(
        self,
        incoming: Channel,
        upstream: Channel,
        tap: Channel | None,
        on_first: Deferred[None] | None,
        errors: list[str],
        watchdog: IdleWatchdog,
        tail: _Tail | None,
        head: bytes,
    ) -> Deferred[int]:
        """Copy the source's bytes upstream; fires with the count, like :meth:`_copy`.

        Plain TCP on both sides and no tap: a :class:`_Pump` thread moves the
        bytes with ``splice(2)`` (or ``recv``/``send`` for main, whose end is
        kept in *tail*), outside the reactor.  Everything else goes through the
        channels.
        """
        pump, first = (None, head) if tap is not None else _Pump.take_over(incoming, upstream, head)
        if pump is None:
            return Deferred.fromCoroutine(
                self._copy(
                    incoming, upstream, tap, on_first, errors, "source", "destination",
                    watchdog, tail, first,
                )
            )  # fmt: skip
        return pump.run(self.reactor, on_first, errors, watchdog, tail)

    async def _copy(
        self,
        src: Channel,
        dst: Channel,
        tap: Channel | None,
        on_first: Deferred[None] | None,
        errors: list[str],
        src_name: str,
        dst_name: str,
        watchdog: IdleWatchdog,
        tail: _Tail | None = None,
        first: bytes = b"",
    ) -> int:
        total = 0
        data = first
        while True:
            if not data:
                try:
                    data = await src.read(READ_SIZE)
                except Exception as e:
                    if not errors and not src.closed:
                        errors.append(f"{src_name} failed: {e}")
                    return total
                if not data:
                    return total
                watchdog.touch()
            try:
                await dst.write_all(data)
            except Exception as e:
                if not errors:
                    errors.append(f"{dst_name} failed: {e}")
                return total
            total += len(data)
            if tail is not None:
                tail.add(data)
            if on_first is not None and not on_first.called:
                on_first.callback(None)
            if tap is not None:
                try:
                    await tap.write_all(data)
                except Exception as e:
                    self.log.warn("recording tap failed, forwarding goes on: {error}", error=e)
                    tap = None
            data = b""

    def stop(self) -> Deferred[None]:
        """Abort every proxied connection (service shutdown); new ones are refused."""
        self._stopping = True
        self._group.fail(STOPPED_REASON)
        for channel in list(self._channels):
            _abort(channel)
        d = DeferredList(list(self._active), consumeErrors=True).addCallback(lambda _: None)
        if self.recorder is not None:
            recorder = self.recorder
            d.addCallback(lambda _: recorder.stop())
        return d


def _fire_after(previous: Deferred[None], ready: Deferred[None]) -> None:
    """Fire *ready* once *previous* has fired (at once if it has): keeps accept order."""
    if ready.called:
        return
    if previous.called:
        ready.callback(None)
        return

    def relay(result: object) -> object:
        if not ready.called:
            ready.callback(None)
        return result

    previous.addBoth(relay)


async def _settled(d: Deferred[None]) -> None:
    """Wait for *d* to fire without consuming its result (several waiters share it)."""
    if d.called:
        return
    waiter: Deferred[None] = Deferred()

    def relay(result: object) -> object:
        waiter.callback(None)
        return result

    d.addBoth(relay)
    await waiter


async def _finish(channel: Channel) -> None:
    """End the stream toward *channel* with a half-close, as QEMU itself does.

    No TLS close_notify: a QEMU 7.2 destination never reads it, so the unread
    record makes its close() send a reset, which the return path would report
    as a failure of a migration that succeeded.  QEMU's own sources end TLS
    with a bare FIN too.  Errors are logged, not raised: the peer may already
    be gone, and the caller closes the channel either way.
    """
    try:
        channel.shutdown(Shutdown.WRITE)
    except Exception as e:
        Proxy.log.debug("ending the stream to {channel!r}: {error}", channel=channel, error=e)


def _abort(channel: Channel) -> None:
    pump = _PUMPS.get(channel)
    if pump is not None:
        pump.stop()
    abort = getattr(channel, "abort", None)
    if abort is not None:
        abort()
    else:
        channel.close()


def _peer(channel: Channel) -> str:
    addr: Any = getattr(channel, "remote_address", None)
    host = getattr(addr, "host", None)
    return f"{host}:{addr.port}" if host is not None else repr(addr)


# -- the forwarding pump ---------------------------------------------------------------

#: Bytes a pump moves per splice/recv: also the pipe capacity it asks for.
PUMP_CHUNK = 1024 * 1024
#: A pump thread wakes at least this often to notice a stop, and reports
#: progress to the idle watchdog at most every _PUMP_TOUCH_S.
_PUMP_POLL_MS = 500
_PUMP_TOUCH_S = 0.25
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
#: Running pumps by either channel of their pair, so that ``_abort`` stops
#: them too.  Reactor thread only.
_PUMPS: dict[Channel, _Pump] = {}
#: What the channels say for these (SocketChannel words, so logs match).
_LOST = "Connection lost (reset by peer or network failure)"
_LOST_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT, errno.ECONNABORTED})


class _Pump:
    """Forwards the source's bytes of one plain TCP pair upstream, in a thread.

    Why: the channel copy loop costs about 1.4 CPU-seconds per GB here
    (64 KiB recvs, at most 128 KiB per Twisted send, a reactor turn and a few
    Deferreds per chunk), and on a 2-core host that CPU is taken from the two
    QEMUs, which slowed a plain multifd migration 2-3x.  ``splice(2)``
    socket -> pipe -> socket moves the bytes without them entering Python, at
    about 0.4 CPU-seconds per GB, the floor a blocking stdlib proxy reaches
    too (``benchmarks/bench_proxy.py``).  Backpressure is kept: nothing more
    is read from the source while the pipe (1 MiB) is full.  The main
    channel, whose end the proxy keeps (``_Tail``) to tell a finished
    migration from a cut one, is copied with ``recv``/``send`` in the same
    thread instead (it carries ~112 KB with multifd; everything without), at
    about the same CPU cost.

    Ownership: the thread works on duplicates of the two sockets and never
    changes their (non-blocking) mode: it polls.  Twisted stops reading the
    source socket for good (what the channel had buffered is sent first) and
    never writes the upstream one; the destination -> source direction stays
    with the channels.  The duplicates are closed in the reactor thread once
    the result has been delivered, so the peers see the proxy's close only
    after it has acted on the outcome (logged it, closed the channels), as
    with the channel path.  :meth:`stop` (``_abort``) wakes the thread through
    a pipe.  One plain thread per pump, not the worker pool: a pump holds its
    thread for the whole migration and all the channels of one migration must
    flow at once (``qemu-interop.md`` trap 4), which a bounded pool could
    starve.
    """

    def __init__(
        self,
        channels: tuple[Channel, Channel],
        src: socket.socket,
        dst: socket.socket,
        first: bytes,
    ) -> None:
        self.channels = channels
        self._src = src
        self._dst = dst
        self._first = first
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._lock = threading.Lock()
        self._closed = False
        self._stopped = False

    @classmethod
    def take_over(
        cls, incoming: Channel, upstream: Channel, head: bytes
    ) -> tuple[_Pump | None, bytes]:
        """A pump for this pair if it can have one, and the bytes still to send first.

        With a pump those bytes are its business and ``b""`` is returned;
        without one the caller sends them (*head* plus whatever was drained
        from the channel).  Reactor thread only.
        """
        if not hasattr(os, "splice"):
            return None, head
        if type(incoming) is not SocketChannel or type(upstream) is not SocketChannel:
            return None, head  # TLS (or anything else) goes through the channels
        src_t: Any = incoming.transport
        dst_t: Any = upstream.transport
        if not all(hasattr(t, "getHandle") for t in (src_t, dst_t)):
            return None, head
        if not hasattr(src_t, "stopReading"):
            return None, head
        # What the channel buffered already goes first.  Draining it and
        # stopping Twisted's reads happen in one reactor turn, so no byte can
        # arrive in between.
        parts = [head]
        while True:
            try:
                data = incoming.read_nowait(PUMP_CHUNK)
            except Exception:
                return None, b"".join(parts)  # the channel path reports the error
            if data is WOULD_BLOCK:
                break
            if not data:
                return None, b"".join(parts)  # EOF already: nothing left to pump
            assert isinstance(data, bytes)
            parts.append(data)
        try:
            src = src_t.getHandle().dup()
        except OSError:
            return None, b"".join(parts)
        try:
            dst = dst_t.getHandle().dup()
        except OSError:
            src.close()
            return None, b"".join(parts)
        src_t.stopReading()
        pump = cls((incoming, upstream), src, dst, b"".join(parts))
        _PUMPS[incoming] = _PUMPS[upstream] = pump
        return pump, b""

    def run(
        self,
        reactor: Any,
        on_first: Deferred[None] | None,
        errors: list[str],
        watchdog: IdleWatchdog,
        tail: _Tail | None,
    ) -> Deferred[int]:
        """Start the thread; fires in the reactor thread with the bytes forwarded.

        A failure is appended to *errors* (unless something was there first
        or the pump was stopped), as :meth:`Proxy._copy` does; *on_first*
        fires once the first bytes have gone upstream.
        """
        done: Deferred[int] = Deferred()
        call = reactor.callFromThread

        def fire_first() -> None:
            if on_first is not None and not on_first.called:
                on_first.callback(None)

        def report(total: int, error: str | None) -> None:
            for channel in self.channels:
                if _PUMPS.get(channel) is self:
                    del _PUMPS[channel]
            if error is not None and not errors and not self._stopped:
                errors.append(error)
            try:
                done.callback(total)
            finally:
                self._close()

        def body() -> None:
            progress = _Progress(call, watchdog, fire_first if on_first is not None else None)
            error: str | None = None
            try:
                if tail is None:
                    error = self._splice(progress)
                else:
                    error = self._copy(progress, tail)
            except BaseException as e:  # delivered to the reactor, never lost
                error = f"forwarding failed: {e!r}"
            call(report, progress.total, error)

        threading.Thread(target=body, name="qio-proxy-pump", daemon=True).start()
        return done

    def stop(self) -> None:
        """Make the thread end soon; thread-safe, idempotent."""
        with self._lock:
            self._stopped = True
            if not self._closed:
                try:
                    os.write(self._wake_w, b"x")
                except OSError:
                    pass  # the pipe is full: a wake-up is already pending

    def _close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._src.close()
            self._dst.close()
            os.close(self._wake_r)
            os.close(self._wake_w)

    # -- in the pump thread ------------------------------------------------------------

    def _poll(self, want: dict[int, int]) -> bool:
        """Sleep until one of *want* (fd -> poll events) is ready; False once stopped."""
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        for fd, events in want.items():
            poller.register(fd, events)
        while not self._stopped:
            if poller.poll(_PUMP_POLL_MS):
                return not self._stopped
        return False

    def _send_all(self, data: bytes, progress: _Progress) -> str | None:
        """Write *data* to the destination, polling while it is full."""
        view = memoryview(data)
        dst = self._dst
        while view and not self._stopped:
            try:
                n = dst.send(view)
            except (BlockingIOError, InterruptedError):
                self._poll({dst.fileno(): select.POLLOUT})
                continue
            except OSError as e:
                return _error("destination", "write to", e)
            view = view[n:]
            progress.sent(n)
        return None

    def _copy(self, progress: _Progress, tail: _Tail) -> str | None:
        if self._first:
            tail.add(self._first)
            if (error := self._send_all(self._first, progress)) is not None:
                return error
        src = self._src
        while not self._stopped:
            try:
                data = src.recv(PUMP_CHUNK)
            except (BlockingIOError, InterruptedError):
                self._poll({src.fileno(): select.POLLIN})
                continue
            except OSError as e:
                return _error("source", "read from", e)
            if not data:
                return None
            progress.received()
            tail.add(data)
            if (error := self._send_all(data, progress)) is not None:
                return error
        return None

    def _splice(self, progress: _Progress) -> str | None:
        if self._first and (error := self._send_all(self._first, progress)) is not None:
            return error
        r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            try:
                room = fcntl.fcntl(w, _F_SETPIPE_SZ, PUMP_CHUNK)
            except OSError:
                room = 65536  # the default pipe size (pipe-max-size may be lower)
            flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
            src, dst = self._src.fileno(), self._dst.fileno()
            in_pipe = 0
            eof = False
            while not self._stopped and not (eof and not in_pipe):
                moved = False
                if not eof and in_pipe < room:
                    try:
                        n = os.splice(src, w, room - in_pipe, flags=flags)
                    except (BlockingIOError, InterruptedError):
                        pass
                    except OSError as e:
                        return _error("source", "read from", e)
                    else:
                        if n == 0:
                            eof = True
                        else:
                            in_pipe += n
                            moved = True
                            progress.received()
                if in_pipe:
                    try:
                        n = os.splice(r, dst, in_pipe, flags=flags)
                    except (BlockingIOError, InterruptedError):
                        pass
                    except OSError as e:
                        return _error("destination", "write to", e)
                    else:
                        in_pipe -= n
                        moved = moved or n > 0
                        progress.sent(n)
                if not moved:
                    # Sleep until the source has bytes (if the pipe has room)
                    # or the destination has room (if the pipe has bytes).
                    want: dict[int, int] = {}
                    if not eof and in_pipe < room:
                        want[src] = select.POLLIN
                    if in_pipe:
                        want[dst] = select.POLLOUT
                    self._poll(want)
            return None
        finally:
            os.close(r)
            os.close(w)


def _error(side: str, verb: str, e: OSError) -> str:
    if e.errno in _LOST_ERRNOS:
        reason = _LOST
    else:
        reason = e.strerror or errno.errorcode.get(e.errno or 0, str(e))
    return f"{side} failed: Unable to {verb} socket: {reason}"


class _Progress:
    """A pump's byte count, and its reports to the reactor (rate-limited)."""

    def __init__(
        self, call: Callable[..., object], watchdog: IdleWatchdog, first: Callable[[], None] | None
    ) -> None:
        self._call = call
        self._watchdog = watchdog
        self._first = first
        self.total = 0
        self._next_touch = 0.0

    def received(self) -> None:
        now = time.monotonic()
        if now >= self._next_touch:
            self._next_touch = now + _PUMP_TOUCH_S
            self._call(self._watchdog.touch)

    def sent(self, n: int) -> None:
        self.total += n
        if self._first is not None and n:
            first, self._first = self._first, None
            self._call(first)
