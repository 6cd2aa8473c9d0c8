"""``Task``: QEMU's QIOTask on Twisted.

A task reports the success or failure of one background operation to a
completion function, and owns the data the operation needs until it is over::

    def worker(task, path):                  # a worker thread
        task.set_result(hash_file(path))     # or task.set_error(exc), or raise

    def done(task, opaque):                  # the reactor thread
        if (err := task.propagate_error()) is not None: ...
        else: use(task.get_result())

    task = Task(source, done, opaque)
    task.run_in_thread(worker, "/var/lib/image")
    digest = await task                      # or task.deferred

Thread contract (QEMU's, with Twisted's reactor as the main context):

* A ``run_in_thread`` worker runs in a worker pool thread (``qio-worker-N``),
  never in the reactor thread.  Its completion function always runs in the
  reactor thread, or inline in :meth:`Task.wait_thread`.
* :meth:`Task.complete` runs the completion function synchronously in the
  calling thread, as ``qio_task_complete`` does.
* Every other method belongs to the thread that owns the task (the reactor
  thread), except :meth:`~Task.set_error`, :meth:`~Task.set_result`,
  :meth:`~Task.get_result` and :attr:`~Task.cancelled`, which the worker uses.

Lifetime: the completion function runs exactly once.  After it, the destroy
notifiers run exactly once each, in QEMU's order (the worker opaque's
``destroy``, then the task's ``destroy(opaque)``, then the result's
``destroy``), but never before the worker has returned: a cancelled task whose
worker is still running frees its data when the worker exits.

Workers: unless a task is given ``pool=``, its worker runs in the reactor's
shared :class:`ThreadWorkerPool` (:func:`get_default_pool`: at most 8 threads,
created on first use, stopped at reactor shutdown).  At shutdown pending tasks
are cancelled (their completion runs with ``TaskCancelledError``), queued
workers never start, and running ones are waited for.

Cancellation (QEMU has none): :meth:`Task.cancel`, or cancelling
:attr:`Task.deferred`.  A queued worker never starts; a running one is not
interrupted but sees :attr:`Task.cancelled` and its late result is dropped.

Tracing: the QEMU trace events (``qio_task_new``, ``qio_task_thread_start``,
``qio_task_thread_run``, ``qio_task_thread_exit``, ``qio_task_thread_result``,
``qio_task_thread_source_cancel``, ``qio_task_complete``) are debug-level
``twisted.logger`` events in the ``qiotwisted.task`` namespace carrying
``event``, ``task`` and ``thread_id`` fields.  Like QEMU's ``-trace``, they are
off by default (a log event costs several microseconds, more than the rest of a
task); turn them on with :func:`set_trace_enabled` or ``QIOTWISTED_TRACE=1`` in
the environment.  Failures (a raising completion function, destroy notifier, or
a worker exception that cannot become the task's error) are always logged.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Generator
from typing import Any, Generic, TypeVar

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from ._pool import (
    JobHandle,
    ThreadWorkerPool,
    WorkerPool,
    WorkerPoolFullError,
    WorkerPoolStoppedError,
    get_default_pool,
)
from .errors import TaskCancelledError

__all__ = [
    "DestroyNotify",
    "Task",
    "TaskFunc",
    "TaskWorker",
    "ThreadWorkerPool",
    "WorkerPool",
    "WorkerPoolFullError",
    "WorkerPoolStoppedError",
    "get_default_pool",
    "run_in_worker",
    "set_trace_enabled",
    "trace_enabled",
]

T = TypeVar("T")

TaskFunc = Callable[["Task[Any]", Any], object]
"""``func(task, opaque)``: the completion function (QEMU's ``QIOTaskFunc``)."""
TaskWorker = Callable[["Task[Any]", Any], object]
"""``worker(task, opaque)``: runs in a worker thread (QEMU's ``QIOTaskWorker``)."""
DestroyNotify = Callable[[Any], object]
"""``destroy(data)``: frees data the task owned (GLib's ``GDestroyNotify``)."""

# Module-level, not a class attribute: a Logger descriptor would append the
# class name, and the trace events belong to QEMU's "qiotwisted.task" namespace.
_log = Logger(namespace="qiotwisted.task")
_trace = os.environ.get("QIOTWISTED_TRACE", "").lower() not in ("", "0", "false", "no", "off")
_get_ident = threading.get_ident


def set_trace_enabled(enabled: bool) -> None:
    """Turn the ``qio_task_*`` debug trace events on or off (process-wide)."""
    global _trace
    _trace = bool(enabled)


def trace_enabled() -> bool:
    return _trace


class _ThreadData:
    """QEMU's ``QIOTaskThreadData``: the worker side of a threaded task."""

    __slots__ = ("destroy", "exit_seen", "exited", "handle", "opaque", "thread_id", "worker")

    def __init__(self, worker: TaskWorker, opaque: Any, destroy: DestroyNotify | None) -> None:
        self.worker: TaskWorker | None = worker
        self.opaque = opaque
        self.destroy = destroy
        self.handle: JobHandle | None = None
        self.thread_id: int | None = None
        # exited: the worker returned (written by the worker thread).
        # exit_seen: the reactor thread has learnt it, so the task may be freed.
        self.exited = False
        self.exit_seen = False


class Task(Generic[T]):
    """One background operation and its completion (QEMU's ``QIOTask``).

    :param source: the object the task works for; :attr:`source` returns it.
    :param func: ``func(task, opaque)``, the completion function, or ``None``
        when only :attr:`deferred` / ``await`` is used.
    :param opaque: passed to *func*; *destroy* frees it after completion.
    :param destroy: ``destroy(opaque)``, run once after *func*.
    :param reactor: the reactor whose default pool runs ``run_in_thread``
        workers (default: the global reactor, resolved when first needed).
    :param pool: the :class:`WorkerPool` to use instead of
        the reactor's default pool (e.g. :class:`qiotwisted.testing.MemoryWorkerPool`).

    A task that never calls :meth:`run_in_thread` touches no reactor and no
    pool.  Result and error follow QEMU: :meth:`set_error` keeps the first
    error, :meth:`propagate_error` moves it out, :meth:`set_result` overwrites
    without freeing the previous result.

    :attr:`deferred` fires *after* the completion function: with the error
    stored when completion began (even if *func* propagated it), otherwise
    with :meth:`get_result`.  ``await task`` awaits :attr:`deferred`.
    """

    def __init__(
        self,
        source: object,
        func: TaskFunc | None = None,
        opaque: Any = None,
        destroy: DestroyNotify | None = None,
        *,
        reactor: Any = None,
        pool: WorkerPool | None = None,
    ) -> None:
        self._source = source
        self._func = func
        self._opaque = opaque
        self._destroy = destroy
        self._reactor = reactor
        self._pool = pool
        self._error: BaseException | None = None
        self._result: tuple[Any, DestroyNotify | None] = (None, None)
        self._thread: _ThreadData | None = None
        # Serialises set_error between a worker and cancel() in the reactor.
        self._lock = threading.Lock()
        self._completed = False
        self._cancelled = False
        self._freed = False
        self._deferred: Deferred[T] | None = None
        self._deferred_cancelling = False
        self._outcome: Any = None  # kept for a deferred first asked for after completion
        if _trace:
            self._trace_event(
                "qio_task_new",
                "qio_task_new task={task!r} source={source!r} func={func!r} opaque={opaque!r}",
                source=source,
                func=func,
                opaque=opaque,
            )

    # ---- QEMU's accessors ------------------------------------------------

    @property
    def source(self) -> object:
        """The object the task was created for (``qio_task_get_source``)."""
        return self._source

    def get_source(self) -> object:
        return self._source

    @property
    def cancelled(self) -> bool:
        """True once :meth:`cancel` was called.  Thread-safe: workers poll it to stop early."""
        return self._cancelled

    @property
    def completed(self) -> bool:
        """True once the completion has begun (it runs exactly once)."""
        return self._completed

    @property
    def has_error(self) -> bool:
        """True if an error is stored (it has not been propagated yet)."""
        return self._error is not None

    def set_error(self, exc: BaseException | None) -> None:
        """Record *exc* as the task's error; the first error wins and ``None`` is ignored.

        Thread-safe (the worker calls it).  After completion it has no effect.
        """
        if exc is not None:
            self._set_error(exc)

    def _set_error(self, exc: BaseException) -> bool:
        with self._lock:
            if self._error is not None or self._completed:
                return False
            self._error = exc
            return True

    def propagate_error(self) -> BaseException | None:
        """Move the error out: return it and forget it (a second call returns ``None``)."""
        with self._lock:
            exc, self._error = self._error, None
        return exc

    def set_result(self, value: Any, destroy: DestroyNotify | None = None) -> None:
        """Store the result; ``destroy(value)`` runs when the task is freed.

        As in QEMU, a previous result is overwritten and *not* destroyed.
        Thread-safe (the worker calls it).  A result stored after the task was
        freed is destroyed at once, so its notifier still runs exactly once.
        """
        if self._freed:
            if destroy is not None:
                self._call_user(destroy, value, what="late result destroy notifier")
            return
        self._result = (value, destroy)

    def get_result(self) -> Any:
        """The stored result, or ``None``.  A cancelled task has no result."""
        if self._cancelled:
            return None
        return self._result[0]

    # ---- completion ------------------------------------------------------

    def complete(self) -> None:
        """Run the completion function now, in the calling thread, then free the task.

        For a task not run in a thread this is how it ends (QEMU's
        ``qio_task_complete``).  A ``run_in_thread`` task completes by itself;
        calling this while its worker is still running is an error (use
        :meth:`wait_thread` or :meth:`cancel`).
        """
        if self._completed:
            raise RuntimeError(f"{self!r} has already completed")
        th = self._thread
        if th is not None and not th.exited:
            raise RuntimeError(
                f"complete() on {self!r} while its worker is running; use wait_thread() or cancel()"
            )
        if th is not None:
            th.exit_seen = True
        self._complete()

    def _complete(self) -> None:
        # No lock: either the worker has returned (its writes happened before
        # the completion was posted) or cancel() already closed the task to it.
        self._completed = True
        exc = self._error
        outcome: Any = Failure(exc) if exc is not None else self.get_result()
        func = self._func
        if func is not None:
            try:
                func(self, self._opaque)
            except Exception:
                _log.failure(
                    "completion function {func!r} of {task!r} raised", func=func, task=self
                )
        if _trace:
            self._trace_event("qio_task_complete", "qio_task_complete task={task!r}")
        d = self._deferred
        if d is None:
            self._outcome = outcome
        elif not d.called and not self._deferred_cancelling:
            # (d.called: the completion function cancelled the deferred itself.)
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(outcome)
        th = self._thread
        if th is None or th.exit_seen:
            self._free()

    def _free(self) -> None:
        """QEMU's ``qio_task_free``: the destroy notifiers, once, in QEMU's order."""
        self._freed = True
        th = self._thread
        if th is not None:
            if th.destroy is not None:
                self._call_user(th.destroy, th.opaque, what="worker destroy notifier")
            th.worker = th.opaque = th.destroy = th.handle = None
        if self._destroy is not None:
            self._call_user(self._destroy, self._opaque, what="destroy notifier")
        value, destroy = self._result
        if destroy is not None:
            self._call_user(destroy, value, what="result destroy notifier")
        self._func = self._opaque = self._destroy = None
        self._result = (None, None)
        self._error = None

    # ---- threads ---------------------------------------------------------

    def run_in_thread(
        self, worker: TaskWorker, opaque: Any = None, destroy: DestroyNotify | None = None
    ) -> None:
        """Run ``worker(task, opaque)`` in a worker thread; complete in the reactor thread.

        Call it in the reactor thread, once.  The worker reports through
        :meth:`set_error` / :meth:`set_result`; an exception it raises becomes
        the task's error.  ``destroy(opaque)`` runs after the completion
        function, once the worker has returned.

        If the pool refuses the job (:class:`WorkerPoolFullError`,
        :class:`WorkerPoolStoppedError`) the task completes with that error, in
        the reactor thread, as if the worker had failed at once.
        """
        if self._thread is not None:
            raise RuntimeError(f"run_in_thread() called twice on {self!r}")
        if self._completed:
            raise RuntimeError(f"run_in_thread() on {self!r}, which has already completed")
        th = self._thread = _ThreadData(worker, opaque, destroy)
        pool = self._pool
        if pool is None:
            pool = self._pool = get_default_pool(self._reactor)
        if _trace:
            self._trace_event(
                "qio_task_thread_start",
                "qio_task_thread_start task={task!r} worker={worker!r} opaque={opaque!r}",
                worker=worker,
                opaque=opaque,
            )
        try:
            th.handle = pool.submit(self._thread_main, on_stop=self._pool_stopped)
        except (WorkerPoolFullError, WorkerPoolStoppedError) as exc:
            self._set_error(exc)
            th.exited = True
            pool.call_in_reactor(self._thread_result)

    def _thread_main(self) -> Callable[[], None]:
        """The pool job (worker thread): run the worker; return the completion to post."""
        th = self._thread
        assert th is not None and th.worker is not None
        th.thread_id = _get_ident()
        if _trace:
            self._trace_event("qio_task_thread_run", "qio_task_thread_run task={task!r}")
        try:
            th.worker(self, th.opaque)
        except BaseException as exc:
            if not self._set_error(exc) and not isinstance(
                exc, TaskCancelledError | CancelledError
            ):
                _log.failure(
                    "worker {worker!r} of {task!r} raised after the task had an error"
                    " or was cancelled",
                    worker=th.worker,
                    task=self,
                )
        if _trace:
            self._trace_event("qio_task_thread_exit", "qio_task_thread_exit task={task!r}")
        th.exited = True
        return self._thread_result

    def _thread_result(self) -> None:
        """The posted completion (reactor thread); does nothing after wait_thread()."""
        th = self._thread
        if th is None or th.exit_seen:
            return
        th.exit_seen = True
        if self._completed:  # cancelled while running: the worker is gone now
            self._free()
            return
        if _trace:
            self._trace_event("qio_task_thread_result", "qio_task_thread_result task={task!r}")
        self._complete()

    def wait_thread(self) -> None:
        """Block until the worker has returned, then complete inline (``qio_task_wait_thread``).

        Only for a :meth:`run_in_thread` task that has not completed, and only
        in the reactor thread: it blocks the reactor while it waits.  The
        completion function runs inside this call; the completion the worker
        posted to the reactor then does nothing.
        """
        th = self._thread
        if th is None:
            raise RuntimeError(f"wait_thread() on {self!r}, which was not run in a thread")
        if self._completed:
            raise RuntimeError(f"wait_thread() on {self!r}, which has already completed")
        if th.handle is not None:
            th.handle.wait()
        if _trace:
            self._trace_event(
                "qio_task_thread_source_cancel", "qio_task_thread_source_cancel task={task!r}"
            )
        th.exit_seen = True
        if _trace:
            self._trace_event("qio_task_thread_result", "qio_task_thread_result task={task!r}")
        self._complete()

    # ---- cancellation (not in QEMU) ------------------------------------------

    def cancel(self) -> None:
        """Cancel the task (reactor thread).  No effect once it has completed.

        The completion function runs now, inside this call, with
        :class:`~qiotwisted.errors.TaskCancelledError` as the error, unless an
        error was already stored (first error wins: a worker that failed before
        the cancel keeps its error).  :attr:`deferred` fails the same way.

        A worker that has not started never starts.  A running worker is not
        interrupted: :attr:`cancelled` turns true so it can stop early, and
        whatever it stores afterwards is dropped.  The destroy notifiers run
        once that worker has returned.
        """
        if self._completed:
            return
        with self._lock:
            # From here on the worker's set_error/set_result are dropped.
            self._cancelled = True
            self._completed = True
            if self._error is None:
                self._error = TaskCancelledError()
        th = self._thread
        if th is not None and th.handle is not None and not th.exit_seen:
            if th.handle.cancel():  # never started, so nothing will be posted
                th.exited = th.exit_seen = True
        self._complete()

    def _pool_stopped(self) -> None:
        if not self._completed:
            self._set_error(TaskCancelledError("Task was cancelled: worker pool stopped"))
            self.cancel()

    # ---- Deferred / await ----------------------------------------------------

    @property
    def deferred(self) -> Deferred[T]:
        """A Deferred that fires after the completion function with the result or the error.

        Created on first access (a task nobody awaits never logs an unhandled
        error).  Cancelling it cancels the task; it then fails with Twisted's
        ``CancelledError``, so ``deferred.addTimeout(...)`` raises
        ``TimeoutError`` as usual.
        """
        d = self._deferred
        if d is None:
            # The canceller holds the task weakly: a strong one would make a
            # task <-> deferred cycle that only the cyclic GC could free.
            ref = weakref.ref(self)

            def canceller(d: Deferred[T]) -> None:
                task = ref()
                if task is not None:
                    task._cancel_from_deferred(d)

            d = self._deferred = Deferred(canceller)
            if self._completed:
                outcome, self._outcome = self._outcome, None
                if isinstance(outcome, Failure):
                    d.errback(outcome)
                else:
                    d.callback(outcome)
        return d

    def _cancel_from_deferred(self, d: Deferred[T]) -> None:
        # Deferred.cancel() errbacks with CancelledError after this returns.
        self._deferred_cancelling = True
        try:
            self.cancel()
        finally:
            self._deferred_cancelling = False

    def __await__(self) -> Generator[Any, Any, T]:
        return self.deferred.__await__()

    # ---- helpers ---------------------------------------------------------------

    def _call_user(self, fn: Callable[[Any], object], arg: Any, *, what: str) -> None:
        try:
            fn(arg)
        except Exception:
            _log.failure("{what} {fn!r} of {task!r} raised", what=what, fn=fn, task=self)

    def _trace_event(self, event: str, fmt: str, **fields: Any) -> None:
        _log.debug(fmt, event=event, task=self, thread_id=_get_ident(), **fields)

    def __repr__(self) -> str:
        if self._freed:
            state = "freed"
        elif self._completed:
            state = "completed"
        elif self._thread is not None:
            state = "running" if self._thread.thread_id is not None else "queued"
        else:
            state = "new"
        if self._cancelled:
            state += ",cancelled"
        return f"<Task {id(self):#x} {state} source={self._source!r}>"


def run_in_worker(
    fn: Callable[..., T], *args: Any, reactor: Any = None, pool: WorkerPool | None = None
) -> Deferred[T]:
    """Run ``fn(*args)`` in the worker pool as a :class:`Task`; fires in the reactor thread.

    The one-liner for "do this blocking thing off the reactor": the Deferred
    fires with ``fn``'s return value or fails with what it raised.  Cancelling
    it cancels the task (a queued call never starts; a running one's result is
    dropped).
    """

    def worker(task: Task[T], _opaque: object) -> None:
        task.set_result(fn(*args))

    task: Task[T] = Task(None, reactor=reactor, pool=pool)
    task.run_in_thread(worker)
    return task.deferred
