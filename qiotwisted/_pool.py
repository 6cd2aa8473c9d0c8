"""Worker pools for :class:`qiotwisted.task.Task`: where blocking work runs.

QEMU starts one detached thread per ``qio_task_run_in_thread`` call.  We use a
small bounded pool instead, because Twisted's own ``ThreadPool`` costs too much
per job and stalls the reactor under load (``performance.md``): the pool here is
a few plain threads handed jobs directly (last idle first), and results travel back to
the reactor thread in batches (one ``callFromThread`` drains every completion
that finished in the meantime).

The interface a :class:`~qiotwisted.task.Task` needs is :class:`WorkerPool`:

``submit(job, *, on_stop=None) -> JobHandle``
    Queue ``job()`` to run once in a worker thread.  If ``job()`` returns a
    callable, the pool runs that in the reactor thread afterwards, as
    ``call_in_reactor`` would (the pool may post it more cheaply).  Raises
    :class:`WorkerPoolFullError` when the pool's queue bound is reached and
    :class:`WorkerPoolStoppedError` after :meth:`~WorkerPool.stop`.  Thread-safe.
    ``on_stop`` runs in the reactor thread if the pool is stopped while the job
    is still queued or running, so the job's owner can cancel it.
``call_in_reactor(fn)``
    Run ``fn()`` in the reactor thread soon.  Thread-safe.  Workers use it to
    post completions; calls keep their order.
``stop()``
    Reactor thread only.  Calls the ``on_stop`` hooks, drops jobs that have not
    started, waits for running jobs, then delivers the completions they posted.

and the :class:`JobHandle` that ``submit`` returns:

``cancel() -> bool``
    Thread-safe.  True if the job had not started: it will never run.  False if
    it is running or has finished; nothing is interrupted.
``wait()``
    Block the calling thread until the job has run (or was dropped).

:class:`ThreadWorkerPool` is the real pool; :class:`qiotwisted.testing.MemoryWorkerPool`
implements the same interface with no threads, for deterministic tests.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from twisted.logger import Logger

from .errors import QIOError

__all__ = [
    "DEFAULT_POOL_SIZE",
    "JobHandle",
    "ThreadWorkerPool",
    "WorkerPool",
    "WorkerPoolFullError",
    "WorkerPoolStoppedError",
    "get_default_pool",
]

DEFAULT_POOL_SIZE = 8

# Completions run per reactor turn before the drain yields to timers and I/O.
_DRAIN_BATCH = 128


class WorkerPoolFullError(QIOError):
    """``submit`` refused a job: the pool's ``max_queued`` bound is reached."""


class WorkerPoolStoppedError(QIOError):
    """``submit`` refused a job: the pool has been stopped (reactor shutdown)."""

    def __init__(self, message: str = "Worker pool is stopped") -> None:
        super().__init__(message)


class JobHandle(Protocol):
    """A queued job; see the module docstring for the contract."""

    def cancel(self) -> bool: ...

    def wait(self) -> None: ...


class WorkerPool(Protocol):
    """Runs jobs in worker threads and posts calls to the reactor thread.

    See the module docstring for the full contract of each method.
    """

    def submit(
        self, job: Callable[[], object], *, on_stop: Callable[[], object] | None = None
    ) -> JobHandle: ...

    def call_in_reactor(self, fn: Callable[[], object]) -> None: ...

    def stop(self) -> None: ...


_EXIT: Any = object()  # handed to a parked worker: exit instead of running a job


class _ThreadJob:
    """A job in a :class:`ThreadWorkerPool`; the pool's :class:`JobHandle`."""

    __slots__ = ("_job", "_pool", "done", "on_stop")

    def __init__(
        self,
        pool: ThreadWorkerPool,
        job: Callable[[], object],
        on_stop: Callable[[], object] | None,
    ) -> None:
        self._pool = pool
        # A one-element list: list.pop() is atomic, so exactly one of "a worker
        # starts it" and "cancel() drops it" wins without a lock of its own.
        self._job = [job]
        self.on_stop = on_stop
        self.done = False  # written under the pool's lock

    def _claim(self) -> Callable[[], object] | None:
        try:
            return self._job.pop()
        except IndexError:
            return None

    def cancel(self) -> bool:
        if self._claim() is None:
            return False
        self._pool._job_done(self)
        return True

    def wait(self) -> None:
        self._pool._wait(self)

    def __repr__(self) -> str:
        state = "done" if self.done else ("queued" if self._job else "running")
        return f"<JobHandle {state}>"


class _Worker:
    """One pool thread and the lock it parks on while idle."""

    __slots__ = ("job", "thread", "wake")

    def __init__(self, job: _ThreadJob | None) -> None:
        self.job: Any = job
        self.thread: threading.Thread | None = None
        # Held while the worker is parked; whoever hands it a job releases it.
        self.wake = threading.Lock()
        self.wake.acquire()


class ThreadWorkerPool:
    """A bounded pool of worker threads named ``<name>-N``, started on demand.

    :param reactor: the reactor completions are posted to (default: the global
        reactor, resolved when first needed).
    :param size: at most this many threads; they start lazily as work arrives
        and live until :meth:`stop`.
    :param max_queued: at most this many jobs may wait for a free thread;
        ``submit`` raises :class:`WorkerPoolFullError` beyond that.  ``None``
        (the default) means unbounded.
    :param name: thread name prefix.
    :param stop_at_shutdown: stop the pool in the reactor's ``during shutdown``
        phase (registered when the first thread starts).  Worker threads are not
        daemons, so a pool that is never stopped keeps the process alive.

    Idle threads are handed work last-in first-out, so under light load the
    same warm thread serves every job and the others stay asleep.

    Thread contract: :meth:`submit`, :meth:`call_in_reactor` and the handles are
    thread-safe; :meth:`stop` and the size setters belong to the reactor thread.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any = None,
        *,
        size: int = DEFAULT_POOL_SIZE,
        max_queued: int | None = None,
        name: str = "qio-worker",
        stop_at_shutdown: bool = True,
    ) -> None:
        if size < 1:
            raise ValueError(f"pool size must be at least 1, not {size}")
        if max_queued is not None and max_queued < 0:
            raise ValueError(f"max_queued must be >= 0 or None, not {max_queued}")
        self._reactor_arg = reactor
        self._size = size
        self._max_queued = max_queued
        self._name = name
        self._stop_at_shutdown = stop_at_shutdown
        self._trigger: Any = None
        self._numbers = itertools.count(1)

        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # wakes wait() callers
        # Everything below is guarded by _lock.
        self._workers: list[_Worker] = []
        self._idle: list[_Worker] = []  # a stack: the last parked is the first woken
        self._queue: deque[_ThreadJob] = deque()  # jobs waiting for a thread
        self._pending = 0  # submitted and not finished (queued + running)
        self._waiters = 0
        self._stopped = False

        # The completion mailbox.  deque.append/popleft are atomic, so workers
        # post without a lock; _drain_scheduled only avoids redundant wake-ups
        # (a lost race costs one empty drain, never a lost completion).
        self._completions: deque[Callable[[], object]] = deque()
        self._drain_scheduled = False

    # ---- configuration -----------------------------------------------------

    @property
    def reactor(self) -> Any:
        if self._reactor_arg is None:
            from twisted.internet import reactor

            self._reactor_arg = reactor
        return self._reactor_arg

    @property
    def size(self) -> int:
        """Maximum number of threads.  Shrinking retires threads as they become idle."""
        return self._size

    @size.setter
    def size(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"pool size must be at least 1, not {size}")
        retire: list[_Worker] = []
        start: list[_Worker] = []
        with self._lock:
            self._size = size
            while len(self._workers) > size and self._idle:
                w = self._idle.pop()
                self._workers.remove(w)
                retire.append(w)
            while self._queue and len(self._workers) < size and not self._stopped:
                w = _Worker(self._queue.popleft())
                self._workers.append(w)
                start.append(w)
        for w in retire:
            w.job = _EXIT
            w.wake.release()
        for w in start:
            self._start(w)

    @property
    def max_queued(self) -> int | None:
        """Bound on jobs waiting for a thread (``None``: unbounded)."""
        return self._max_queued

    @max_queued.setter
    def max_queued(self, value: int | None) -> None:
        if value is not None and value < 0:
            raise ValueError(f"max_queued must be >= 0 or None, not {value}")
        self._max_queued = value

    @property
    def pending(self) -> int:
        """Jobs submitted and not yet finished (queued plus running)."""
        return self._pending

    @property
    def thread_count(self) -> int:
        return len(self._workers)

    @property
    def stopped(self) -> bool:
        return self._stopped

    # ---- the WorkerPool interface ------------------------------------------

    def submit(
        self, job: Callable[[], object], *, on_stop: Callable[[], object] | None = None
    ) -> _ThreadJob:
        """Queue *job* for a worker thread.  Thread-safe; see the module docstring."""
        handle = _ThreadJob(self, job, on_stop)
        wake = new = None
        with self._lock:
            if self._stopped:
                raise WorkerPoolStoppedError()
            limit = self._max_queued
            if limit is not None and self._pending >= self._size + limit:
                raise WorkerPoolFullError(
                    f"Worker pool is full: {self._pending} jobs pending"
                    f" ({self._size} threads, max_queued={limit})"
                )
            self._pending += 1
            if self._idle:
                wake = self._idle.pop()
                wake.job = handle
            elif len(self._workers) < self._size:
                new = _Worker(handle)
                self._workers.append(new)
            else:
                self._queue.append(handle)
        if wake is not None:
            wake.wake.release()
        elif new is not None:
            try:
                self._start(new)
            except RuntimeError as exc:  # "can't start new thread": out of resources
                with self._lock:
                    self._workers.remove(new)
                    self._pending -= 1
                raise WorkerPoolFullError(f"Cannot start a worker thread: {exc}") from exc
        return handle

    def call_in_reactor(self, fn: Callable[[], object]) -> None:
        """Run *fn* in the reactor thread soon, after earlier posted calls.  Thread-safe."""
        self._completions.append(fn)
        if not self._drain_scheduled:
            self._drain_scheduled = True
            self.reactor.callFromThread(self._drain)

    def stop(self) -> None:
        """Stop the pool (reactor thread; idempotent).  See the module docstring.

        Blocks until running jobs return: a job that never returns keeps the
        process from exiting, exactly as a non-daemon thread does.
        """
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            # Each worker's .job is the job it is running (or was just handed).
            live = [w.job for w in self._workers if isinstance(w.job, _ThreadJob)]
            live = [h for h in live + list(self._queue) if not h.done]
            idle, self._idle = self._idle, []
            workers = list(self._workers)
        if self._trigger is not None:
            try:
                self.reactor.removeSystemEventTrigger(self._trigger)
            except (ValueError, KeyError):
                pass  # already fired: we are running inside it
            self._trigger = None
        for handle in live:
            if handle.on_stop is not None:
                try:
                    handle.on_stop()
                except Exception:
                    self.log.failure(
                        "worker pool on_stop hook {hook!r} raised", hook=handle.on_stop
                    )
        for handle in live:
            handle.cancel()  # whatever has not started never will
        for w in idle:
            w.job = _EXIT
            w.wake.release()
        for w in workers:
            if w.thread is not None and w.thread.ident is not None:
                w.thread.join()
        # The reactor may not turn again (we are probably inside its shutdown),
        # so deliver what the last jobs posted here and now.
        self._drain_all()

    # ---- internals ---------------------------------------------------------

    def _start(self, w: _Worker) -> None:
        if self._stop_at_shutdown and self._trigger is None:
            self._trigger = self.reactor.addSystemEventTrigger("during", "shutdown", self.stop)
        w.thread = threading.Thread(
            target=self._work, args=(w,), name=f"{self._name}-{next(self._numbers)}", daemon=False
        )
        w.thread.start()

    def _work(self, w: _Worker) -> None:
        handle = w.job
        while True:
            job = handle._claim()
            then: object = None
            if job is not None:
                try:
                    then = job()
                except BaseException:
                    # Task's jobs catch everything themselves; this is for raw users.
                    self.log.failure("worker pool job {job!r} raised", job=job)
            park = exiting = False
            with self._lock:
                if job is not None:
                    self._finish_locked(handle)
                if self._stopped or len(self._workers) > self._size:
                    exiting = True
                    if w in self._workers:
                        self._workers.remove(w)
                elif self._queue:
                    handle = w.job = self._queue.popleft()
                else:
                    park = True
                    w.job = None
                    self._idle.append(w)
            # Posted as late as possible: the reactor thread woken by it then
            # usually finds the GIL free instead of waiting for this thread to
            # park; bench_task.py at N=1 was clearly faster with this order.
            if callable(then):
                self.call_in_reactor(then)
            if exiting:
                return
            if park:
                w.wake.acquire()  # until submit(), stop() or a shrink hands us something
                handle = w.job
                if handle is _EXIT:
                    with self._lock:
                        if w in self._workers:
                            self._workers.remove(w)
                    return

    def _finish_locked(self, handle: _ThreadJob) -> None:
        self._pending -= 1
        handle.done = True
        if self._waiters:
            self._cond.notify_all()

    def _job_done(self, handle: _ThreadJob) -> None:
        with self._lock:
            self._finish_locked(handle)

    def _wait(self, handle: _ThreadJob) -> None:
        with self._cond:
            self._waiters += 1
            try:
                while not handle.done:
                    self._cond.wait()
            finally:
                self._waiters -= 1

    def _drain(self) -> None:
        # Clear the flag before popping: a completion posted from now on either
        # gets popped below or schedules another drain itself.
        self._drain_scheduled = False
        completions = self._completions
        for _ in range(_DRAIN_BATCH):
            if not completions:
                return
            fn = completions.popleft()  # only this thread pops, so it cannot fail
            try:
                fn()
            except Exception:
                self.log.failure("posted call {fn!r} raised", fn=fn)
        # More than a batch: let timers and I/O run before the rest.
        if self._completions and not self._drain_scheduled:
            self._drain_scheduled = True
            self.reactor.callFromThread(self._drain)

    def _drain_all(self) -> None:
        # Bounded: a completion may post more (a func that submits again gets
        # WorkerPoolStoppedError, posted as a failed completion), not forever.
        for _ in range(1000):
            if not self._completions:
                return
            self._drain()
        self.log.error("completions still posted after stop: {n}", n=len(self._completions))

    def __repr__(self) -> str:
        return (
            f"<ThreadWorkerPool {self._name} threads={len(self._workers)}/{self._size}"
            f" pending={self._pending}{' stopped' if self._stopped else ''}>"
        )


_default_pools: dict[Any, ThreadWorkerPool] = {}
_default_lock = threading.Lock()
_global_default: ThreadWorkerPool | None = None  # the global reactor's, for reactor=None


def get_default_pool(reactor: Any = None) -> ThreadWorkerPool:
    """The shared :class:`ThreadWorkerPool` of *reactor* (default: the global reactor).

    Created on first use with :data:`DEFAULT_POOL_SIZE` threads at most, and
    stopped at the reactor's shutdown.  Tune it with its ``size`` and
    ``max_queued`` setters.  Thread-safe.
    """
    global _global_default
    if reactor is None:
        if _global_default is not None:
            return _global_default  # the global reactor never changes once imported
        from twisted.internet import reactor as global_reactor

        shared = _global_default = get_default_pool(global_reactor)
        return shared
    with _default_lock:
        pool = _default_pools.get(reactor)
        if pool is None:
            pool = _default_pools[reactor] = ThreadWorkerPool(reactor)
    return pool
