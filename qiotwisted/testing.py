"""In-memory fakes for testing code built on qiotwisted, with no threads and no reactor.

Sections:

* **Workers** — :class:`MemoryWorkerPool`, a step-able stand-in for the
  thread pool behind :meth:`qiotwisted.task.Task.run_in_thread`.

Everything here runs in the calling thread and does nothing by itself: the test
decides when each queued job runs (:meth:`MemoryWorkerPool.perform`) and when
the reactor-side completions are delivered (:meth:`MemoryWorkerPool.flush`).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable

from twisted.logger import Logger

from ._pool import WorkerPoolFullError, WorkerPoolStoppedError

__all__ = ["JobState", "MemoryJobHandle", "MemoryWorkerPool"]


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
