"""Sending a recorded channel file into a plain socket with ``sendfile(2)``, in a thread.

Why: the channel path of ``qio send`` (1 MiB file reads in workers, then
``write_all`` from the reactor, which Twisted copies and sends in 128 KiB
pieces) costs CPU for every byte, and on a 2-core host that CPU is taken from
the QEMU destination that is loading the stream: ``benchmarks/bench_replay.py``
measured it at 0.40-1.06x a blocking stdlib sender.  ``sendfile`` moves the
page-cache pages into the socket without them entering Python.

Ownership: the thread works on a duplicate of the channel's socket and never
changes its (non-blocking) mode: it polls for room.  Nothing may be written
through the channel while the thread runs, so the caller hands the bytes that
must go first (a rewritten multifd init packet) to :meth:`SendfilePump.run`.
The caller closes the channel once the result has been delivered.
"""

from __future__ import annotations

import errno
import os
import select
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from twisted.internet.defer import Deferred

from ..channel import Channel, SocketChannel

__all__ = ["SendfilePump"]

#: Bytes per ``sendfile`` call: the kernel stops at the socket's free space anyway.
_STEP = 1 << 20
#: The thread looks at its stop flag at least this often while the socket is full.
_POLL_MS = 200
_LOST = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ECONNABORTED, errno.ENOTCONN})


class Planned(Protocol):
    """What a pump sends: a file, and the count of its bytes sent so far."""

    path: Path
    sent: int


class SendfilePump:
    """One channel's file, sent from *offset* to its end by a thread.

    The thread alone writes ``plan.sent`` (the bytes the socket took, *head*
    included, which stands in for as many bytes of the file); whoever shows
    progress may read it at any time.
    """

    def __init__(self, sock: Any, plan: Planned) -> None:
        self._sock = sock
        self._plan = plan
        self._path = plan.path
        self._stop = threading.Event()

    @classmethod
    def take(cls, channel: Channel, plan: Planned) -> SendfilePump | None:
        """A pump for a connected plain socket channel, or None (TLS, no sendfile, ...)."""
        if not hasattr(os, "sendfile") or type(channel) is not SocketChannel:
            return None
        transport: Any = channel.transport
        if transport is None or not hasattr(transport, "getHandle"):
            return None
        try:
            sock = transport.getHandle().dup()
        except OSError:
            return None
        return cls(sock, plan)

    def run(
        self,
        reactor: Any,
        head: bytes,
        offset: int,
        size: int,
        started: Deferred[None] | None = None,
    ) -> Deferred[int]:
        """Send *head*, then the file from *offset* up to *size*; fires with the bytes sent.

        Fails with a :class:`ConnectionError` that says what went wrong.
        *started*, if given, fires once the first 64 KiB (or everything, if
        less) went out, or fails with the same error.
        """
        done: Deferred[int] = Deferred()
        call = reactor.callFromThread
        first = min(size - offset + len(head), 1 << 16)

        def fire_started() -> None:
            if started is not None and not started.called:
                started.callback(None)

        def report(error: str | None) -> None:
            if error is None:
                fire_started()
                done.callback(self._plan.sent)
                return
            if started is not None and not started.called:
                started.errback(ConnectionError(error))
            done.errback(ConnectionError(error))

        def body() -> None:
            error: str | None = None
            try:
                error = self._send(head, offset, size, first, lambda: call(fire_started))
            except BaseException as e:  # delivered to the reactor, never lost
                error = f"sending failed: {e!r}"
            finally:
                self._sock.close()
            call(report, error)

        threading.Thread(target=body, name="qio-send-pump", daemon=True).start()
        return done

    def stop(self) -> None:
        """Make the thread end soon (within ``_POLL_MS``); thread-safe."""
        self._stop.set()

    # -- in the thread -------------------------------------------------------------------

    def _wait_room(self) -> bool:
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLOUT)
        while not self._stop.is_set():
            if poller.poll(_POLL_MS):
                return True
        return False

    def _send(
        self, head: bytes, offset: int, size: int, first: int, on_first: Callable[[], object]
    ) -> str | None:
        sock, plan = self._sock, self._plan
        view = memoryview(head)
        try:
            while view:
                try:
                    n = sock.send(view)
                except (BlockingIOError, InterruptedError):
                    if not self._wait_room():
                        return "stopped"
                    continue
                view = view[n:]
                plan.sent += n
            if plan.sent >= first:
                on_first()
            with open(self._path, "rb") as f:
                fd, out = f.fileno(), sock.fileno()
                while offset < size:
                    try:
                        n = os.sendfile(out, fd, offset, min(_STEP, size - offset))
                    except (BlockingIOError, InterruptedError):
                        if not self._wait_room():
                            return "stopped"
                        continue
                    if n == 0:
                        return None  # the file is shorter than planned: the caller says so
                    offset += n
                    was = plan.sent
                    plan.sent += n
                    if was < first <= plan.sent:
                        on_first()
        except OSError as e:
            if e.errno in _LOST:
                return "Unable to write to socket: Connection lost (reset by peer or closed)"
            return f"Unable to send {self._path.name}: {e.strerror or e}"
        return None
