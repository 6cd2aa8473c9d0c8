"""Tests for qiotwisted.task (QEMU's QIOTask) and its worker pools.

The first part ports QEMU's tests/unit/test-io-task.c one by one; most tests run
reactor-free and thread-free on ``qiotwisted.testing.MemoryWorkerPool``, and a
real-thread layer (the ``async def`` tests) checks the same contracts with
``ThreadWorkerPool`` on the running reactor, asserting thread identity.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet import task as ttask
from twisted.logger import LogLevel, capturedLogs

from qiotwisted.errors import TaskCancelledError
from qiotwisted.task import (
    Task,
    ThreadWorkerPool,
    WorkerPoolFullError,
    WorkerPoolStoppedError,
    get_default_pool,
    set_trace_enabled,
)
from qiotwisted.testing import MemoryWorkerPool

ROOT = Path(__file__).resolve().parent.parent


class Dummy:
    """Stands in for QEMU's "qemu-dummy" QOM object."""


class TaskData:
    """QEMU's struct TestTaskData plus what our extra tests record."""

    def __init__(self) -> None:
        self.source: object = None
        self.err: BaseException | None = None
        self.freed = False
        self.calls = 0
        self.thread: int | None = None
        self.log: list[str] = []


def task_callback(task: Task[Any], data: TaskData) -> None:
    data.source = task.get_source()
    data.err = task.propagate_error()
    data.calls += 1
    data.thread = threading.get_ident()
    data.log.append("func")


def task_data_free(data: TaskData) -> None:
    data.freed = True
    data.log.append("destroy")


@pytest.fixture
def pool() -> MemoryWorkerPool:
    return MemoryWorkerPool()


@pytest.fixture
def trace() -> Iterator[None]:
    set_trace_enabled(True)
    try:
        yield
    finally:
        set_trace_enabled(False)


async def settle(reactor: Any, predicate: Callable[[], bool], limit: float = 5.0) -> None:
    """Let the reactor turn until *predicate* holds (bounded)."""
    for _ in range(int(limit / 0.005)):
        if predicate():
            return
        await ttask.deferLater(reactor, 0.005)
    raise AssertionError("condition not reached in time")


# ---------------------------------------------------------------------------
# QEMU's test-io-task.c, reactor-free
# ---------------------------------------------------------------------------


def test_complete() -> None:
    """/crypto/task/complete"""
    obj = Dummy()
    data = TaskData()
    task: Task[None] = Task(obj, task_callback, data, None)
    src = task.source
    task.complete()
    assert src is obj
    assert data.source is obj
    assert data.err is None
    assert data.freed is False
    assert data.calls == 1


def test_datafree() -> None:
    """/crypto/task/datafree: the destroy notifier runs at complete, after func."""
    obj = Dummy()
    data = TaskData()
    task: Task[None] = Task(obj, task_callback, data, task_data_free)
    task.complete()
    assert data.source is obj
    assert data.err is None
    assert data.freed is True
    assert data.log == ["func", "destroy"]


def test_failure() -> None:
    """/crypto/task/failure: the callback gets the very error object that was set."""
    obj = Dummy()
    data = TaskData()
    task: Task[None] = Task(obj, task_callback, data, None)
    err = RuntimeError("Some error")
    task.set_error(err)
    task.complete()
    assert data.source is obj
    assert data.err is err
    assert data.freed is False


def worker_ok(task: Task[Any], data: TaskData) -> None:
    data.log.append(f"worker:{threading.get_ident()}")


def worker_fail(task: Task[Any], data: TaskData) -> None:
    data.log.append("worker")
    task.set_error(RuntimeError("Testing fail"))


def test_thread_complete_memory(pool: MemoryWorkerPool) -> None:
    """/crypto/task/thread_complete on the step-able pool: nothing runs until stepped."""
    obj = Dummy()
    data = TaskData()
    task: Task[None] = Task(obj, task_callback, data, pool=pool)
    task.run_in_thread(worker_ok, data)
    assert data.log == [] and pool.queued == 1
    assert pool.perform()
    assert len(data.log) == 1 and data.calls == 0  # the completion is posted, not run
    assert pool.flush() == 1
    assert data.calls == 1
    assert data.source is obj
    assert data.err is None


def test_thread_failure_memory(pool: MemoryWorkerPool) -> None:
    """/crypto/task/thread_failure on the step-able pool."""
    obj = Dummy()
    data = TaskData()
    task: Task[None] = Task(obj, task_callback, data, pool=pool)
    task.run_in_thread(worker_fail, data)
    pool.run_until_idle()
    assert data.source is obj
    assert isinstance(data.err, RuntimeError) and str(data.err) == "Testing fail"


async def test_thread_complete(reactor: Any) -> None:
    """/crypto/task/thread_complete: worker thread != main; callback in the main thread."""
    obj = Dummy()
    data = TaskData()
    done: defer.Deferred[None] = defer.Deferred()

    def callback(task: Task[Any], data: TaskData) -> None:
        task_callback(task, data)
        done.callback(None)

    task: Task[None] = Task(obj, callback, data)
    task.run_in_thread(worker_ok, data)
    await done
    assert data.source is obj
    assert data.err is None
    worker_thread = int(data.log[0].split(":")[1])
    assert worker_thread != threading.get_ident()
    assert data.thread == threading.get_ident()
    assert threading.get_ident() == threading.main_thread().ident  # pytest-twisted's reactor


async def test_thread_failure(reactor: Any) -> None:
    """/crypto/task/thread_failure with real threads."""
    obj = Dummy()
    data = TaskData()
    worker_thread: list[int] = []

    def worker(task: Task[Any], data: TaskData) -> None:
        worker_thread.append(threading.get_ident())
        worker_fail(task, data)

    task: Task[None] = Task(obj, task_callback, data)
    task.run_in_thread(worker, data)
    with pytest.raises(RuntimeError, match="Testing fail"):
        await task
    assert data.source is obj
    assert isinstance(data.err, RuntimeError)
    assert worker_thread and worker_thread[0] != threading.get_ident()
    assert data.thread == threading.get_ident()


# ---------------------------------------------------------------------------
# wait_thread (QEMU's complete-on-wait)
# ---------------------------------------------------------------------------


def test_wait_thread_completes_inline_and_posted_completion_does_nothing(
    pool: MemoryWorkerPool,
) -> None:
    data = TaskData()
    task: Task[int] = Task(Dummy(), task_callback, data, task_data_free, pool=pool)
    task.run_in_thread(lambda t, o: t.set_result(7))
    assert pool.perform()  # the worker ran and posted its completion
    assert pool.calls_pending == 1
    task.wait_thread()
    assert data.calls == 1 and data.freed  # completed and freed inside wait_thread
    assert pool.flush() == 1  # the posted completion runs ...
    assert data.calls == 1  # ... and does nothing
    assert data.log == ["func", "destroy"]


def test_wait_thread_runs_a_queued_memory_job(pool: MemoryWorkerPool) -> None:
    data = TaskData()
    task: Task[int] = Task(Dummy(), task_callback, data, pool=pool)
    task.run_in_thread(lambda t, o: t.set_result(3))
    task.wait_thread()
    assert data.calls == 1 and pool.queued == 0
    assert task.deferred.result == 3


def test_wait_thread_misuse(pool: MemoryWorkerPool) -> None:
    plain: Task[None] = Task(Dummy())
    with pytest.raises(RuntimeError, match="not run in a thread"):
        plain.wait_thread()
    task: Task[None] = Task(Dummy(), pool=pool)
    task.run_in_thread(lambda t, o: None)
    pool.run_until_idle()
    with pytest.raises(RuntimeError, match="already completed"):
        task.wait_thread()


async def test_wait_thread_real_threads(reactor: Any) -> None:
    """Blocks until the worker exits, runs func inline; the posted completion is a no-op."""
    data = TaskData()
    worker_thread: list[int] = []

    def worker(task: Task[Any], _: object) -> None:
        time.sleep(0.05)  # a worker that is still running when wait_thread() is called
        worker_thread.append(threading.get_ident())
        task.set_result("slow")

    task: Task[str] = Task(Dummy(), task_callback, data, task_data_free)
    task.run_in_thread(worker)
    task.wait_thread()
    assert data.calls == 1 and data.freed
    assert data.thread == threading.get_ident()
    assert worker_thread[0] != threading.get_ident()
    assert task.deferred.result == "slow"
    await ttask.deferLater(reactor, 0.05)  # the posted completion arrives now
    assert data.calls == 1


# ---------------------------------------------------------------------------
# Errors, results, destroy notifiers
# ---------------------------------------------------------------------------


def test_set_error_first_wins_and_none_is_ignored() -> None:
    task: Task[None] = Task(Dummy())
    first, second = ValueError("first"), ValueError("second")
    task.set_error(None)
    assert not task.has_error
    task.set_error(first)
    task.set_error(second)
    task.set_error(None)
    assert task.propagate_error() is first
    assert task.propagate_error() is None  # moved out
    assert not task.has_error


def test_set_result_overwrites_without_destroying_previous() -> None:
    destroyed: list[str] = []
    task: Task[str] = Task(Dummy())
    task.set_result("one", destroyed.append)
    task.set_result("two", destroyed.append)
    assert task.get_result() == "two"
    assert destroyed == []
    task.complete()
    assert destroyed == ["two"]  # QEMU: only the final result's notifier, at free


def test_destroy_notifiers_run_once_in_qemu_order(pool: MemoryWorkerPool) -> None:
    order: list[str] = []
    task: Task[str] = Task(
        Dummy(),
        lambda t, o: order.append("func"),
        "task-opaque",
        lambda o: order.append(o),
        pool=pool,
    )

    def worker(t: Task[Any], opaque: str) -> None:
        order.append("worker")
        t.set_result("result", lambda r: order.append(r))

    task.run_in_thread(worker, "thread-opaque", lambda o: order.append(o))
    pool.run_until_idle()
    assert order == ["worker", "func", "thread-opaque", "task-opaque", "result"]
    pool.flush()
    assert order == ["worker", "func", "thread-opaque", "task-opaque", "result"]


def test_worker_exception_becomes_the_error(pool: MemoryWorkerPool) -> None:
    data = TaskData()
    task: Task[None] = Task(Dummy(), task_callback, data, pool=pool)
    boom = KeyError("boom")

    def worker(t: Task[Any], _: object) -> None:
        raise boom

    task.run_in_thread(worker)
    pool.run_until_idle()
    assert data.err is boom


def test_complete_misuse(pool: MemoryWorkerPool) -> None:
    task: Task[None] = Task(Dummy())
    task.complete()
    with pytest.raises(RuntimeError, match="already completed"):
        task.complete()
    threaded: Task[None] = Task(Dummy(), pool=pool)
    threaded.run_in_thread(lambda t, o: None)
    with pytest.raises(RuntimeError, match="worker is running"):
        threaded.complete()
    with pytest.raises(RuntimeError, match="called twice"):
        threaded.run_in_thread(lambda t, o: None)
    pool.run_until_idle()


def test_complete_after_worker_exit_before_delivery(pool: MemoryWorkerPool) -> None:
    """complete() between the worker exit and the posted completion wins; no double call."""
    data = TaskData()
    task: Task[None] = Task(Dummy(), task_callback, data, task_data_free, pool=pool)
    task.run_in_thread(lambda t, o: None)
    pool.perform()
    task.complete()
    pool.flush()
    assert data.calls == 1 and data.log == ["func", "destroy"]


# ---------------------------------------------------------------------------
# Deferred and await
# ---------------------------------------------------------------------------


def test_deferred_fires_after_func_with_result(pool: MemoryWorkerPool) -> None:
    order: list[str] = []
    task: Task[int] = Task(Dummy(), lambda t, o: order.append("func"), pool=pool)
    task.deferred.addCallback(lambda r: order.append(f"deferred:{r}"))
    task.run_in_thread(lambda t, o: t.set_result(42))
    pool.run_until_idle()
    assert order == ["func", "deferred:42"]


def test_deferred_fails_with_the_error_even_if_func_propagated_it(
    pool: MemoryWorkerPool,
) -> None:
    data = TaskData()
    task: Task[None] = Task(Dummy(), task_callback, data, pool=pool)
    task.run_in_thread(worker_fail, data)
    pool.run_until_idle()
    assert isinstance(data.err, RuntimeError)
    caught: list[Any] = []
    task.deferred.addErrback(caught.append)
    assert caught[0].value is data.err


def test_deferred_created_after_completion() -> None:
    task: Task[str] = Task(Dummy())
    task.set_result("late")
    task.complete()
    assert task.deferred.result == "late"


async def test_await_task(reactor: Any) -> None:
    task: Task[int] = Task(Dummy())
    task.run_in_thread(lambda t, o: t.set_result(o * 2), 21)
    assert await task == 42


# ---------------------------------------------------------------------------
# Cancellation
# ---------------------------------------------------------------------------


def test_cancel_queued_worker_never_starts(pool: MemoryWorkerPool) -> None:
    data = TaskData()
    started: list[bool] = []
    thread_destroyed: list[object] = []
    task: Task[None] = Task(Dummy(), task_callback, data, task_data_free, pool=pool)
    task.run_in_thread(lambda t, o: started.append(True), "wo", thread_destroyed.append)
    task.cancel()
    assert task.cancelled
    assert data.calls == 1 and isinstance(data.err, TaskCancelledError)
    assert data.freed and thread_destroyed == ["wo"]
    assert pool.queued == 0
    assert pool.run_until_idle() == 0
    assert started == []
    assert data.calls == 1 and thread_destroyed == ["wo"]
    caught: list[Any] = []
    task.deferred.addErrback(caught.append)
    assert caught[0].check(TaskCancelledError)


def test_cancel_running_drops_result_and_frees_after_worker_exit(
    pool: MemoryWorkerPool,
) -> None:
    data = TaskData()
    seen: list[bool] = []
    destroyed: list[str] = []

    def worker(t: Task[Any], _: object) -> None:
        # The cancel arrives while the worker runs (with the memory pool the
        # worker runs in this thread, so it can be triggered from here).
        t.cancel()
        seen.append(t.cancelled)
        assert data.calls == 1  # the completion already ran, inside cancel()
        assert destroyed == []  # but nothing is freed while the worker runs
        t.set_result("late", destroyed.append)
        t.set_error(ValueError("late error"))

    task: Task[str] = Task(
        Dummy(), task_callback, data, lambda o: destroyed.append("task"), pool=pool
    )
    task.run_in_thread(worker, "wo", lambda o: destroyed.append("thread"))
    assert pool.perform()
    assert seen == [True]
    assert isinstance(data.err, TaskCancelledError)
    assert task.get_result() is None  # dropped
    assert destroyed == []
    assert pool.flush() == 1  # the worker's exit reaches the reactor thread
    assert destroyed == ["thread", "task", "late"]
    assert data.calls == 1
    task.deferred.addErrback(lambda f: f.trap(TaskCancelledError))


def test_cancel_keeps_an_error_already_set(pool: MemoryWorkerPool) -> None:
    """First error wins: a worker that failed before the cancel keeps its error."""
    data = TaskData()
    task: Task[None] = Task(Dummy(), task_callback, data, pool=pool)
    task.run_in_thread(worker_fail, data)
    pool.perform()  # failed, completion posted but not delivered
    task.cancel()
    assert isinstance(data.err, RuntimeError) and str(data.err) == "Testing fail"
    assert task.cancelled
    pool.flush()
    assert data.calls == 1
    task.deferred.addErrback(lambda f: f.trap(RuntimeError))


def test_cancel_after_finish_before_delivery_drops_result(pool: MemoryWorkerPool) -> None:
    data = TaskData()
    task: Task[int] = Task(Dummy(), task_callback, data, pool=pool)
    task.run_in_thread(lambda t, o: t.set_result(5))
    pool.perform()
    task.cancel()
    assert isinstance(data.err, TaskCancelledError)
    assert task.get_result() is None
    pool.flush()
    assert data.calls == 1
    task.deferred.addErrback(lambda f: f.trap(TaskCancelledError))


def test_cancel_after_completion_is_a_noop() -> None:
    data = TaskData()
    task: Task[None] = Task(Dummy(), task_callback, data)
    task.complete()
    task.cancel()
    assert data.calls == 1 and not task.cancelled and data.err is None


def test_cancelling_the_deferred_cancels_the_task(pool: MemoryWorkerPool) -> None:
    data = TaskData()
    started: list[bool] = []
    task: Task[None] = Task(Dummy(), task_callback, data, pool=pool)
    task.run_in_thread(lambda t, o: started.append(True))
    d = task.deferred
    d.cancel()
    assert task.cancelled
    assert data.calls == 1 and isinstance(data.err, TaskCancelledError)
    failures: list[Any] = []
    d.addErrback(failures.append)
    assert failures[0].check(defer.CancelledError)  # Twisted's convention for d.cancel()
    pool.run_until_idle()
    assert started == []


def test_timeout_via_add_timeout(pool: MemoryWorkerPool) -> None:
    clock = ttask.Clock()
    data = TaskData()
    task: Task[None] = Task(Dummy(), task_callback, data, pool=pool)
    task.run_in_thread(lambda t, o: None)
    d = task.deferred.addTimeout(2.0, clock)
    clock.advance(1.9)
    assert data.calls == 0
    clock.advance(0.2)
    assert task.cancelled and data.calls == 1
    failures: list[Any] = []
    d.addErrback(failures.append)
    assert failures[0].check(defer.TimeoutError)
    assert pool.run_until_idle() == 0  # the queued worker never started


def test_func_cancelling_its_own_deferred_is_harmless(pool: MemoryWorkerPool) -> None:
    task: Task[int] = Task(Dummy(), lambda t, o: t.deferred.cancel(), pool=pool)
    d = task.deferred
    task.run_in_thread(lambda t, o: t.set_result(1))
    pool.run_until_idle()  # must not raise AlreadyCalledError
    d.addErrback(lambda f: f.trap(defer.CancelledError))
    assert not task.cancelled


async def test_cancel_running_real_thread(reactor: Any) -> None:
    """A running worker is flagged, its late result dropped; destroy runs after it exits."""
    release = threading.Event()
    started = threading.Event()
    observed: list[bool] = []
    destroyed: list[tuple[str, bool]] = []
    data = TaskData()

    def worker(t: Task[Any], _: object) -> None:
        started.set()
        release.wait(5)
        observed.append(t.cancelled)
        t.set_result("late")

    task: Task[str] = Task(Dummy(), task_callback, data)
    task.run_in_thread(worker, "wo", lambda o: destroyed.append((o, release.is_set())))
    await settle(reactor, started.is_set)
    task.cancel()
    assert data.calls == 1 and isinstance(data.err, TaskCancelledError)
    assert data.thread == threading.get_ident()
    assert destroyed == []
    with pytest.raises(TaskCancelledError):
        await task
    release.set()
    await settle(reactor, lambda: bool(destroyed))
    assert observed == [True]
    assert destroyed == [("wo", True)]  # after the worker really exited
    assert data.calls == 1


async def test_timeout_real_thread(reactor: Any) -> None:
    release = threading.Event()
    exited = threading.Event()

    def worker(t: Task[Any], _: object) -> None:
        release.wait(5)
        exited.set()

    task: Task[None] = Task(Dummy())
    task.run_in_thread(worker)
    with pytest.raises(defer.TimeoutError):
        await task.deferred.addTimeout(0.05, reactor)
    assert task.cancelled
    release.set()
    await settle(reactor, exited.is_set)


# ---------------------------------------------------------------------------
# Pool limits and shutdown
# ---------------------------------------------------------------------------


def test_pool_full_fails_the_task_in_the_reactor_thread() -> None:
    pool = MemoryWorkerPool(max_queued=1)
    first: Task[None] = Task(Dummy(), pool=pool)
    first.run_in_thread(lambda t, o: None)
    data = TaskData()
    second: Task[None] = Task(Dummy(), task_callback, data, pool=pool)
    second.run_in_thread(lambda t, o: None)
    assert data.calls == 0  # not inline: completion is posted like any other
    pool.flush()
    assert isinstance(data.err, WorkerPoolFullError)
    pool.run_until_idle()


def test_memory_pool_stop_cancels_pending_tasks(pool: MemoryWorkerPool) -> None:
    data = TaskData()
    task: Task[None] = Task(Dummy(), task_callback, data, task_data_free, pool=pool)
    task.run_in_thread(lambda t, o: None)
    pool.stop()
    assert data.calls == 1 and data.freed
    assert isinstance(data.err, TaskCancelledError)
    assert "worker pool stopped" in str(data.err)
    late: Task[None] = Task(Dummy(), task_callback, TaskData(), pool=pool)
    late.run_in_thread(lambda t, o: None)
    pool.flush()
    assert late.deferred.called
    failures: list[Any] = []
    late.deferred.addErrback(failures.append)
    assert failures[0].check(WorkerPoolStoppedError)


async def test_worker_threads_are_named_and_bounded(reactor: Any) -> None:
    pool = ThreadWorkerPool(reactor, size=2, name="qio-test-worker")
    running = 0
    peak = 0
    lock = threading.Lock()
    both = threading.Event()
    names: set[str] = set()

    def worker(t: Task[Any], _: object) -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            names.add(threading.current_thread().name)
            if running == 2:
                both.set()
        both.wait(5)  # the first two jobs overlap for sure; a third never can
        time.sleep(0.005)  # stay busy a moment so a third job would overlap if the pool let it
        with lock:
            running -= 1

    try:
        tasks: list[Task[None]] = [Task(Dummy(), pool=pool) for _ in range(6)]
        for t in tasks:
            t.run_in_thread(worker)
        assert pool.thread_count == 2
        await defer.gatherResults([t.deferred for t in tasks], consumeErrors=True)
        assert peak == 2
        assert names == {"qio-test-worker-1", "qio-test-worker-2"}
    finally:
        pool.stop()
    assert pool.thread_count == 0


async def test_default_pool_threads_are_qio_workers(reactor: Any) -> None:
    pool = get_default_pool(reactor)
    assert get_default_pool() is pool
    task: Task[str] = Task(Dummy())
    task.run_in_thread(lambda t, o: t.set_result(threading.current_thread().name))
    name = await task
    assert name.startswith("qio-worker-")
    assert pool.size == 8


async def test_real_pool_max_queued(reactor: Any) -> None:
    pool = ThreadWorkerPool(reactor, size=1, max_queued=1)
    release = threading.Event()
    try:
        a: Task[None] = Task(Dummy(), pool=pool)
        a.run_in_thread(lambda t, o: release.wait(5))
        b: Task[None] = Task(Dummy(), pool=pool)
        b.run_in_thread(lambda t, o: None)
        c: Task[None] = Task(Dummy(), pool=pool)
        c.run_in_thread(lambda t, o: None)
        with pytest.raises(WorkerPoolFullError, match="max_queued=1"):
            await c
        release.set()
        await defer.gatherResults([a.deferred, b.deferred], consumeErrors=True)
    finally:
        release.set()
        pool.stop()


async def test_resizing_the_pool(reactor: Any) -> None:
    pool = ThreadWorkerPool(reactor, size=1)
    release = threading.Event()
    running = threading.Semaphore(0)

    def worker(t: Task[Any], _: object) -> None:
        running.release()
        release.wait(5)

    try:
        tasks: list[Task[None]] = [Task(Dummy(), pool=pool) for _ in range(3)]
        for t in tasks:
            t.run_in_thread(worker)
        assert running.acquire(timeout=5)
        assert pool.thread_count == 1 and pool.pending == 3
        pool.size = 3  # the two queued jobs get threads now
        assert running.acquire(timeout=5) and running.acquire(timeout=5)
        assert pool.thread_count == 3
        pool.size = 1  # surplus threads retire once idle
        release.set()
        await defer.gatherResults([t.deferred for t in tasks], consumeErrors=True)
        await settle(reactor, lambda: pool.thread_count == 1)
        with pytest.raises(ValueError):
            pool.size = 0
    finally:
        release.set()
        pool.stop()


class ThreadCallReactor(ttask.Clock):
    """A reactor stand-in: callFromThread queues, shutdown triggers are recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.thread_calls: list[Callable[[], object]] = []
        self.triggers: list[Any] = []
        self.lock = threading.Lock()

    def callFromThread(self, f: Callable[..., object], *args: object) -> None:
        with self.lock:
            self.thread_calls.append(lambda: f(*args))

    def addSystemEventTrigger(self, phase: str, event: str, f: Callable[[], object]) -> Any:
        handle = (phase, event, f)
        self.triggers.append(handle)
        return handle

    def removeSystemEventTrigger(self, handle: Any) -> None:
        self.triggers.remove(handle)

    def run_thread_calls(self) -> int:
        with self.lock:
            calls, self.thread_calls = self.thread_calls, []
        for call in calls:
            call()
        return len(calls)

    def shutdown(self) -> None:
        for phase, event, f in list(self.triggers):
            if (phase, event) == ("during", "shutdown"):
                self.triggers.remove((phase, event, f))
                f()


def test_shutdown_stops_the_pool_with_a_reactor_stand_in() -> None:
    """At 'during shutdown' the pool cancels pending tasks, drops queued work, joins threads."""
    reactor = ThreadCallReactor()
    pool = ThreadWorkerPool(reactor, size=1, name="qio-shutdown-test")
    started = threading.Event()
    order: list[str] = []
    running = TaskData()
    queued = TaskData()

    def cooperative(t: Task[Any], _: object) -> None:
        started.set()
        for _i in range(500):  # bounded: ~5 s
            if t.cancelled:
                order.append("worker saw cancel")
                return
            time.sleep(0.01)  # a cooperative worker polling task.cancelled (bounded loop)

    a: Task[None] = Task(Dummy(), task_callback, running, pool=pool)
    a.run_in_thread(cooperative, None, lambda o: order.append("thread destroy"))
    b: Task[None] = Task(Dummy(), task_callback, queued, task_data_free, pool=pool)
    b.run_in_thread(lambda t, o: order.append("queued ran"))
    assert started.wait(5)
    assert [t[:2] for t in reactor.triggers] == [("during", "shutdown")]

    reactor.shutdown()

    assert pool.stopped and pool.thread_count == 0
    assert not any(t.name.startswith("qio-shutdown-test") for t in threading.enumerate())
    assert isinstance(running.err, TaskCancelledError) and running.calls == 1
    assert isinstance(queued.err, TaskCancelledError) and queued.freed
    # The running worker's destroy ran after it exited, during stop() itself.
    assert order == ["worker saw cancel", "thread destroy"]
    assert reactor.triggers == []
    assert reactor.run_thread_calls() >= 0  # leftover wake-ups are harmless no-ops
    assert running.calls == 1 and queued.calls == 1


def test_process_exits_promptly_with_work_pending(tmp_path: Path) -> None:
    """A running and a queued worker at reactor shutdown must not hang the process."""
    script = tmp_path / "exit_check.py"
    script.write_text(
        textwrap.dedent(
            r"""
            import sys, threading, time
            from twisted.internet import task
            from qiotwisted import Task
            from qiotwisted.task import get_default_pool

            def say(line):  # one write per line: threads print concurrently
                sys.stdout.write(line + "\n")
                sys.stdout.flush()

            def cooperative(t, _):
                for _ in range(3000):   # up to 30 s unless cancelled
                    if t.cancelled:
                        say("worker saw cancel")
                        return
                    time.sleep(0.01)  # cooperative polling of task.cancelled (bounded loop)

            def func(t, name):
                say(name + " completed: " + type(t.propagate_error()).__name__)

            def main(reactor):
                get_default_pool(reactor).size = 1
                started = threading.Event()
                a = Task(None, func, "running")
                a.run_in_thread(lambda t, o: (started.set(), cooperative(t, o)))
                b = Task(None, func, "queued")
                b.run_in_thread(lambda t, o: say("queued worker ran"))
                started.wait(5)
                return task.deferLater(reactor, 0.05)

            task.react(main)
            """
        )
    )
    # A hang (a pool left running at exit) would raise TimeoutExpired here.
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=20, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "running completed: TaskCancelledError" in lines
    assert "queued completed: TaskCancelledError" in lines
    assert "worker saw cancel" in lines
    assert "queued worker ran" not in lines


# ---------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------


def events_named(events: Any) -> list[str]:
    return [e["event"] for e in events if e.get("log_namespace") == "qiotwisted.task"]


def test_trace_events_in_qemu_order(pool: MemoryWorkerPool, trace: None) -> None:
    with capturedLogs() as events:
        task: Task[None] = Task(Dummy(), pool=pool)
        task.run_in_thread(lambda t, o: None)
        pool.run_until_idle()
    assert events_named(events) == [
        "qio_task_new",
        "qio_task_thread_start",
        "qio_task_thread_run",
        "qio_task_thread_exit",
        "qio_task_thread_result",
        "qio_task_complete",
    ]
    for e in events:
        assert e["log_level"] is LogLevel.debug
        assert e["thread_id"] == threading.get_ident()
        assert e["task"] is task


def test_trace_events_are_off_by_default(pool: MemoryWorkerPool) -> None:
    with capturedLogs() as events:
        task: Task[None] = Task(Dummy(), pool=pool)
        task.run_in_thread(lambda t, o: None)
        pool.run_until_idle()
    assert events_named(events) == []


async def test_trace_thread_ids_real_threads(reactor: Any, trace: None) -> None:
    with capturedLogs() as events:
        task: Task[None] = Task(Dummy())
        task.run_in_thread(lambda t, o: None)
        await task
    by_name = {e["event"]: e["thread_id"] for e in events if "event" in e}
    me = threading.get_ident()
    assert by_name["qio_task_new"] == me
    assert by_name["qio_task_thread_start"] == me
    assert by_name["qio_task_thread_run"] != me
    assert by_name["qio_task_thread_exit"] == by_name["qio_task_thread_run"]
    assert by_name["qio_task_thread_result"] == me
    assert by_name["qio_task_complete"] == me


def test_wait_thread_trace(pool: MemoryWorkerPool, trace: None) -> None:
    task: Task[None] = Task(Dummy(), pool=pool)
    task.run_in_thread(lambda t, o: None)
    with capturedLogs() as events:
        task.wait_thread()
        pool.flush()
    assert events_named(events) == [
        "qio_task_thread_run",
        "qio_task_thread_exit",
        "qio_task_thread_source_cancel",
        "qio_task_thread_result",
        "qio_task_complete",
    ]


def failures(events: Any) -> list[Any]:
    return [e for e in events if e.get("log_failure") is not None]


def test_raising_func_is_logged_and_deferred_still_fires(pool: MemoryWorkerPool) -> None:
    freed: list[bool] = []

    def func(t: Task[Any], _: object) -> None:
        raise ZeroDivisionError("in func")

    with capturedLogs() as events:
        task: Task[int] = Task(Dummy(), func, None, lambda o: freed.append(True), pool=pool)
        task.run_in_thread(lambda t, o: t.set_result(9))
        pool.run_until_idle()
    logged = failures(events)
    assert len(logged) == 1
    assert logged[0]["log_failure"].check(ZeroDivisionError)
    assert logged[0]["log_level"] is LogLevel.critical
    assert task.deferred.result == 9
    assert freed == [True]


def test_raising_destroy_notifiers_are_logged_and_the_others_still_run() -> None:
    ran: list[str] = []

    def bad(o: object) -> None:
        ran.append(f"bad:{o}")
        raise OSError(f"destroy {o}")

    with capturedLogs() as events:
        task: Task[str] = Task(Dummy(), None, "opaque", bad)
        task.set_result("result", bad)
        task.complete()
    assert ran == ["bad:opaque", "bad:result"]
    logged = failures(events)
    assert [str(e["log_failure"].value) for e in logged] == ["destroy opaque", "destroy result"]


def test_worker_exception_after_cancel_is_logged(pool: MemoryWorkerPool) -> None:
    def worker(t: Task[Any], _: object) -> None:
        t.cancel()
        raise ValueError("worker failed after cancel")

    with capturedLogs() as events:
        task: Task[None] = Task(Dummy(), pool=pool)
        task.run_in_thread(worker)
        pool.run_until_idle()
    logged = failures(events)
    assert len(logged) == 1 and logged[0]["log_failure"].check(ValueError)
    task.deferred.addErrback(lambda f: f.trap(TaskCancelledError))


def test_worker_raising_cancellation_after_cancel_is_not_noise(pool: MemoryWorkerPool) -> None:
    def worker(t: Task[Any], _: object) -> None:
        t.cancel()
        raise TaskCancelledError()

    with capturedLogs() as events:
        task: Task[None] = Task(Dummy(), pool=pool)
        task.run_in_thread(worker)
        pool.run_until_idle()
    assert failures(events) == []
    task.deferred.addErrback(lambda f: f.trap(TaskCancelledError))


# ---------------------------------------------------------------------------
# Many tasks, and the example
# ---------------------------------------------------------------------------


async def test_many_tasks_complete_in_the_reactor_thread(reactor: Any) -> None:
    me = threading.get_ident()
    threads: set[int] = set()

    def func(t: Task[Any], _: object) -> None:
        threads.add(threading.get_ident())

    tasks: list[Task[int]] = []
    for i in range(300):
        t: Task[int] = Task(Dummy(), func)
        t.run_in_thread(lambda task, n: task.set_result(n * n), i)
        tasks.append(t)
    results = await defer.gatherResults([t.deferred for t in tasks], consumeErrors=True)
    assert results == [i * i for i in range(300)]
    assert threads == {me}


def test_example_task_threads() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "task_threads.py")],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    reactor_id = int(lines[0].split("thread=")[1].split()[0])

    def ids(kind: str) -> list[int]:
        return [int(ln.split("thread=")[1].split()[0]) for ln in lines if f": {kind}" in ln]

    workers, completions = ids("worker"), ids("completion")
    assert len(workers) == len(completions) == 12
    assert set(completions) == {reactor_id}  # every callback shares the reactor thread
    assert reactor_id not in workers
    assert len(set(workers)) > 1  # the four streams ran on several worker threads
    assert lines[-1] == "all streams done"
