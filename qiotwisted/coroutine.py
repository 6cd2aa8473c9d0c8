"""QEMU's coroutine model (``util/qemu-coroutine*.c``) on ``async``/``await`` and Deferreds.

A :class:`Coroutine` wraps an ``async def`` entry function.  Like QEMU's
``qemu_coroutine_enter``, :meth:`Coroutine.enter` runs it *synchronously, on
the caller's stack,* until it yields or returns; ``await coroutine_yield()``
hands control back to whoever entered it, and the next ``enter`` resumes it
there.  A coroutine may enter another one (the caller chain QEMU keeps in
``co->caller``), so ``in_coroutine()``, ``coroutine_self()`` and
``coroutine_entered()`` mean what they mean in QEMU.

Deferreds are the event source.  When a coroutine awaits a :class:`Deferred`
that has not fired (``await ch.read_all(n)``, ``await ch.wait(Condition.IN)``,
``await co_sleep(1)``...), control returns to whoever entered it, exactly as
``qio_channel_yield`` does, and the coroutine is re-entered when the Deferred
fires, with QEMU's ``aio_co_wake`` rule:

* fired outside any coroutine (the reactor delivering data, a timer, plain
  code): the coroutine is entered at once, inside the Deferred's callback;
* fired while another coroutine runs (it unlocked a mutex, wrote to a pipe
  whose reader waits, fired a Deferred by hand): the woken coroutine is queued
  on the *running* coroutine and entered right after that one yields or
  terminates, before the ``enter`` that ran it returns (QEMU's
  ``co_queue_wakeup``; queued coroutines run depth-first).

So no coroutine ever runs inside ``unlock()``/``next()``/``callback()``
called by another coroutine: wake-ups happen at the waker's next yield.

Errors are never lost.  An exception that escapes a coroutine during an
explicit :meth:`Coroutine.enter` propagates out of that ``enter``.  Whether or
not it did, it also fails :attr:`Coroutine.deferred` if someone asked for it;
an exception that nobody can see (the coroutine was resumed by the reactor
and nobody holds its Deferred) is logged with ``twisted.logger``.

The synchronisation primitives mirror ``util/qemu-coroutine-lock.c``:
:class:`CoMutex` (FIFO, on Twisted's :class:`DeferredLock`), :class:`CoQueue`
(a condition variable), :class:`CoRwLock` (fair reader/writer lock with
``upgrade``/``downgrade``), plus :func:`co_sleep` (on ``deferLater``) and the
wakeable :class:`CoSleep` (``QemuCoSleep``).

Thread contract: coroutines belong to the thread that enters them (normally
the reactor thread); the "current coroutine" is tracked per thread, as QEMU
does.  Nothing here is thread-safe: fire Deferreds from other threads with
``reactor.callFromThread``.

Stack depth: ``enter`` nests Python frames (about three per level), so nesting
is limited by the interpreter's recursion limit; a few hundred levels work
with the default limit (QEMU's test nests 128).

Per-switch trace events (``qemu_aio_coroutine_enter``, ``qemu_coroutine_yield``)
are deliberately not emitted: a ``Logger.debug`` call would cost more than the
switch itself.  Failures and lock leaks are logged.
"""

from __future__ import annotations

import _thread
from collections import deque
from collections.abc import Awaitable, Callable, Generator
from collections.abc import Coroutine as _CoroutineABC
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar, cast

from twisted.internet.defer import CancelledError, Deferred, DeferredLock
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from .errors import QIOError

__all__ = [
    "CoMutex",
    "CoQueue",
    "CoRwLock",
    "CoSleep",
    "Coroutine",
    "CoroutineError",
    "co_sleep",
    "coroutine_entered",
    "coroutine_self",
    "coroutine_yield",
    "in_coroutine",
]

_T = TypeVar("_T")


class CoroutineError(QIOError):
    """A coroutine was used against QEMU's rules (QEMU aborts; we raise).

    Messages follow QEMU's where it has one: "Co-routine re-entered
    recursively", "Co-routine is yielding to no one", "Co-routine was already
    scheduled".
    """


# ---- per-thread state ----------------------------------------------------------------


class _ThreadState:
    """The running coroutine of one thread (QEMU's ``current``); None = the leader."""

    __slots__ = ("current",)

    def __init__(self) -> None:
        self.current: Coroutine[Any] | None = None


# A bare _thread._local holding a slots object: a threading.local subclass
# costs ~100 ns per attribute access, several times per switch.
_tls = _thread._local()


def _thread_state() -> _ThreadState:
    try:
        state: _ThreadState = _tls.state
    except AttributeError:
        state = _tls.state = _ThreadState()
    return state


class _Leader:
    """Caller marker for a coroutine entered from outside any coroutine.

    QEMU uses a per-thread "leader" pseudo-coroutine for this; we only need a
    non-None value in ``Coroutine._caller`` so that ``entered`` is true.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return "<leader>"


_LEADER = _Leader()


class _YieldMarker:
    """What ``coroutine_yield`` hands to the driver; anything else yielded is a Deferred."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<coroutine_yield>"


_YIELD = _YieldMarker()


class _CoroutineYield:
    __slots__ = ()

    def __await__(self) -> Generator[Any, Any, Any]:
        state: _ThreadState | None = getattr(_tls, "state", None)
        if state is None or state.current is None:
            raise CoroutineError("Co-routine is yielding to no one")
        value = yield _YIELD
        if value is _YIELD:
            # Twisted's driver (Deferred.fromCoroutine, ensureDeferred) sends a
            # yielded non-Deferred straight back: the await happened in an async
            # function that Twisted, not a Coroutine, is driving.
            raise CoroutineError(
                "coroutine_yield() awaited outside its Coroutine's own stack "
                "(inside Deferred.fromCoroutine/ensureDeferred?)"
            )
        return value


_YIELD_AWAITABLE = _CoroutineYield()


def coroutine_yield() -> Awaitable[Any]:
    """``qemu_coroutine_yield``: ``await coroutine_yield()`` returns control to the enterer.

    The await completes when the coroutine is entered again, and evaluates to
    the value passed to that :meth:`Coroutine.enter` (None for a wake-up).
    Awaiting it outside a coroutine raises :class:`CoroutineError`
    ("Co-routine is yielding to no one").
    """
    return _YIELD_AWAITABLE


def coroutine_self() -> Coroutine[Any] | None:
    """``qemu_coroutine_self``: the running coroutine, or None outside coroutines.

    (QEMU returns a per-thread leader pseudo-coroutine outside coroutines;
    None is the Python spelling of "not in a coroutine".)
    """
    return _thread_state().current


def in_coroutine() -> bool:
    """``qemu_in_coroutine``: True while running inside a :class:`Coroutine`."""
    return _thread_state().current is not None


def coroutine_entered(co: Coroutine[Any]) -> bool:
    """``qemu_coroutine_entered``: *co* was entered and has not yielded since.

    True even while *co* has itself entered another coroutine.
    """
    return co._caller is not None


def _require_coroutine(what: str) -> Coroutine[Any]:
    co = _thread_state().current
    if co is None:
        raise CoroutineError(f"{what} must be called from a Coroutine")
    return co


# ---- the coroutine ---------------------------------------------------------------------


class Coroutine(Generic[_T]):
    """QEMU's ``Coroutine``: ``async def entry(value)`` driven by :meth:`enter`.

    ``Coroutine(entry)`` is ``qemu_coroutine_create``: nothing runs until the
    first :meth:`enter`, whose value becomes *entry*'s argument (QEMU's
    opaque).  See the module docstring for how Deferreds resume it.

    :param entry: an ``async def`` function (or any callable returning a
        coroutine) taking one argument.
    :param name: shown in ``repr`` and log events.

    Thread contract: enter it only from the thread that runs it (normally the
    reactor thread).
    """

    log = Logger()

    __slots__ = (
        "__weakref__",
        "_caller",
        "_coro",
        "_deferred",
        "_done",
        "_entry",
        "_failure",
        "_locks_held",
        "_on_fired",
        "_scheduled",
        "_throw",
        "_value",
        "_waiting",
        "_wakeup",
        "name",
    )

    def __init__(
        self,
        entry: Callable[[Any], _CoroutineABC[Any, Any, _T]],
        *,
        name: str | None = None,
    ) -> None:
        if not callable(entry):
            raise TypeError(f"Coroutine entry must be callable, not {entry!r}")
        self.name = name
        self._entry: Callable[[Any], _CoroutineABC[Any, Any, _T]] | None = entry
        self._coro: _CoroutineABC[Any, Any, _T] | None = None
        # Who entered us and has not been yielded to yet (QEMU's co->caller).
        self._caller: Coroutine[Any] | _Leader | None = None
        # The Deferred we are suspended on, if any.
        self._waiting: Deferred[Any] | None = None
        # Woken and queued on another coroutine's wakeup list, not yet run.
        self._scheduled = False
        # What to raise inside the coroutine when it next runs (a failed Deferred).
        self._throw: BaseException | None = None
        # Coroutines woken while we ran (QEMU's co_queue_wakeup), run when we yield.
        self._wakeup: list[Coroutine[Any]] | None = None
        self._done = False
        self._value: _T | None = None
        self._failure: Failure | None = None
        self._deferred: Deferred[_T] | None = None
        self._locks_held = 0
        # Bound once: it is added to every Deferred the coroutine awaits.
        self._on_fired = self._deferred_fired

    # ---- state -----------------------------------------------------------------

    @property
    def entered(self) -> bool:
        """``qemu_coroutine_entered(co)``."""
        return self._caller is not None

    @property
    def done(self) -> bool:
        """True once the entry function has returned or raised."""
        return self._done

    @property
    def waiting(self) -> Deferred[Any] | None:
        """The Deferred this coroutine is suspended on, or None."""
        return self._waiting

    @property
    def result(self) -> _T:
        """The entry's return value; re-raises its exception.

        Raises :class:`CoroutineError` if the coroutine has not terminated.
        """
        if not self._done:
            raise CoroutineError(f"{self!r} has not terminated")
        if self._failure is not None:
            self._failure.raiseException()
        # Terminated without a failure: _value holds the entry's return value.
        return cast(_T, self._value)

    @property
    def deferred(self) -> Deferred[_T]:
        """A Deferred that fires with the entry's return value or exception.

        The same Deferred on every access.  Once you have asked for it, you own
        its errors: an exception also raised out of an explicit :meth:`enter`
        still fails it.  Cancelling it cancels the Deferred the coroutine is
        awaiting (so :class:`CancelledError` is raised there), or throws
        :class:`CancelledError` in at the ``coroutine_yield`` it is suspended in,
        or stops a coroutine that was never entered from ever starting.  A
        coroutine that is running or already queued to run is not interrupted.
        """
        d = self._deferred
        if d is None:
            d = self._deferred = Deferred(self._cancel)
            if self._done:
                self._deliver()
        return d

    def __repr__(self) -> str:
        if self._done:
            state = "terminated"
        elif self._caller is not None:
            state = "running"
        elif self._scheduled:
            state = "scheduled"
        elif self._waiting is not None:
            state = "waiting"
        elif self._coro is None:
            state = "created"
        else:
            state = "yielded"
        name = f" {self.name}" if self.name else ""
        return f"<Coroutine{name} at 0x{id(self):x} {state}>"

    # ---- entering ----------------------------------------------------------------

    def enter(self, value: Any = None) -> None:
        """``qemu_coroutine_enter``: run the coroutine now, in this stack.

        Returns when it yields, awaits an unfired Deferred, or terminates, and
        after every coroutine it woke meanwhile has run in turn.  The first
        ``enter`` calls ``entry(value)``; later ones make the pending
        ``await coroutine_yield()`` evaluate to *value*.  An exception escaping
        the entry function propagates out of here.

        Raises :class:`CoroutineError` if the coroutine is running (entered,
        directly or up the caller chain: "re-entered recursively"), has
        terminated, is awaiting a Deferred (the Deferred resumes it), or is
        already queued to run.
        """
        if self._caller is not None or self._done or self._scheduled or self._waiting is not None:
            self._check_enterable()
        self._run(value, None, explicit=True)

    def enter_if_inactive(self, value: Any = None) -> None:
        """``qemu_coroutine_enter_if_inactive``: enter unless already entered."""
        if self._caller is None:
            self.enter(value)

    def start(self, value: Any = None) -> Deferred[_T]:
        """Enter (normally the first time) and return :attr:`deferred`.

        The ``Deferred.fromCoroutine`` of this module: like :meth:`enter`, but
        an exception escaping the coroutine goes to the Deferred instead of
        propagating.  Same :class:`CoroutineError` checks as :meth:`enter`.
        """
        d = self.deferred
        self._check_enterable()
        self._run(value, None, explicit=False)
        return d

    def wake(self) -> None:
        """``aio_co_wake``: enter now if outside coroutines, else after the current one yields.

        For coroutines suspended in ``await coroutine_yield()``; the await
        evaluates to None.  Same errors as :meth:`enter`.
        """
        self._check_enterable()
        current = _thread_state().current
        if current is None:
            self._run(None, None, explicit=False)
        else:
            self._queue_on(current)

    def _check_enterable(self) -> None:
        if self._caller is not None:
            raise CoroutineError(f"Co-routine re-entered recursively: {self!r}")
        if self._done:
            raise CoroutineError(f"Co-routine has already terminated: {self!r}")
        if self._scheduled:
            raise CoroutineError(f"Co-routine was already scheduled: {self!r}")
        if self._waiting is not None:
            raise CoroutineError(
                f"Co-routine is waiting for a Deferred and is entered when it fires: {self!r}"
            )

    def _queue_on(self, current: Coroutine[Any]) -> None:
        self._scheduled = True
        wakeup = current._wakeup
        if wakeup is None:
            current._wakeup = [self]
        else:
            wakeup.append(self)

    def _run(
        self,
        value: Any,
        throw: BaseException | None,
        *,
        explicit: bool,
        state: _ThreadState | None = None,
    ) -> None:
        """Run self, then the coroutines queued on it, depth-first (``qemu_aio_coroutine_enter``).

        With *explicit*, an exception escaping *self* is re-raised once the
        queue has drained; exceptions of queued coroutines never escape here.
        """
        if state is None:
            state = _thread_state()
        prev = state.current
        caller: Coroutine[Any] | _Leader = _LEADER if prev is None else prev
        co: Coroutine[Any] = self
        pending: deque[Coroutine[Any]] | None = None
        to_raise: Failure | None = None
        while True:
            co._caller = caller
            state.current = co
            try:
                # The switch (QEMU's qemu_coroutine_switch), inlined: it is the hot path.
                coro = co._coro
                if coro is None:
                    coro = co._start(value, throw)
                    value = throw = None
                while coro is not None:
                    try:
                        if throw is None:
                            yielded = coro.send(value)
                        else:
                            exc, throw = throw, None
                            yielded = coro.throw(exc)
                    except StopIteration as e:
                        co._terminate(e.value, None)
                        break
                    except Exception:
                        co._terminate(None, Failure())
                        break
                    except BaseException:
                        # KeyboardInterrupt, SystemExit: not ours to deliver; just stop.
                        co._done = True
                        co._coro = None
                        raise
                    if yielded is _YIELD:
                        break
                    if type(yielded) is Deferred or isinstance(yielded, Deferred):
                        co._waiting = yielded
                        yielded.addBoth(co._on_fired)
                        if co._waiting is yielded:
                            break
                        # It fired inside addBoth (a paused Deferred resumed): go on.
                        value = None
                        throw, co._throw = co._throw, None
                        continue
                    throw = TypeError(
                        f"a Coroutine can await Deferreds, coroutine_yield() and async "
                        f"functions built on them, not {yielded!r}"
                    )
            finally:
                state.current = prev
                co._caller = None
            if co._done:
                failure = co._failure
                delivered = co._deliver()
                if failure is not None:
                    if explicit and co is self:
                        to_raise = failure
                    elif not delivered:
                        co._report(failure)
            wakeup = co._wakeup
            if wakeup:
                co._wakeup = None
                if pending is None:
                    pending = deque()
                # Depth-first: what co just woke runs before older pending entries.
                pending.extendleft(reversed(wakeup))
            if not pending:
                break
            co = pending.popleft()
            co._scheduled = False
            if co._caller is not None or co._done:
                raise CoroutineError(f"queued coroutine cannot run: {co!r}")
            value = None
            throw, co._throw = co._throw, None
        if to_raise is not None:
            to_raise.raiseException()

    def _start(self, value: Any, throw: BaseException | None) -> _CoroutineABC[Any, Any, _T] | None:
        """First entry: call ``entry(value)``; None if the coroutine terminated instead."""
        entry = self._entry
        assert entry is not None
        self._entry = None
        if throw is not None:
            self._terminate(None, Failure(throw))
            return None
        try:
            coro = entry(value)
            if not isinstance(coro, _CoroutineABC):
                raise TypeError(
                    f"Coroutine entry {entry!r} returned {coro!r}, not a coroutine; "
                    "use an async def function"
                )
        except Exception:
            self._terminate(None, Failure())
            return None
        self._coro = coro
        return coro

    def _deferred_fired(self, result: object) -> object:
        """Resume the coroutine with QEMU's ``aio_co_wake`` rule (module docstring).

        A value stays on the Deferred: the coroutine's ``await`` (``Deferred.__iter__``)
        reads it from there when it runs, now or once queued.  A Failure is
        taken off it (the chain continues with None, so it is not reported
        as unhandled) and thrown into the coroutine, as Twisted's own
        coroutine driver does.
        """
        if self._waiting is None:
            return result  # not ours any more (cannot happen: enter() refuses a waiter)
        self._waiting = None
        throw: BaseException | None = None
        if isinstance(result, Failure):
            exc = result.value
            assert exc is not None
            throw = exc.with_traceback(result.tb)
            result = None
        if self._caller is not None:
            # Fired inside addBoth, while _step is still setting up the wait.
            self._throw = throw
            return result
        try:
            state: _ThreadState = _tls.state
        except AttributeError:
            state = _thread_state()
        current = state.current
        if current is not None:
            self._throw = throw
            self._queue_on(current)
            return result
        self._run(None, throw, explicit=False, state=state)
        return result

    def _terminate(self, value: Any, failure: Failure | None) -> None:
        self._done = True
        self._coro = None
        self._value = value
        self._failure = failure
        if self._locks_held:
            self.log.error(
                "qemu_coroutine_terminate: {coroutine!r} terminated holding {locks} lock(s)",
                coroutine=self,
                locks=self._locks_held,
            )

    def _deliver(self) -> bool:
        """Fire :attr:`deferred` with the outcome if someone holds it; True if it took it."""
        d = self._deferred
        if d is None or d.called:
            return False
        if self._failure is not None:
            d.errback(self._failure)
        else:
            d.callback(cast(_T, self._value))  # terminated: the entry's return value
        return True

    def _report(self, failure: Failure) -> None:
        if failure.check(CancelledError) and self._deferred is not None:
            return  # its Deferred was cancelled, and this is the expected outcome
        self.log.failure(
            "Coroutine {coroutine!r} raised and nobody holds its deferred",
            failure=failure,
            coroutine=self,
        )

    def _cancel(self, d: Deferred[_T]) -> None:
        if self._done or self._caller is not None or self._scheduled:
            return
        waiting = self._waiting
        if waiting is not None:
            waiting.cancel()
        else:
            # Never entered (it terminates without starting) or suspended in
            # coroutine_yield (CancelledError is raised there).
            self._run(None, CancelledError(), explicit=False)


# ---- CoMutex -----------------------------------------------------------------------------


class CoMutex:
    """QEMU's ``CoMutex``: a FIFO lock for coroutines.

    Built on Twisted's :class:`DeferredLock`, which already gives the lock to
    the first waiter (FIFO) on release and fires that waiter's Deferred
    synchronously; since a coroutine woken by a Deferred fired inside another
    coroutine is queued (``aio_co_wake``), the waiter runs after the
    unlocking coroutine yields, never inside :meth:`unlock`.  What this class
    adds is what ``DeferredLock`` has no notion of: the holder (QEMU asserts
    that only the holder unlocks) and the coroutine-context checks.

    ``async with mutex:`` locks and unlocks.  Thread contract: one thread.
    """

    __slots__ = ("_holder", "_lock")

    def __init__(self) -> None:
        self._lock = DeferredLock()
        self._holder: Coroutine[Any] | None = None

    @property
    def locked(self) -> bool:
        """True while held, or handed to a waiter that has not run yet."""
        return self._lock.locked

    @property
    def holder(self) -> Coroutine[Any] | None:
        return self._holder

    async def lock(self) -> None:
        """``qemu_co_mutex_lock``: coroutine_fn; await it directly from a Coroutine.

        Returns at once when free; otherwise waits in FIFO order.  Cancelling
        the wait (via :attr:`Coroutine.deferred`) leaves the queue.
        """
        co = _require_coroutine("CoMutex.lock")
        await self._lock.acquire()
        self._holder = co
        co._locks_held += 1

    def unlock(self) -> None:
        """``qemu_co_mutex_unlock``: release; the next waiter runs after we yield.

        Raises :class:`CoroutineError` outside a coroutine, when not locked, or
        when the caller is not the holder.
        """
        co = _require_coroutine("CoMutex.unlock")
        if not self._lock.locked or self._holder is None:
            raise CoroutineError("CoMutex is not locked")
        if self._holder is not co:
            raise CoroutineError(f"CoMutex held by {self._holder!r}, unlocked by {co!r}")
        self._holder = None
        co._locks_held -= 1
        self._lock.release()

    def assert_locked(self) -> None:
        """``qemu_co_mutex_assert_locked``: the current coroutine holds it."""
        if (
            not self._lock.locked
            or self._holder is None
            or self._holder is not _thread_state().current
        ):
            raise CoroutineError("CoMutex is not held by the current coroutine")

    async def __aenter__(self) -> CoMutex:
        await self.lock()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.unlock()


# ---- CoQueue -------------------------------------------------------------------------------


class SyncLock(Protocol):
    """A thread-style lock (``threading.Lock``): what QEMU's QemuMutex is to a QemuLockable."""

    def acquire(self) -> bool: ...

    def release(self) -> None: ...


def _unlock_any(lock: CoMutex | SyncLock) -> None:
    if isinstance(lock, CoMutex):
        lock.unlock()
    else:
        lock.release()


async def _lock_any(lock: CoMutex | SyncLock) -> None:
    if isinstance(lock, CoMutex):
        await lock.lock()
    else:
        lock.acquire()


class CoQueue:
    """QEMU's ``CoQueue``: a condition variable for coroutines.

    Twisted's :class:`DeferredQueue` is a producer/consumer queue of values,
    not a condition variable (no lock hand-off, no front insertion, no
    "wake everyone"), so this is a small FIFO of waiter Deferreds.  A waiter
    is woken by firing its Deferred, which resumes it under the
    ``aio_co_wake`` rule: queued after the current coroutine when woken from a
    coroutine (:meth:`next`, :meth:`restart_all`), at once when woken from
    outside (:meth:`enter_next`, :meth:`enter_all`).

    Thread contract: one thread.
    """

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: deque[Deferred[None]] = deque()

    async def wait(self, lock: CoMutex | SyncLock | None = None, *, front: bool = False) -> None:
        """``qemu_co_queue_wait`` (``_flags(CO_QUEUE_WAIT_FRONT)`` with *front*).

        coroutine_fn: await it directly from a Coroutine.  Queues the current
        coroutine, releases *lock* (a :class:`CoMutex` or a ``threading.Lock``),
        waits to be woken, and re-takes *lock* before returning, also when the
        wait is cancelled.
        """
        _require_coroutine("CoQueue.wait")
        d: Deferred[None] = Deferred(self._forget)
        if front:
            self._entries.appendleft(d)
        else:
            self._entries.append(d)
        if lock is not None:
            _unlock_any(lock)
        try:
            await d
        finally:
            if lock is not None:
                await _lock_any(lock)

    def _forget(self, d: Deferred[None]) -> None:
        try:
            self._entries.remove(d)
        except ValueError:
            pass  # already woken; the cancel is a no-op then

    def next(self) -> bool:
        """``qemu_co_queue_next``: wake the first waiter; False if there was none."""
        if not self._entries:
            return False
        self._entries.popleft().callback(None)
        return True

    def restart_all(self) -> None:
        """``qemu_co_queue_restart_all``: wake every waiter queued now.

        Only the waiters present on entry are woken (a woken coroutine that
        runs at once and waits again is not woken twice), so this always ends.
        """
        for _ in range(len(self._entries)):
            if not self._entries:
                break
            self._entries.popleft().callback(None)

    def enter_next(self, lock: SyncLock | None = None) -> bool:
        """``qemu_co_enter_next``: wake the first waiter, releasing *lock* around it.

        Outside coroutines the waiter runs before this returns.
        """
        if not self._entries:
            return False
        d = self._entries.popleft()
        if lock is not None:
            lock.release()
        try:
            d.callback(None)
        finally:
            if lock is not None:
                lock.acquire()
        return True

    def enter_all(self, lock: SyncLock | None = None) -> None:
        """``qemu_co_enter_all``: :meth:`enter_next` for every waiter queued now."""
        for _ in range(len(self._entries)):
            if not self.enter_next(lock):
                break

    def empty(self) -> bool:
        """``qemu_co_queue_empty``."""
        return not self._entries

    def __len__(self) -> int:
        return len(self._entries)


# ---- CoRwLock ------------------------------------------------------------------------------


class _Ticket:
    __slots__ = ("d", "read")

    def __init__(self, read: bool) -> None:
        self.read = read
        self.d: Deferred[None] = Deferred()


class CoRwLock:
    """QEMU's ``CoRwlock``: a fair reader/writer lock for coroutines.

    ``owners`` counts readers, or is -1 for a writer.  Waiters queue as
    tickets in arrival order; a queued writer blocks new readers (fairness),
    and a woken reader wakes the next reader in line.  Twisted has no
    reader/writer lock, so this is written out; each ticket is a Deferred, so
    wake-ups follow the ``aio_co_wake`` rule and a cancelled ticket leaves the
    line (letting the ones behind it proceed).  QEMU's internal CoMutex only
    guards against other threads and is not needed here.

    Thread contract: one thread.
    """

    __slots__ = ("_owners", "_tickets")

    def __init__(self) -> None:
        self._owners = 0
        self._tickets: deque[_Ticket] = deque()

    @property
    def owners(self) -> int:
        """Number of readers holding the lock, -1 for a writer, 0 when free."""
        return self._owners

    def _queue(self, read: bool) -> Deferred[None]:
        ticket = _Ticket(read)
        ticket.d = Deferred(lambda _: self._cancel_ticket(ticket))
        self._tickets.append(ticket)
        return ticket.d

    def _cancel_ticket(self, ticket: _Ticket) -> None:
        try:
            self._tickets.remove(ticket)
        except ValueError:
            return
        self._maybe_wake_one()

    def _maybe_wake_one(self) -> None:
        """Grant the head ticket if it can run now; the lock is accounted before it runs."""
        if not self._tickets:
            return
        ticket = self._tickets[0]
        if ticket.read:
            if self._owners < 0:
                return
            self._owners += 1
        else:
            if self._owners != 0:
                return
            self._owners = -1
        self._tickets.popleft()
        ticket.d.callback(None)

    async def rdlock(self) -> None:
        """``qemu_co_rwlock_rdlock``: coroutine_fn; shared access."""
        co = _require_coroutine("CoRwLock.rdlock")
        if self._owners == 0 or (self._owners > 0 and not self._tickets):
            self._owners += 1
        else:
            await self._queue(read=True)
            # Possibly let the next reader in line in too; it does the same.
            self._maybe_wake_one()
        co._locks_held += 1

    async def wrlock(self) -> None:
        """``qemu_co_rwlock_wrlock``: coroutine_fn; exclusive access."""
        co = _require_coroutine("CoRwLock.wrlock")
        if self._owners == 0:
            self._owners = -1
        else:
            await self._queue(read=False)
        co._locks_held += 1

    async def upgrade(self) -> None:
        """``qemu_co_rwlock_upgrade``: coroutine_fn; a reader becomes the writer.

        A sole reader with nobody queued upgrades at once.  Otherwise it gives
        up its read share, queues as a writer behind those already waiting,
        and sleeps; so another writer may run in between.  If the wait is
        cancelled the coroutine holds nothing any more.
        """
        co = _require_coroutine("CoRwLock.upgrade")
        if self._owners <= 0:
            raise CoroutineError("CoRwLock.upgrade without a read lock")
        if self._owners == 1 and not self._tickets:
            self._owners = -1
            return
        self._owners -= 1
        d = self._queue(read=False)
        self._maybe_wake_one()
        try:
            await d
        except BaseException:
            co._locks_held -= 1
            raise

    def downgrade(self) -> None:
        """``qemu_co_rwlock_downgrade``: the writer becomes a reader; never blocks."""
        _require_coroutine("CoRwLock.downgrade")
        if self._owners != -1:
            raise CoroutineError("CoRwLock.downgrade without the write lock")
        self._owners = 1
        self._maybe_wake_one()

    def unlock(self) -> None:
        """``qemu_co_rwlock_unlock``: drop a read share or the write lock; wake who can run."""
        co = _require_coroutine("CoRwLock.unlock")
        if self._owners > 0:
            self._owners -= 1
        elif self._owners == -1:
            self._owners = 0
        else:
            raise CoroutineError("CoRwLock.unlock of an unlocked lock")
        co._locks_held -= 1
        self._maybe_wake_one()


# ---- sleeping --------------------------------------------------------------------------------


def _resolve_clock(clock: IReactorTime | None) -> IReactorTime:
    if clock is None:
        from twisted.internet import reactor

        return reactor
    return clock


def co_sleep(seconds: float, *, clock: IReactorTime | None = None) -> Deferred[None]:
    """``qemu_co_sleep_ns``: a Deferred that fires after *seconds* on *clock*.

    Plain :func:`twisted.internet.task.deferLater`: awaiting it from a
    Coroutine suspends it exactly like QEMU's timer + yield, and it works in
    any other async code too.  Cancelling it removes the timer.
    *clock* defaults to the global reactor, resolved at call time.
    """
    return deferLater(_resolve_clock(clock), seconds)


class CoSleep:
    """``QemuCoSleep``: a sleep that another party can cut short with :meth:`wake`.

    ``deferLater`` cannot be woken early (cancelling it is a failure, not a
    wake-up), so this keeps its own timer.  One sleeper at a time.

    Thread contract: one thread; *clock* defaults to the global reactor.
    """

    __slots__ = ("_call", "_clock", "_waiter")

    def __init__(self, *, clock: IReactorTime | None = None) -> None:
        self._clock = clock
        self._waiter: Deferred[bool] | None = None
        self._call: IDelayedCall | None = None

    @property
    def sleeping(self) -> bool:
        return self._waiter is not None

    def sleep(self, seconds: float | None = None) -> Deferred[bool]:
        """``qemu_co_sleep_ns_wakeable`` (``qemu_co_sleep`` with *seconds* None).

        Fires True when woken by :meth:`wake`, False when *seconds* elapsed.
        Cancelling it stops the timer.  Raises :class:`CoroutineError` if
        somebody already sleeps here.
        """
        if self._waiter is not None:
            raise CoroutineError("CoSleep already has a sleeper")
        d: Deferred[bool] = Deferred(self._cancel)
        self._waiter = d
        if seconds is not None:
            self._call = _resolve_clock(self._clock).callLater(seconds, self._fire, False)
        return d

    def wake(self) -> bool:
        """``qemu_co_sleep_wake``: end the current sleep now; False if nobody sleeps."""
        if self._waiter is None:
            return False
        self._fire(True)
        return True

    def _fire(self, woken: bool) -> None:
        d, self._waiter = self._waiter, None
        self._stop_timer()
        if d is not None:
            d.callback(woken)

    def _stop_timer(self) -> None:
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

    def _cancel(self, d: Deferred[bool]) -> None:
        if self._waiter is d:
            self._waiter = None
            self._stop_timer()
