"""The limits ``twistd qio record`` and ``proxy`` enforce, with safe defaults.

A migration service faces whatever connects to it, so every resource it hands
out is bounded: connections (in total and per peer address), concurrent
sessions, time (to identify oneself, and between two bytes), the disk (a
session is neither started nor continued below a free-space floor) and the
worker pool (a bounded queue; see :class:`~qiotwisted._pool.ThreadWorkerPool`).

The pieces here are small and reactor-thread only:

* :class:`Limits`, the configuration (``0`` turns a limit off);
* :class:`ConnectionLimiter`, admission by count, total and per peer;
* :class:`IdleWatchdog`, one timer per channel that fires when no data arrived
  for a while (one ``DelayedCall`` per period, not one per read);
* :class:`FreeSpace`, ``statvfs`` of the output filesystem in a worker thread,
  bounded by a timeout (a hung network filesystem must not wedge the service).

Refusals never write a byte to the peer: a QEMU 7.2 source that receives
anything drops the end of its stream (``qemu-interop.md`` trap 1).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from .._pool import WorkerPool

__all__ = [
    "ConnectionLimiter",
    "FreeSpace",
    "IdleWatchdog",
    "Limits",
    "RateWatchdog",
    "format_size",
    "parse_size",
]

GiB = 1 << 30


@dataclass(frozen=True)
class Limits:
    """What a migration service allows; ``0`` means no limit for any field.

    :ivar handshake_timeout: seconds a new connection has to identify itself:
        the TLS handshake, then (separately timed) the first bytes of the
        migration stream (the magic; for multifd the whole 64-byte init packet).
    :ivar idle_timeout: seconds a channel may send nothing before it is closed.
    :ivar max_connections: connections open at once, all peers together.
    :ivar max_connections_per_peer: connections open at once from one address
        (a multifd migration uses 1 + ``multifd-channels``).
    :ivar max_sessions: sessions (migrations) recorded at once.
    :ivar min_free_space: bytes that must stay free on the output filesystem:
        below it no session starts, and running ones are stopped.
    :ivar disk_check_interval: seconds between free-space checks while a
        session is open.
    :ivar disk_check_timeout: seconds a free-space check may take; a check that
        hangs counts as failed (no session starts on an unknown disk).
    :ivar min_rate: bytes per second a session (all its channels together) must
        average over each *rate_window*, or it is stopped and filed incomplete:
        without it, sources that trickle a byte a second after their header
        would hold every ``max_sessions`` slot forever.
    :ivar rate_window: seconds over which *min_rate* is averaged.
    """

    handshake_timeout: float = 10.0
    idle_timeout: float = 60.0
    max_connections: int = 256
    max_connections_per_peer: int = 64
    max_sessions: int = 8
    min_free_space: int = GiB
    disk_check_interval: float = 5.0
    disk_check_timeout: float = 10.0
    min_rate: int = 1024
    rate_window: float = 60.0

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value < 0:
                raise ValueError(f"{name} must not be negative, not {value}")


class ConnectionLimiter:
    """Counts open connections, in total and per peer key; reactor thread only.

    :meth:`try_admit` either counts the connection and returns ``None``, or
    returns the reason it is refused (and counts nothing).  Every admitted
    connection must be released exactly once.
    """

    def __init__(self, max_total: int, max_per_peer: int) -> None:
        self.max_total = max_total
        self.max_per_peer = max_per_peer
        self.total = 0
        self._per_peer: dict[str, int] = {}

    def open_from(self, key: str) -> int:
        return self._per_peer.get(key, 0)

    def try_admit(self, key: str) -> str | None:
        if self.max_total and self.total >= self.max_total:
            return f"{self.total} connections open, max-connections is {self.max_total}"
        n = self._per_peer.get(key, 0)
        if self.max_per_peer and n >= self.max_per_peer:
            return (
                f"{n} connections open from {key}, max-connections-per-peer is {self.max_per_peer}"
            )
        self.total += 1
        self._per_peer[key] = n + 1
        return None

    def release(self, key: str) -> None:
        n = self._per_peer.get(key, 0)
        if n <= 0:
            raise RuntimeError(f"release() of {key!r} without a matching admission")
        self.total -= 1
        if n == 1:
            del self._per_peer[key]
        else:
            self._per_peer[key] = n - 1


class IdleWatchdog:
    """Calls ``on_idle()`` once when :meth:`touch` was not called for *timeout* seconds.

    The owner calls :meth:`touch` whenever data arrives (an attribute store:
    cheap enough for every read) and sets :attr:`busy` while it is the one not
    reading (waiting for the disk, say), which does not count as the peer being
    idle.  The single timer re-arms itself for the time left, so a busy channel
    costs one ``DelayedCall`` per *timeout*, not one per read.  *timeout* 0
    disables it.  Reactor thread only; :meth:`stop` before dropping it.
    """

    def __init__(self, clock: Any, timeout: float, on_idle: Callable[[], object]) -> None:
        self._clock = clock
        self.timeout = timeout
        self._on_idle = on_idle
        self._call: Any = None
        self.busy = False
        self.fired = False
        self.last = clock.seconds()

    def start(self) -> IdleWatchdog:
        if self.timeout > 0 and self._call is None and not self.fired:
            self.last = self._clock.seconds()
            self._call = self._clock.callLater(self.timeout, self._check)
        return self

    def touch(self) -> None:
        self.last = self._clock.seconds()

    def _check(self) -> None:
        self._call = None
        now = self._clock.seconds()
        if self.busy:
            self.last = now
        left = self.last + self.timeout - now
        if left > 0:
            self._call = self._clock.callLater(left, self._check)
            return
        self.fired = True
        self._on_idle()

    def stop(self) -> None:
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None


class RateWatchdog:
    """Calls ``on_slow(rate)`` once if fewer than *min_rate* bytes per second
    were :meth:`add`-ed over a *window*; reactor thread only.

    One timer per window, whatever the traffic; ``min_rate`` or ``window`` 0
    disables it.  :meth:`stop` before dropping it.
    """

    def __init__(
        self, clock: Any, window: float, min_rate: int, on_slow: Callable[[float], object]
    ) -> None:
        self._clock = clock
        self.window = window
        self.min_rate = min_rate
        self._on_slow = on_slow
        self._call: Any = None
        self.received = 0
        self.fired = False

    def start(self) -> RateWatchdog:
        if self.window > 0 and self.min_rate > 0 and self._call is None and not self.fired:
            self._call = self._clock.callLater(self.window, self._check)
        return self

    def add(self, nbytes: int) -> None:
        self.received += nbytes

    def _check(self) -> None:
        self._call = None
        rate = self.received / self.window
        self.received = 0
        if rate < self.min_rate:
            self.fired = True
            self._on_slow(rate)
            return
        self._call = self._clock.callLater(self.window, self._check)

    def stop(self) -> None:
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None


class FreeSpace:
    """Checks that the filesystem holding *path* keeps *minimum* bytes free.

    :meth:`check` runs ``statvfs`` (injectable: *statvfs*) in a worker thread
    and fires, in the reactor thread, with ``None`` when there is room or with
    the reason there is not.  It never fails: a ``statvfs`` that raises, hangs
    beyond *timeout* or cannot be queued (the worker pool is full) gives a
    reason too, since recording onto a disk of unknown state is what this
    guards against.  A hung ``statvfs`` keeps its worker thread (threads cannot
    be interrupted) but releases the caller.  *minimum* 0 skips the check.
    """

    log = Logger()

    def __init__(
        self,
        path: Path,
        minimum: int,
        *,
        timeout: float = 10.0,
        statvfs: Callable[[str], Any] = os.statvfs,
        pool: WorkerPool | None = None,
        reactor: Any = None,
    ) -> None:
        self.path = Path(path)
        self.minimum = minimum
        self.timeout = timeout
        self._statvfs = statvfs
        self._pool = pool
        self._reactor = reactor

    @property
    def reactor(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    def free_bytes(self) -> int:
        """Bytes available to us on *path*'s filesystem (worker thread: may block)."""
        # The output directory may not exist yet: ask about its nearest ancestor.
        probe = self.path
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        st = self._statvfs(str(probe))
        return int(st.f_bavail) * int(st.f_frsize)

    def check(self) -> Deferred[str | None]:
        if not self.minimum:
            d: Deferred[str | None] = Deferred()
            d.callback(None)
            return d
        return Deferred.fromCoroutine(self._check())

    async def _check(self) -> str | None:
        from ..task import run_in_worker

        try:
            free = await run_in_worker(
                self.free_bytes, pool=self._pool, reactor=self._reactor
            ).addTimeout(self.timeout, self.reactor)
        except Exception as e:
            what = f"timed out after {self.timeout:g} s" if _is_timeout(e) else str(e)
            return f"cannot check the free space on {self.path}: {what}"
        if free < self.minimum:
            return (
                f"disk nearly full: {format_size(free)} free on {self.path}, "
                f"min-free-space is {format_size(self.minimum)}"
            )
        return None


def _is_timeout(e: BaseException) -> bool:
    from twisted.internet.defer import TimeoutError as DeferredTimeout

    return isinstance(e, DeferredTimeout | TimeoutError)


_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``"1G"`` -> 1073741824: a byte count with an optional binary suffix (K, M, G, T)."""
    s = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = s[-1:] if s[-1:] in _UNITS else ""
    number = s[: len(s) - len(unit)].strip()
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (examples: 0, 512M, 1G, 2.5T)") from None
    if value < 0:
        raise ValueError(f"a size cannot be negative: {text!r}")
    return int(value * _UNITS[unit])


def format_size(n: int) -> str:
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        scale = _UNITS[unit[0]]
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"
