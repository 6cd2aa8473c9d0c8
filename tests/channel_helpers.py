"""QEMU's ``tests/unit/io-channel-helpers.c`` for qiotwisted channels.

The payload is QEMU's: 250 chunks of 4194 bytes (1,048,500 bytes in all),
chunk *k* filled with byte value *k*, written as 250 iovecs and read back into
250 iovecs.

QEMU runs the reader and the writer in two threads, in blocking or
non-blocking mode.  Here both run as concurrent tasks in the reactor thread,
and the two modes map to the two ways a caller can drive a channel:

* ``blocking=True``: the awaitable ``writev_all`` / ``readv_all``
  (QEMU's blocking ``qio_channel_{write,read}v_all``);
* ``blocking=False``: the non-blocking primitives ``writev_nowait`` /
  ``read_nowait`` returning WOULD_BLOCK plus ``wait()`` between attempts,
  which is what QEMU's non-blocking mode exercises through ``qio_channel_wait``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, DeferredList

from qiotwisted.channel import WOULD_BLOCK, Channel, Condition

__all__ = ["CHUNK", "NCHUNKS", "TOTAL", "ChannelTest"]

NCHUNKS = 250
CHUNK = 4194
TOTAL = NCHUNKS * CHUNK  # 1,048,500
# Bounds the non-blocking loops: far more iterations than 1 MiB can need.
_MAX_STEPS = 1_000_000


class ChannelTest:
    """One transfer: ``await t.run(src, dst, blocking)`` then ``t.validate()``."""

    def __init__(self) -> None:
        self.input = b"".join(bytes([k]) * CHUNK for k in range(NCHUNKS))
        assert len(self.input) == TOTAL == 1_048_500
        view = memoryview(self.input)
        self.inputv = [view[k * CHUNK : (k + 1) * CHUNK] for k in range(NCHUNKS)]
        self.output = bytearray(TOTAL)
        out = memoryview(self.output)
        self.outputv = [out[k * CHUNK : (k + 1) * CHUNK] for k in range(NCHUNKS)]
        self.readerr: BaseException | None = None
        self.writeerr: BaseException | None = None

    # -- QEMU's qio_channel_test_run_writer / _reader: the blocking calls, inline ------

    async def run_writer(self, src: Channel, *, blocking: bool = True) -> None:
        try:
            if blocking:
                await src.writev_all(self.inputv)
            else:
                await _writev_all_nowait(src, self.inputv)
        except Exception as e:
            self.writeerr = e

    async def run_reader(self, dst: Channel, *, blocking: bool = True) -> None:
        try:
            if blocking:
                await dst.readv_all(self.outputv)
            else:
                await _readv_all_nowait(dst, self.outputv)
        except Exception as e:
            self.readerr = e

    # -- QEMU's qio_channel_test_run_threads --------------------------------------------

    async def run(self, src: Channel, dst: Channel, *, blocking: bool) -> None:
        """Run the writer on *src* and the reader on *dst* concurrently until both end."""
        writer = Deferred.fromCoroutine(self.run_writer(src, blocking=blocking))
        reader = Deferred.fromCoroutine(self.run_reader(dst, blocking=blocking))
        await DeferredList([writer, reader], consumeErrors=True)

    def validate(self) -> None:
        """QEMU's ``qio_channel_test_validate``: no errors, output == input."""
        assert self.readerr is None, f"reader failed: {self.readerr!r}"
        assert self.writeerr is None, f"writer failed: {self.writeerr!r}"
        assert len(self.output) == len(self.input)
        assert bytes(self.output) == self.input


async def _writev_all_nowait(ch: Channel, iov: list[memoryview]) -> None:
    pending = list(iov)
    for _ in range(_MAX_STEPS):
        if not pending:
            return
        n = ch.writev_nowait(pending)
        if n is WOULD_BLOCK:
            await ch.wait(Condition.OUT)
            continue
        while n:
            head = pending[0]
            if n >= len(head):
                n -= len(head)
                pending.pop(0)
            else:
                pending[0] = head[n:]
                n = 0
    raise AssertionError("writer did not finish within its step bound")


async def _readv_all_nowait(ch: Channel, iov: list[memoryview]) -> None:
    i, off = 0, 0
    for _ in range(_MAX_STEPS):
        if i == len(iov):
            return
        buf = iov[i]
        got: Any = ch.read_nowait(len(buf) - off)
        if got is WOULD_BLOCK:
            await ch.wait(Condition.IN)
            continue
        if not got:
            raise EOFError("Unexpected end-of-file before all data were read")
        buf[off : off + len(got)] = got
        off += len(got)
        if off == len(buf):
            i, off = i + 1, 0
    raise AssertionError("reader did not finish within its step bound")


class _Call:
    def __init__(self, func: Any, args: tuple[Any, ...]) -> None:
        self.func, self.args = func, args
        self._active = True

    def active(self) -> bool:
        return self._active

    def cancel(self) -> None:
        assert self._active, "cancelling a call that already ran or was cancelled"
        self._active = False


class TurnReactor:
    """A stand-in reactor for watch tests: ``callLater(0, ...)`` runs at the next :meth:`turn`.

    ``twisted.internet.task.Clock.advance(0)`` also runs calls scheduled *during*
    the advance, so a level-triggered watch that stays ready would spin there
    forever; a real reactor runs them on its next iteration, as this does.
    """

    def __init__(self) -> None:
        self.calls: list[_Call] = []

    def callLater(self, delay: float, func: Any, *args: Any) -> _Call:
        call = _Call(func, args)
        self.calls.append(call)
        return call

    def pending(self) -> list[_Call]:
        return [c for c in self.calls if c.active()]

    def turn(self) -> int:
        """Run the calls that were due before this turn began; return how many ran."""
        due, self.calls = self.calls, []
        ran = 0
        for call in due:
            if call.active():
                call._active = False
                call.func(*call.args)
                ran += 1
        return ran


class TurnCounter:
    """Counts reactor turns: a ``callLater(0)`` that re-arms itself until stopped.

    Read :attr:`tick` inside a callback to learn which turn it runs in.
    Bounded: it stops by itself after *limit* turns.
    """

    def __init__(self, reactor: Any, limit: int = 100_000) -> None:
        self.reactor = reactor
        self.limit = limit
        self.tick = 0
        self._running = False

    def start(self) -> None:
        self._running = True
        self._turn()

    def stop(self) -> None:
        self._running = False

    def _turn(self) -> None:
        self.tick += 1
        if self._running and self.tick < self.limit:
            self.reactor.callLater(0, self._turn)
