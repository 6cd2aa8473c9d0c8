"""In-memory fakes for testing code built on qiotwisted, with no threads and no reactor.

Sections:

* **Workers** — :class:`MemoryWorkerPool`, a step-able stand-in for the
  thread pool behind :meth:`qiotwisted.task.Task.run_in_thread`.
* **Channels** — :func:`channel_pair`, two connected in-memory channels whose
  bytes cross only when the test calls :meth:`ChannelPair.pump`.
* **Listeners** — :class:`MemoryNetListener`, a NetListener stand-in whose
  clients are delivered when the test advances a ``task.Clock``.

Everything here runs in the calling thread and does nothing by itself: the test
decides when each queued job runs (:meth:`MemoryWorkerPool.perform`) and when
the reactor-side completions are delivered (:meth:`MemoryWorkerPool.flush`).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from ._pool import WorkerPoolFullError, WorkerPoolStoppedError
from .channel._base import WOULD_BLOCK, Buffer, Condition, Shutdown, WouldBlock
from .channel.pipe import PipeChannel
from .errors import ChannelError

__all__ = [
    "ChannelPair",
    "JobState",
    "MemoryJobHandle",
    "MemoryNetListener",
    "MemoryWorkerPool",
    "channel_pair",
]


# ---------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------


class JobState(enum.Enum):
    """Where a :class:`MemoryJobHandle` is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"


class MemoryJobHandle:
    """The :class:`~qiotwisted._pool.JobHandle` of a :class:`MemoryWorkerPool` job."""

    def __init__(
        self,
        pool: MemoryWorkerPool,
        job: Callable[[], object],
        on_stop: Callable[[], object] | None,
    ) -> None:
        self._pool = pool
        self.job = job
        self.on_stop = on_stop
        self.state = JobState.QUEUED

    def cancel(self) -> bool:
        """Drop the job if it has not started (True); otherwise do nothing (False)."""
        if self.state is not JobState.QUEUED:
            return False
        self.state = JobState.CANCELLED
        self._pool._queue.remove(self)
        self._pool._live.remove(self)
        return True

    def wait(self) -> None:
        """Return once the job has run.  A job still queued is run now, in the caller.

        Real pools block here until a worker thread has run the job; running it
        inline gives the same outcome without threads, so code that calls
        :meth:`~qiotwisted.task.Task.wait_thread` is testable.
        """
        if self.state is JobState.QUEUED:
            self._pool._queue.remove(self)
            self._pool._run(self)
        elif self.state is JobState.RUNNING:
            raise RuntimeError("wait() on a memory job from inside that job would deadlock")

    def __repr__(self) -> str:
        return f"<MemoryJobHandle {self.state.value} {self.job!r}>"


class MemoryWorkerPool:
    """A :class:`~qiotwisted._pool.WorkerPool` that runs nothing until told to.

    ``submit`` queues; :meth:`perform` runs the oldest queued job in the
    calling thread; ``call_in_reactor`` queues; :meth:`flush` runs the queued
    reactor calls.  So a test of a ``run_in_thread`` task reads::

        pool = MemoryWorkerPool()
        task = Task(obj, func, pool=pool)
        task.run_in_thread(worker)
        assert pool.perform()          # the worker runs
        assert pool.flush() == 1       # the completion is delivered

    :param max_queued: like :class:`~qiotwisted._pool.ThreadWorkerPool`'s: at
        most this many jobs may wait (there are no threads, so every job not yet
        performed waits); ``submit`` raises ``WorkerPoolFullError`` beyond it.
    """

    log = Logger()

    def __init__(self, *, max_queued: int | None = None) -> None:
        self.max_queued = max_queued
        self._queue: deque[MemoryJobHandle] = deque()
        self._live: list[MemoryJobHandle] = []
        self._calls: deque[Callable[[], object]] = deque()
        self.stopped = False
        self.performed = 0

    # ---- the WorkerPool interface ------------------------------------------

    def submit(
        self, job: Callable[[], object], *, on_stop: Callable[[], object] | None = None
    ) -> MemoryJobHandle:
        if self.stopped:
            raise WorkerPoolStoppedError()
        if self.max_queued is not None and len(self._queue) >= self.max_queued:
            raise WorkerPoolFullError(
                f"Worker pool is full: {len(self._queue)} jobs queued"
                f" (max_queued={self.max_queued})"
            )
        handle = MemoryJobHandle(self, job, on_stop)
        self._queue.append(handle)
        self._live.append(handle)
        return handle

    def call_in_reactor(self, fn: Callable[[], object]) -> None:
        self._calls.append(fn)

    def stop(self) -> None:
        """As the real pool: ``on_stop`` hooks, drop queued jobs, deliver posted calls."""
        if self.stopped:
            return
        self.stopped = True
        live = list(self._live)
        for handle in live:
            if handle.on_stop is not None:
                try:
                    handle.on_stop()
                except Exception:
                    self.log.failure("on_stop hook {hook!r} raised", hook=handle.on_stop)
        for handle in live:
            handle.cancel()
        self.flush()

    # ---- stepping ------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Jobs submitted and neither performed nor cancelled."""
        return len(self._queue)

    @property
    def calls_pending(self) -> int:
        """Reactor calls posted and not yet flushed."""
        return len(self._calls)

    def perform(self) -> bool:
        """Run the oldest queued job in the calling thread.  False if none was queued."""
        if not self._queue:
            return False
        self._run(self._queue.popleft())
        return True

    def flush(self, limit: int = 10_000) -> int:
        """Run the posted reactor calls, including ones posted meanwhile; return how many ran.

        Raises ``RuntimeError`` after *limit* calls (a loop that keeps posting).
        """
        ran = 0
        while self._calls:
            if ran >= limit:
                raise RuntimeError(f"flush(): still posting after {limit} calls")
            fn = self._calls.popleft()
            ran += 1
            try:
                fn()
            except Exception:
                self.log.failure("posted call {fn!r} raised", fn=fn)
        return ran

    def run_until_idle(self, limit: int = 10_000) -> int:
        """Alternate :meth:`perform` and :meth:`flush` until nothing is left; return jobs run."""
        jobs = 0
        for _ in range(limit):
            self.flush()
            if not self.perform():
                return jobs
            jobs += 1
        raise RuntimeError(f"run_until_idle(): still busy after {limit} jobs")

    def _run(self, handle: MemoryJobHandle) -> None:
        handle.state = JobState.RUNNING
        then: object = None
        try:
            then = handle.job()
        except Exception:
            self.log.failure("memory pool job {job!r} raised", job=handle.job)
        finally:
            handle.state = JobState.DONE
            self._live.remove(handle)
            self.performed += 1
        if callable(then):
            self.call_in_reactor(then)

    def __repr__(self) -> str:
        return f"<MemoryWorkerPool queued={len(self._queue)} calls={len(self._calls)}>"


# ---------------------------------------------------------------------------
# Channels
# ---------------------------------------------------------------------------


class _PumpedEnd(PipeChannel):
    """A pipe end whose writes wait in an outbox until :meth:`ChannelPair.pump`."""

    def __init__(self, incoming: Any, outgoing: Any, *, reactor: Any, name: str | None) -> None:
        super().__init__(incoming, outgoing, reactor=reactor, name=name)
        self.outbox: deque[bytes] = deque()
        self.outbox_size = 0
        self.eof_pending = False

    def _io_write(self, chunks: Sequence[Buffer], fds: Sequence[int]) -> int | WouldBlock:
        if self._out.eof or self.eof_pending:
            raise ChannelError("Unable to write to pipe: Broken pipe")
        room = self._out.capacity - self.outbox_size
        if room <= 0:
            return WOULD_BLOCK
        taken = 0
        for c in chunks:
            if taken >= room:
                break
            b = bytes(c[: room - taken])
            if b:
                self.outbox.append(b)
                taken += len(b)
        self.outbox_size += taken
        return taken

    def _io_condition(self) -> Condition:
        cond = super()._io_condition()
        if self.outbox_size >= self._out.capacity:
            cond &= ~Condition.OUT
        return cond

    def _io_shutdown(self, how: Shutdown) -> None:
        if how & Shutdown.WRITE:
            self.eof_pending = True
        if how & Shutdown.READ:
            super()._io_shutdown(Shutdown.READ)

    def _io_close(self) -> Deferred[None] | None:
        self.eof_pending = True
        return None

    def _deliver(self) -> int:
        """Move the outbox to the peer, as far as its capacity allows; bytes moved."""
        moved = 0
        d = self._out
        while self.outbox and d.size < d.capacity:
            chunk = self.outbox.popleft()
            room = d.capacity - d.size
            if len(chunk) > room:
                self.outbox.appendleft(chunk[room:])
                chunk = chunk[:room]
            d.chunks.append(chunk)
            d.size += len(chunk)
            self.outbox_size -= len(chunk)
            moved += len(chunk)
        if not self.outbox and self.eof_pending and not d.eof:
            d.eof = True
            moved += 1  # progress: the EOF crossed
        if moved:
            if self.peer is not None:
                self.peer._ready_changed()
            self._ready_changed()
        return moved


class ChannelPair:
    """Two connected in-memory channels, ``client`` and ``server``, pumped by the test.

    Writes land in the writer's outbox (up to *capacity* bytes, then
    WOULD_BLOCK); :meth:`pump` moves them across until nothing moves, so a
    test decides exactly when each side sees the other's bytes, EOF included.
    """

    def __init__(self, *, capacity: int = 64 * 1024, reactor: Any = None) -> None:
        from .channel.pipe import _Direction

        c2s, s2c = _Direction(capacity), _Direction(capacity)
        self.client = _PumpedEnd(s2c, c2s, reactor=reactor, name="client")
        self.server = _PumpedEnd(c2s, s2c, reactor=reactor, name="server")
        self.client.peer, self.server.peer = self.server, self.client

    def pump(self, *, max_rounds: int = 10_000) -> int:
        """Deliver pending bytes both ways until nothing moves; return the bytes moved."""
        total = 0
        for _ in range(max_rounds):
            moved = self.client._deliver() + self.server._deliver()
            if not moved:
                return total
            total += moved
        raise RuntimeError(f"ChannelPair.pump: still moving after {max_rounds} rounds")


def channel_pair(*, capacity: int = 64 * 1024, reactor: Any = None) -> ChannelPair:
    """A :class:`ChannelPair`; watches and ``wait()`` schedule on *reactor* (a Clock is fine)."""
    return ChannelPair(capacity=capacity, reactor=reactor)


# ---------------------------------------------------------------------------
# Listeners
# ---------------------------------------------------------------------------


class MemoryNetListener:
    """A stand-in for :class:`qiotwisted.NetListener` with no sockets.

    :meth:`connect` makes an in-memory connection and returns the client's
    channel; the server's end reaches the client func (or a pending
    :meth:`wait_client`) when the test advances *clock* (``clock.advance(0)``),
    as a real accept would on the next reactor turn.
    """

    def __init__(self, clock: Any, *, name: str | None = None, capacity: int = 64 * 1024) -> None:
        self.clock = clock
        self.name = name
        self.connected = True
        self.capacity = capacity
        self._func: Callable[..., object] | None = None
        self._data: Any = None
        self._notify: Callable[[Any], object] | None = None
        self._waiters: deque[Deferred[Any]] = deque()
        self.pairs: list[ChannelPair] = []

    def set_client_func(
        self,
        func: Callable[..., object] | None,
        data: Any = None,
        notify: Callable[[Any], object] | None = None,
    ) -> None:
        old_notify, old_data = self._notify, self._data
        self._func, self._data, self._notify = func, data, notify
        if old_notify is not None:
            old_notify(old_data)

    def wait_client(self) -> Deferred[Any]:
        d: Deferred[Any] = Deferred(self._waiters.remove)
        self._waiters.append(d)
        return d

    def connect(self) -> ChannelPair:
        """Open a connection; the server end is delivered on the clock's next turn."""
        if not self.connected:
            raise ChannelError("Connection refused")
        pair = ChannelPair(capacity=self.capacity, reactor=self.clock)
        pair.server.name = self.name
        self.pairs.append(pair)
        self.clock.callLater(0, self._deliver, pair)
        return pair

    def _deliver(self, pair: ChannelPair) -> None:
        if self._waiters:
            self._waiters.popleft().callback(pair.server)
        elif self._func is not None and self.connected:
            self._func(self, pair.server, self._data)
        else:
            pair.server.close()

    def disconnect(self) -> Deferred[None]:
        self.connected = False
        while self._waiters:
            self._waiters.popleft().errback(ChannelError("Listener disconnected"))
        notify, self._notify = self._notify, None
        if notify is not None:
            notify(self._data)
        return succeed(None)
