"""The Channel base class: QEMU's QIOChannel semantics on Deferreds.

A subclass implements a handful of *non-blocking* primitives (``_io_read``,
``_io_write``, ``_io_condition``, ``_io_close`` and optionally
``_io_shutdown``/``_io_set_delay``/``_io_set_cork``/``_io_seek``/
``_io_read_full``) and calls :meth:`Channel._ready_changed` whenever its
readiness may have changed.  The base class builds everything else on top:
awaitable ``read``/``write``, the ``*_all`` family with QEMU's EOF rules,
watches and ``wait``.

Thread contract: every method here is called in the reactor thread, and every
callback (watch functions, Deferred callbacks) runs in the reactor thread.

Waiting: each direction has one waiter slot (``self._waiters["read"]`` /
``["write"]``, QEMU's read/write coroutine), shared by :meth:`Channel.wait`
and by ``read``/``write`` calls that would block.  A subclass may test a slot
for ``None`` to learn whether anyone waits, or override :meth:`Channel.wait`
to be told; blocked I/O then goes through that override.

Performance note: ``read``/``write`` first try the non-blocking primitive and
return an already-fired Deferred when it succeeds; only when the channel would
block do they park the attempt itself in the waiter slot (no coroutine, no
extra Deferred layers), and ``_ready_changed`` retries it.  Readiness bits are
handled as plain ints on these paths: IntFlag arithmetic costs about a
microsecond per operation.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Sequence
from typing import Any, Final, Generic, TypeAlias, TypeVar, cast

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..errors import ChannelClosedError, ChannelEOFError, ChannelError

__all__ = [
    "WOULD_BLOCK",
    "Buffer",
    "Channel",
    "Condition",
    "Feature",
    "Shutdown",
    "Watch",
    "WatchFunc",
    "WouldBlock",
]

_T = TypeVar("_T")


class Condition(enum.IntFlag):
    """GLib's ``GIOCondition`` bits, with the same values."""

    IN = 1
    PRI = 2
    OUT = 4
    ERR = 8
    HUP = 16


class Shutdown(enum.IntFlag):
    """``QIOChannelShutdown``: which direction(s) of the data path to shut."""

    READ = 1
    WRITE = 2
    BOTH = 3


class Feature(enum.IntFlag):
    """``QIOChannelFeature``, stored as bits as QEMU does."""

    FD_PASS = 1 << 0
    SHUTDOWN = 1 << 1
    LISTEN = 1 << 2
    WRITE_ZERO_COPY = 1 << 3
    READ_MSG_PEEK = 1 << 4
    SEEKABLE = 1 << 5
    CONCURRENT_IO = 1 << 6


class WouldBlock(enum.Enum):
    """Sentinel type of :data:`WOULD_BLOCK` (QEMU's ``QIO_CHANNEL_ERR_BLOCK``)."""

    WOULD_BLOCK = "would block"


WOULD_BLOCK: Final = WouldBlock.WOULD_BLOCK

Buffer: TypeAlias = bytes | bytearray | memoryview
WatchFunc: TypeAlias = Callable[["Channel", Condition, Any], bool]

_READ_CONDITIONS = Condition.IN | Condition.HUP | Condition.ERR
_WRITE_CONDITIONS = Condition.OUT | Condition.HUP | Condition.ERR
# Hot paths do their bit arithmetic on plain ints: every ``|``/``&`` between
# IntFlag members builds a new enum value (about a microsecond each), and a
# bulk reader crosses these paths once per chunk.  _CONDITIONS maps an int
# back to its Condition without that cost.
_READ_BITS: Final = int(_READ_CONDITIONS)
_WRITE_BITS: Final = int(_WRITE_CONDITIONS)
_CONDITIONS: Final = tuple(Condition(i) for i in range(32))


class _Waiter:
    """The one waiter a direction may have.

    ``attempt is None``: a :meth:`Channel.wait` caller; fire ``d`` with the
    conditions.  Otherwise a parked ``read``/``write``: call ``attempt()``
    when the direction is ready and fire ``d`` with its result, staying
    parked while it returns WOULD_BLOCK.
    """

    __slots__ = ("attempt", "d", "mask")

    def __init__(self, d: Deferred[Any], attempt: Callable[[], Any] | None, mask: int) -> None:
        self.d = d
        self.attempt = attempt
        self.mask = mask


class Watch:
    """A registered watch; :meth:`remove` it, or return False from its function."""

    __slots__ = ("_channel", "condition", "data", "func", "notify")

    def __init__(
        self,
        channel: Channel,
        condition: Condition,
        func: WatchFunc,
        data: Any,
        notify: Callable[[Any], None] | None,
    ) -> None:
        self._channel: Channel | None = channel
        self.condition = condition
        self.func = func
        self.data = data
        self.notify = notify

    @property
    def active(self) -> bool:
        return self._channel is not None

    def remove(self) -> None:
        """Remove the watch; its notify runs once.  Removing twice is harmless."""
        channel, self._channel = self._channel, None
        if channel is None:
            return
        channel._watches.remove(self)
        if self.notify is not None:
            channel._call_user(self.notify, self.data, what="watch notify")


class _Outcome(Generic[_T]):
    """Remember one outcome and give every observer its own Deferred for it.

    Used for :meth:`Channel.close`: each caller awaits the same close, and a
    failed close fails *every* caller (a shared Deferred would hand the error
    to the first observer only and success to the rest).
    """

    __slots__ = ("_observers", "_result")

    _PENDING: Final = object()

    def __init__(self) -> None:
        self._result: object = self._PENDING
        self._observers: list[Deferred[_T]] = []

    def observe(self) -> Deferred[_T]:
        if self._result is self._PENDING:

            def cancel(d: Deferred[_T]) -> None:
                if d in self._observers:
                    self._observers.remove(d)

            d: Deferred[_T] = Deferred(cancel)
            self._observers.append(d)
            return d
        if isinstance(self._result, Failure):
            return fail(self._result)
        # Neither pending nor a Failure: it is the _T that fire() recorded.
        return succeed(cast(_T, self._result))

    def fire(self, result: object) -> None:
        """Record *result* (a value or a Failure) and fire the observers; consumes a Failure."""
        self._result = result
        observers, self._observers = self._observers, []
        for d in observers:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(cast(_T, result))  # fire() records a _T or a Failure


class Channel:
    """Abstract base of every channel.  See the module docstring for the contract.

    All async methods return :class:`Deferred`; ``b""`` from :meth:`read`
    means end-of-file, as QEMU's 0 return does.
    """

    log = Logger()

    def __init__(self, *, reactor: IReactorTime | None = None, name: str | None = None) -> None:
        self._reactor_arg = reactor
        self.name = name
        self.features = Feature(0)
        self._watches: list[Watch] = []
        self._dispatch_call: Any = None
        # One waiter per direction (QEMU's read_coroutine / write_coroutine).
        # Subclasses may test ``self._waiters[direction] is not None``.
        self._waiters: dict[str, _Waiter | None] = {"read": None, "write": None}
        self._closed = False
        self._close_outcome: _Outcome[None] | None = None

    # ---- the subclass contract -------------------------------------------------

    def _io_read(self, nbytes: int, *, peek: bool = False) -> bytes | WouldBlock:
        """Return up to *nbytes* bytes (at least one), ``b""`` at EOF, or WOULD_BLOCK."""
        raise NotImplementedError

    def _io_write(self, chunks: Sequence[Buffer], fds: Sequence[int]) -> int | WouldBlock:
        """Accept a prefix of *chunks* (at least one byte) and return its length, or WOULD_BLOCK.

        If any byte is accepted, all *fds* go with it.  The caller may reuse
        mutable buffers as soon as this returns, so a subclass that keeps data
        must copy it (``bytes`` can be kept as they are).
        """
        raise NotImplementedError

    def _io_condition(self) -> Condition:
        """The conditions that hold right now (IN: a read won't block, OUT: a write won't)."""
        raise NotImplementedError

    def _io_close(self) -> Deferred[None] | None:
        """Release the underlying resource; may return a Deferred that fires when done."""
        raise NotImplementedError

    def _io_shutdown(self, how: Shutdown) -> None:
        raise ChannelError("Data path shutdown not supported")

    def _io_set_delay(self, enabled: bool) -> None:
        """Optional hint; the default ignores it, as QEMU does for channels without the hook."""

    def _io_set_cork(self, enabled: bool) -> None:
        """Optional hint; ignored by default."""

    def _io_seek(self, offset: int, whence: int) -> int:
        raise ChannelError("Channel does not support random access")

    def _io_take_fds(self) -> list[int]:
        """Return (and forget) the file descriptors received with the data read so far."""
        return []

    def _io_read_full(self, nbytes: int) -> tuple[bytes, list[int]] | WouldBlock:
        """Like ``_io_read``, also returning the fds that came with the returned bytes.

        Only called when the channel has :attr:`Feature.FD_PASS`.  The default
        pairs ``_io_read`` with ``_io_take_fds``.
        """
        data = self._io_read(nbytes)
        if data is WOULD_BLOCK:
            return WOULD_BLOCK
        return data, self._io_take_fds()

    # ---- reactor ----------------------------------------------------------------

    @property
    def reactor(self) -> Any:
        if self._reactor_arg is None:
            from twisted.internet import reactor

            self._reactor_arg = reactor
        return self._reactor_arg

    # ---- features, name ---------------------------------------------------------

    def has_feature(self, feature: Feature) -> bool:
        return bool(self.features & feature)

    def set_feature(self, feature: Feature) -> None:
        self.features |= feature

    def set_name(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name or hex(id(self))}>"

    # ---- primitive non-blocking I/O ----------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ChannelClosedError()

    def read_nowait(self, nbytes: int, *, peek: bool = False) -> bytes | WouldBlock:
        """QEMU's non-blocking read: up to *nbytes* bytes, ``b""`` at EOF, or WOULD_BLOCK.

        With *peek* the bytes stay in the channel (``READ_MSG_PEEK``).
        Raises :class:`ChannelError` on failure.
        """
        if self._closed:
            raise ChannelClosedError()
        if peek and not self.features & Feature.READ_MSG_PEEK:
            raise ChannelError("Channel does not support peek read")
        if nbytes <= 0:
            return b""
        return self._io_read(nbytes, peek=peek)

    def read_full_nowait(self, nbytes: int) -> tuple[bytes, list[int]] | WouldBlock:
        """QEMU's non-blocking ``readv_full``: ``(data, fds)``; the caller owns (closes) the fds."""
        self._check_open()
        if not self.features & Feature.FD_PASS:
            raise ChannelError("Channel does not support file descriptor passing")
        if nbytes <= 0:
            return b"", []
        return self._io_read_full(nbytes)

    def write_nowait(self, data: Buffer, fds: Sequence[int] = ()) -> int | WouldBlock:
        """QEMU's non-blocking write: the number of bytes accepted, or WOULD_BLOCK."""
        return self.writev_nowait([data], fds)

    def writev_nowait(self, iov: Sequence[Buffer], fds: Sequence[int] = ()) -> int | WouldBlock:
        if self._closed:
            raise ChannelClosedError()
        if fds and not self.features & Feature.FD_PASS:
            raise ChannelError("Channel does not support file descriptor passing")
        for c in iov:
            if len(c):
                return self._io_write(iov, fds)
        return 0

    # ---- awaitable I/O ---------------------------------------------------------------

    def read(self, nbytes: int, *, peek: bool = False) -> Deferred[bytes]:
        """Read up to *nbytes* (at least one) bytes; ``b""`` means EOF.

        Fires as soon as any data is available; does not wait to fill *nbytes*.
        Cancelling the Deferred frees the read-waiter slot and loses no data.
        """
        try:
            got = self.read_nowait(nbytes, peek=peek)
        except Exception:
            return fail()
        if got is not WOULD_BLOCK:
            return succeed(got)
        return self._when_ready(Condition.IN, lambda: self.read_nowait(nbytes, peek=peek))

    def read_full(self, nbytes: int) -> Deferred[tuple[bytes, list[int]]]:
        """Like :meth:`read`, also returning the file descriptors that came with the data.

        The caller owns the returned fds and must close them.  fds that arrive
        with bytes consumed by a plain :meth:`read` are closed by the channel,
        as the kernel discards them for a ``recvmsg`` without room for them.
        """
        try:
            got = self.read_full_nowait(nbytes)
        except Exception:
            return fail()
        if got is not WOULD_BLOCK:
            return succeed(got)
        return self._when_ready(Condition.IN, lambda: self.read_full_nowait(nbytes))

    def readv(self, buffers: Sequence[bytearray | memoryview]) -> Deferred[int]:
        """Scatter one read into *buffers*; fires with the byte count (0 at EOF)."""
        total = sum(len(b) for b in buffers)
        return self.read(total).addCallback(_scatter, buffers)

    def write(self, data: Buffer, fds: Sequence[int] = ()) -> Deferred[int]:
        """Write a prefix of *data* (at least one byte); fires with its length.

        Waits while the channel cannot take data (backpressure).
        """
        return self.writev([data], fds)

    def writev(self, iov: Sequence[Buffer], fds: Sequence[int] = ()) -> Deferred[int]:
        try:
            got = self.writev_nowait(iov, fds)
        except Exception:
            return fail()
        if got is not WOULD_BLOCK:
            return succeed(got)
        return self._when_ready(Condition.OUT, lambda: self.writev_nowait(iov, fds))

    def _when_ready(
        self, condition: Condition, attempt: Callable[[], _T | WouldBlock]
    ) -> Deferred[_T]:
        """Call *attempt* each time *condition* holds until it stops returning WOULD_BLOCK.

        The direction's waiter slot is held meanwhile; cancelling the result
        frees it.  Fast path: the attempt itself is parked in the slot, so a
        ready channel costs one Deferred per wake-up.  A subclass that
        overrides :meth:`wait` (to learn when someone waits) gets the generic
        path, which goes through its ``wait``.
        """
        if type(self).wait is not Channel.wait:
            return self._when_ready_via_wait(condition, attempt)
        if condition is Condition.IN:
            direction, mask = "read", _READ_BITS
        else:
            direction, mask = "write", _WRITE_BITS
        if self._closed:
            return fail(ChannelClosedError())
        if self._waiters[direction] is not None:
            return fail(ChannelError(f"Another coroutine is already waiting to {direction}"))

        def cancel(_: Deferred[_T]) -> None:
            if self._waiters[direction] is waiter:
                self._waiters[direction] = None

        d: Deferred[_T] = Deferred(cancel)
        waiter = _Waiter(d, attempt, mask)
        self._waiters[direction] = waiter
        ready = int(self._io_condition())
        if ready & mask:
            # Ready although the attempt just said WOULD_BLOCK: try once more
            # now; if it still blocks, stay parked until the next change.
            self._fire(direction, waiter, ready)
        return d

    def _when_ready_via_wait(
        self, condition: Condition, attempt: Callable[[], _T | WouldBlock]
    ) -> Deferred[_T]:
        waiting: Deferred[Condition] | None = None

        def cancel(_: Deferred[_T]) -> None:
            if waiting is not None:
                waiting.cancel()

        result: Deferred[_T] = Deferred(cancel)

        def arm() -> None:
            nonlocal waiting
            waiting = self.wait(condition)
            waiting.addCallbacks(ready, failed)

        def ready(_: object) -> None:
            nonlocal waiting
            waiting = None
            try:
                got = attempt()
            except Exception:
                result.errback()
                return
            if got is WOULD_BLOCK:
                arm()
            else:
                result.callback(got)

        def failed(f: Failure) -> None:
            if not result.called:
                result.errback(f)

        arm()
        return result

    # ---- the *_all family ----------------------------------------------------------

    def read_all(self, nbytes: int) -> Deferred[bytes]:
        """Read exactly *nbytes*; any EOF first is :class:`ChannelEOFError` (QEMU's message)."""

        def check(data: bytes) -> bytes:
            if len(data) < nbytes:
                raise ChannelEOFError()
            return data

        return self.read_all_eof(nbytes).addCallback(check)

    def read_all_eof(self, nbytes: int) -> Deferred[bytes]:
        """Read exactly *nbytes*, or ``b""`` if EOF comes before the first byte.

        EOF after some bytes is :class:`ChannelEOFError`.  Cancelling stops the
        loop; bytes already consumed by it are lost, as in QEMU.
        """
        try:
            first = self.read_nowait(nbytes)
        except Exception:
            return fail()
        if first is not WOULD_BLOCK and (len(first) == nbytes or first == b""):
            return succeed(first)
        return Deferred.fromCoroutine(self._read_all_eof(nbytes, first))

    async def _read_all_eof(self, nbytes: int, first: bytes | WouldBlock) -> bytes:
        parts: list[bytes] = []
        got = 0
        if first is not WOULD_BLOCK:
            parts.append(first)
            got = len(first)
        while got < nbytes:
            data = await self.read(nbytes - got)
            if not data:
                if got == 0:
                    return b""
                raise ChannelEOFError()
            parts.append(data)
            got += len(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read_all_full(self, nbytes: int) -> Deferred[tuple[bytes, list[int]]]:
        """QEMU's ``readv_full_all``: exactly *nbytes* plus every fd that came with them.

        EOF before all bytes is :class:`ChannelEOFError`; on any error the fds
        collected so far are closed.
        """
        return Deferred.fromCoroutine(self._read_all_full(nbytes))

    async def _read_all_full(self, nbytes: int) -> tuple[bytes, list[int]]:
        parts: list[bytes] = []
        fds: list[int] = []
        got = 0
        try:
            while got < nbytes:
                data, more = await self.read_full(nbytes - got)
                fds.extend(more)
                if not data:
                    raise ChannelEOFError()
                parts.append(data)
                got += len(data)
        except BaseException:
            for fd in fds:
                _close_quietly(fd)
            raise
        return b"".join(parts), fds

    def readv_all(self, buffers: Sequence[bytearray | memoryview]) -> Deferred[None]:
        """Fill every buffer completely; EOF first is :class:`ChannelEOFError`."""
        total = sum(len(b) for b in buffers)
        return self.read_all(total).addCallback(_scatter, buffers).addCallback(lambda _: None)

    def readv_all_eof(self, buffers: Sequence[bytearray | memoryview]) -> Deferred[bool]:
        """Fill every buffer: True when filled, False on EOF before any byte."""
        total = sum(len(b) for b in buffers)
        return self.read_all_eof(total).addCallback(lambda d: bool(_scatter(d, buffers)))

    def write_all(self, data: Buffer, fds: Sequence[int] = ()) -> Deferred[None]:
        """Write every byte of *data*, waiting for room as needed; *fds* go with the first chunk."""
        return self.writev_all([data], fds)

    def writev_all(self, iov: Sequence[Buffer], fds: Sequence[int] = ()) -> Deferred[None]:
        try:
            got = self.writev_nowait(iov, fds)
        except Exception:
            return fail()
        if got is not WOULD_BLOCK and got == sum(len(c) for c in iov):
            return succeed(None)
        return Deferred.fromCoroutine(self._writev_all(iov, fds, got))

    async def _writev_all(
        self, iov: Sequence[Buffer], fds: Sequence[int], first: int | WouldBlock
    ) -> None:
        pending = [memoryview(c).cast("B") for c in iov if len(c)]
        if first is not WOULD_BLOCK:
            pending = _discard_front(pending, first)
            fds = ()
        while pending:
            n = await self.writev(pending, fds)
            fds = ()
            pending = _discard_front(pending, n)

    # ---- control ---------------------------------------------------------------------

    def shutdown(self, how: Shutdown = Shutdown.BOTH) -> None:
        """Shut one or both directions of the data path; thread contract: reactor thread."""
        self._check_open()
        self._io_shutdown(Shutdown(how))
        self._ready_changed()

    def close(self) -> Deferred[None]:
        """Close the channel, flushing pending output; fires when the resource is released.

        Every call returns a new Deferred for the same close: closing twice
        (or after a failed close) reports the first close's outcome to both
        callers.  Pending waiters fail with :class:`ChannelClosedError`;
        watches are removed (their notify runs).
        """
        if self._close_outcome is not None:
            return self._close_outcome.observe()
        outcome: _Outcome[None] = _Outcome()
        self._close_outcome = outcome
        self._closed = True
        for direction, waiter in list(self._waiters.items()):
            self._waiters[direction] = None
            if waiter is not None:
                waiter.d.errback(ChannelClosedError())
        for watch in list(self._watches):
            watch.remove()
        if self._dispatch_call is not None and self._dispatch_call.active():
            self._dispatch_call.cancel()
        self._dispatch_call = None
        try:
            result = self._io_close()
        except Exception:
            outcome.fire(Failure())
        else:
            if result is None:
                outcome.fire(None)
            else:
                result.addBoth(outcome.fire)
        return outcome.observe()

    @property
    def closed(self) -> bool:
        return self._closed

    def set_delay(self, enabled: bool) -> None:
        """Nagle on (True) or off (False); a hint, ignored where meaningless."""
        self._io_set_delay(enabled)

    def set_cork(self, enabled: bool) -> None:
        """Cork output (TCP_CORK); a hint, ignored where meaningless."""
        self._io_set_cork(enabled)

    def seek(self, offset: int, whence: int = 0) -> int:
        """QEMU's ``qio_channel_io_seek``."""
        self._check_open()
        return self._io_seek(offset, whence)

    # ---- readiness: watches and wait -------------------------------------------------------

    def condition(self) -> Condition:
        """The conditions that hold now (closed channels report nothing)."""
        return Condition(0) if self._closed else self._io_condition()

    def add_watch(
        self,
        condition: Condition,
        func: WatchFunc,
        data: Any = None,
        notify: Callable[[Any], None] | None = None,
    ) -> Watch:
        """Call ``func(channel, ready & condition, data)`` whenever a condition holds.

        Level-triggered, like a GLib watch: it fires on each reactor turn while
        the condition holds (never synchronously inside ``add_watch``).  HUP
        and ERR are reported only if asked for.  Return True to keep the
        watch, False to remove it; ``notify(data)`` runs once when it goes
        (removal, False, a raise, or channel close).  A func that raises is
        logged and the watch removed.
        """
        watch = Watch(self, Condition(condition), func, data, notify)
        self._watches.append(watch)
        self._schedule_dispatch()
        return watch

    def wait(self, condition: Condition) -> Deferred[Condition]:
        """Fire with the conditions that hold once *condition* (IN or OUT) does.

        HUP and ERR also wake the waiter.  At most one waiter per direction, as
        QEMU asserts for ``qio_channel_yield``; cancelling the Deferred frees the slot.
        """
        if condition == Condition.IN:
            direction, mask = "read", _READ_BITS
        elif condition == Condition.OUT:
            direction, mask = "write", _WRITE_BITS
        else:
            return fail(ValueError("wait() takes Condition.IN or Condition.OUT"))
        if self._closed:
            return fail(ChannelClosedError())
        ready = int(self._io_condition()) & mask
        if ready:
            return succeed(_CONDITIONS[ready])
        if self._waiters[direction] is not None:
            return fail(ChannelError(f"Another coroutine is already waiting to {direction}"))

        def cancel(_: Deferred[Condition]) -> None:
            if self._waiters[direction] is waiter:
                self._waiters[direction] = None

        d: Deferred[Condition] = Deferred(cancel)
        waiter = _Waiter(d, None, mask)
        self._waiters[direction] = waiter
        return d

    def _ready_changed(self) -> None:
        """Subclasses call this when readiness may have changed (data, room, EOF, error)."""
        waiters = self._waiters
        reader = waiters["read"]
        writer = waiters["write"]
        if reader is not None or writer is not None:
            ready = int(self._io_condition())
            if reader is not None and ready & _READ_BITS:
                self._fire("read", reader, ready)
                writer = waiters["write"]
                if writer is None or self._closed:
                    writer = None
                else:
                    # The reader may have consumed data or written; look again.
                    ready = int(self._io_condition())
            if writer is not None and ready & _WRITE_BITS:
                self._fire("write", writer, ready)
        if self._watches:
            self._schedule_dispatch()

    def _fire(self, direction: str, waiter: _Waiter, ready: int) -> None:
        """Wake *waiter* (which holds *direction*'s slot) now that *ready* holds."""
        attempt = waiter.attempt
        if attempt is None:
            self._waiters[direction] = None
            waiter.d.callback(_CONDITIONS[ready & waiter.mask])
            return
        try:
            got = attempt()
        except Exception:
            self._waiters[direction] = None
            waiter.d.errback()
            return
        if got is not WOULD_BLOCK:
            self._waiters[direction] = None
            waiter.d.callback(got)

    def _schedule_dispatch(self) -> None:
        if self._dispatch_call is None and not self._closed:
            self._dispatch_call = self.reactor.callLater(0, self._dispatch_watches)

    def _dispatch_watches(self) -> None:
        self._dispatch_call = None
        if self._closed:
            return
        still_ready = False
        for watch in list(self._watches):
            if not watch.active:
                continue
            ready = self._io_condition() & watch.condition
            if not ready:
                continue
            try:
                keep = watch.func(self, ready, watch.data)
            except Exception:
                self.log.failure(
                    "watch function {func!r} on {channel!r} raised; watch removed",
                    func=watch.func,
                    channel=self,
                )
                keep = False
            if self._closed:
                return
            if not keep:
                watch.remove()
            elif self._io_condition() & watch.condition:
                still_ready = True
        if still_ready:
            self._schedule_dispatch()

    def _call_user(self, func: Callable[..., object], *args: object, what: str) -> None:
        try:
            func(*args)
        except Exception:
            self.log.failure("{what} {func!r} raised", what=what, func=func)


def _scatter(data: bytes, buffers: Sequence[bytearray | memoryview]) -> int:
    """Copy *data* into *buffers* in order; return its length."""
    offset = 0
    for buf in buffers:
        if offset >= len(data):
            break
        n = min(len(buf), len(data) - offset)
        buf[:n] = data[offset : offset + n]
        offset += n
    return len(data)


def _discard_front(iov: list[memoryview], n: int) -> list[memoryview]:
    """QEMU's ``iov_discard_front``: drop the first *n* bytes of *iov*."""
    i = 0
    while n and i < len(iov):
        first = iov[i]
        if n >= len(first):
            n -= len(first)
            i += 1
        else:
            return [first[n:], *iov[i + 1 :]]
    return iov[i:]


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass  # already closed by its owner; nothing else to release
