"""CommandChannel: QEMU's QIOChannelCommand, a child process's stdin/stdout as a channel.

The child is started with ``reactor.spawnProcess``: what we write goes to its
standard input, what it prints on standard output is what we read; its
standard error is our own.  QEMU's flags choose the pipes:

=============  ========================  ===========================
flags          child's stdin             child's stdout
=============  ========================  ===========================
``O_RDWR``     pipe from us              pipe to us
``O_RDONLY``   ``/dev/null``             pipe to us
``O_WRONLY``   pipe from us              ``/dev/null``
=============  ========================  ===========================

Reading is push-driven by Twisted and buffered here; above the high-water mark
the process transport stops reading the pipe (``pauseProducing``), so a chatty
child blocks in ``write`` instead of filling our memory, and reading resumes
below the low-water mark.  Writes are queued on Twisted's pipe writer, which
tells us (as a push producer's consumer) when its buffer is full; until it
drains, writes return :data:`WOULD_BLOCK` and OUT is false.

:meth:`close` closes both pipes (after flushing queued input) and fires once
the child has exited and been reaped.  A child that is still running
``term_timeout`` seconds later gets SIGTERM, and ``kill_timeout`` seconds after
that SIGKILL (QEMU, unreferencing the channel, does the same with 10 ms steps;
QEMU's ``close`` itself waits without limit).  :attr:`exit_status` then tells
how the child ended.

Thread contract: reactor thread only, like every channel.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from ..errors import ChannelError
from ._base import WOULD_BLOCK, Buffer, Channel, Condition, Feature, Shutdown, WouldBlock

__all__ = [
    "DEFAULT_HIGH_WATER",
    "DEFAULT_KILL_TIMEOUT",
    "DEFAULT_LOW_WATER",
    "DEFAULT_TERM_TIMEOUT",
    "CommandChannel",
    "CommandExit",
]

DEFAULT_HIGH_WATER = 1024 * 1024
DEFAULT_LOW_WATER = 256 * 1024
#: Seconds close() waits for the child to exit by itself before SIGTERM.
DEFAULT_TERM_TIMEOUT = 5.0
#: Seconds after SIGTERM before SIGKILL.
DEFAULT_KILL_TIMEOUT = 1.0
#: At most this much of one write is queued on the pipe writer at a time.
MAX_WRITE = 1024 * 1024


@dataclass(frozen=True)
class CommandExit:
    """How the child ended: an exit code, or the signal that killed it."""

    pid: int
    exit_code: int | None
    signal: int | None

    @property
    def success(self) -> bool:
        return self.exit_code == 0


@implementer(IPushProducer)
class _CommandProtocol(ProcessProtocol):
    """The Twisted side of a :class:`CommandChannel`; it only moves bytes and events.

    It is also the push producer registered on the child's stdin pipe, so
    Twisted tells it when that pipe's buffer fills (pause) and drains (resume).
    """

    def __init__(self, channel: CommandChannel) -> None:
        self.channel = channel

    def connectionMade(self) -> None:
        # Twisted forgets the pid once it reaps the child, which for a quick child
        # can happen before spawnProcess even returns: keep it now.
        transport = self.transport
        assert transport is not None
        self.channel.pid = transport.pid

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 1:
            self.channel._data_received(data)

    def childConnectionLost(self, childFD: int) -> None:
        if childFD == 1:
            self.channel._stdout_closed()
        elif childFD == 0:
            self.channel._stdin_closed()

    def processExited(self, reason: Failure) -> None:
        self.channel._process_exited(reason)

    def processEnded(self, reason: Failure) -> None:
        self.channel._process_ended(reason)

    def pauseProducing(self) -> None:
        self.channel._write_paused = True

    def resumeProducing(self) -> None:
        self.channel._write_paused = False
        self.channel._ready_changed()

    def stopProducing(self) -> None:
        pass


class CommandChannel(Channel):
    """A child process as a channel: QEMU's ``QIOChannelCommand``.

    Create one with :meth:`new_spawn`.  Feature SHUTDOWN: ``shutdown(WRITE)``
    closes the child's stdin (it sees EOF once queued input is flushed);
    ``shutdown(READ)`` closes our end of its stdout.

    Differences from QEMU, on purpose: a write to an ``O_RDONLY`` channel
    raises :class:`~qiotwisted.errors.ChannelError` (QEMU quietly writes to
    ``/dev/null``); a read from an ``O_WRONLY`` channel returns ``b""`` (EOF)
    as QEMU's does.
    """

    def __init__(
        self,
        *,
        flags: int = os.O_RDWR,
        reactor: IReactorTime | None = None,
        name: str | None = None,
        high_water: int = DEFAULT_HIGH_WATER,
        low_water: int = DEFAULT_LOW_WATER,
        term_timeout: float = DEFAULT_TERM_TIMEOUT,
        kill_timeout: float = DEFAULT_KILL_TIMEOUT,
    ) -> None:
        """Not spawned yet: use :meth:`new_spawn`, which calls this then :meth:`_spawn`."""
        super().__init__(reactor=reactor, name=name)
        accmode = flags & os.O_ACCMODE
        if accmode not in (os.O_RDONLY, os.O_WRONLY, os.O_RDWR):
            raise ValueError(f"flags must be O_RDONLY, O_WRONLY or O_RDWR, not {flags:#o}")
        if not 0 <= low_water <= high_water:
            raise ValueError("need 0 <= low_water <= high_water")
        if term_timeout < 0 or kill_timeout < 0:
            raise ValueError("term_timeout and kill_timeout must be >= 0")
        self.features = Feature.SHUTDOWN
        self.flags = accmode
        self._readable = accmode in (os.O_RDONLY, os.O_RDWR)
        self._writable = accmode in (os.O_WRONLY, os.O_RDWR)
        self._high_water = high_water
        self._low_water = low_water
        self._term_timeout = term_timeout
        self._kill_timeout = kill_timeout
        self.protocol = _CommandProtocol(self)
        self.transport: Any = None
        self.pid: int | None = None
        # read side
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._read_paused = False
        self._eof = not self._readable  # O_WRONLY reads /dev/null: EOF at once
        # write side
        self._write_paused = False
        self._write_shut = False  # we closed stdin (shutdown or close)
        self._stdin_lost = not self._writable  # the pipe to the child is gone
        # the process
        self._exited = False
        self.exit_status: CommandExit | None = None
        self._ended_d: Deferred[None] = Deferred()
        self._ended = False
        self._timer: Any = None
        self._signals_sent: list[int] = []

    # ---- spawning ---------------------------------------------------------------------

    @classmethod
    def new_spawn(
        cls,
        argv: Sequence[str],
        flags: int = os.O_RDWR,
        *,
        reactor: IReactorTime | None = None,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        high_water: int = DEFAULT_HIGH_WATER,
        low_water: int = DEFAULT_LOW_WATER,
        term_timeout: float = DEFAULT_TERM_TIMEOUT,
        kill_timeout: float = DEFAULT_KILL_TIMEOUT,
    ) -> CommandChannel:
        """``qio_channel_command_new_spawn``: run ``argv`` with pipes chosen by *flags*.

        ``argv[0]`` is looked up in ``PATH`` when it has no slash (QEMU's
        ``execv`` wants a path).  *env* ``None`` passes our environment on.
        Raises :class:`~qiotwisted.errors.ChannelError` if the program cannot
        be found or started.  Call in the reactor thread.
        """
        if not argv:
            raise ValueError("argv must name a program")
        channel = cls(
            flags=flags,
            reactor=reactor,
            name=name or f"command:{os.path.basename(argv[0])}",
            high_water=high_water,
            low_water=low_water,
            term_timeout=term_timeout,
            kill_timeout=kill_timeout,
        )
        channel._spawn(list(argv), env, cwd)
        return channel

    def _spawn(self, argv: list[str], env: Mapping[str, str] | None, cwd: str | None) -> None:
        program = argv[0]
        executable = program if "/" in program else shutil.which(program)
        if executable is None or not os.access(executable, os.X_OK):
            raise ChannelError(f"Unable to spawn command '{program}': No such executable")
        devnull = -1
        child_fds: dict[int, int | str] = {0: "w", 1: "r", 2: 2}
        if not self._writable or not self._readable:
            devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            if not self._writable:
                child_fds[0] = devnull
            if not self._readable:
                child_fds[1] = devnull
        try:
            self.transport = self.reactor.spawnProcess(
                self.protocol,
                executable,
                argv,
                env=None if env is None else dict(env),
                path=cwd,
                childFDs=child_fds,
            )
        except OSError as e:
            raise ChannelError(f"Unable to spawn command '{program}': {e.strerror or e}") from e
        finally:
            if devnull != -1:
                os.close(devnull)  # the child has its own copy now
        if self._writable:
            self.transport.registerProducer(self.protocol, True)
        self.log.debug(
            "qio_channel_command_new_spawn ioc={ioc!r} cmd={cmd} flags={flags} pid={pid}"
            " thread={thread}",
            ioc=self,
            cmd=program,
            flags=self.flags,
            pid=self.pid,
            thread=threading.get_ident(),
        )

    # ---- Twisted side -------------------------------------------------------------------

    def _data_received(self, data: bytes) -> None:
        if self._eof:
            return  # shutdown(READ) or close: nobody will read it
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > self._high_water and not self._read_paused:
            self._read_paused = True
            self.transport.pauseProducing()
        self._ready_changed()

    def _stdout_closed(self) -> None:
        self._eof = True
        self._ready_changed()

    def _stdin_closed(self) -> None:
        self._stdin_lost = True
        self._ready_changed()

    def _process_exited(self, reason: Failure) -> None:
        self._exited = True
        value = reason.value
        if isinstance(value, ProcessTerminated):
            code, sig = value.exitCode, value.signal
        elif isinstance(value, ProcessDone):
            code, sig = 0, None
        else:
            code, sig = None, None
        self.exit_status = CommandExit(self.pid or -1, code, sig)
        self.log.debug(
            "qio_channel_command_wait ioc={ioc!r} pid={pid} code={code} signal={signal}",
            ioc=self,
            pid=self.pid,
            code=code,
            signal=sig,
        )

    def _process_ended(self, reason: Failure) -> None:
        if not self._exited:
            self._process_exited(reason)
        self._ended = True
        self._stdin_lost = True
        self._eof = True
        self._cancel_timer()
        self._ready_changed()
        self._ended_d.callback(None)

    # ---- the Channel contract -----------------------------------------------------------

    def _io_condition(self) -> Condition:
        cond = Condition(0)
        if self._buffered or self._eof:
            cond |= Condition.IN
        if self._writable and not self._write_shut:
            if self._stdin_lost:
                cond |= Condition.OUT | Condition.ERR  # a write fails at once: EPIPE
            elif not self._write_paused:
                cond |= Condition.OUT
        if self._ended:
            cond |= Condition.HUP
        return cond

    def _io_read(self, nbytes: int, *, peek: bool = False) -> bytes | WouldBlock:
        if not self._buffered:
            return b"" if self._eof else WOULD_BLOCK
        chunks = self._chunks
        first = chunks[0]
        if len(first) > nbytes:
            data = first[:nbytes]
            chunks[0] = first[nbytes:]
        else:
            parts = [chunks.popleft()]
            got = len(first)
            while chunks and got + len(chunks[0]) <= nbytes:
                got += len(chunks[0])
                parts.append(chunks.popleft())
            data = parts[0] if len(parts) == 1 else b"".join(parts)
        self._buffered -= len(data)
        if self._read_paused and self._buffered <= self._low_water:
            self._read_paused = False
            if not self._eof:
                self.transport.resumeProducing()
        return data

    def _io_write(self, chunks: Sequence[Buffer], fds: Sequence[int]) -> int | WouldBlock:
        if not self._writable:
            raise ChannelError("Unable to write to command: it was spawned O_RDONLY")
        if self._write_shut or self._stdin_lost:
            raise ChannelError("Unable to write to command: Broken pipe")
        if self._write_paused:
            return WOULD_BLOCK
        data: list[bytes] = []
        total = 0
        for chunk in chunks:
            n = min(len(chunk), MAX_WRITE - total)
            if n <= 0:
                break
            # Twisted queues what it cannot write yet: copy what the caller may reuse.
            if isinstance(chunk, bytes):
                data.append(chunk if n == len(chunk) else chunk[:n])
            else:
                data.append(bytes(memoryview(chunk)[:n]))
            total += n
        self.transport.writeSequence(data)
        return total

    def _io_shutdown(self, how: Shutdown) -> None:
        if how & Shutdown.WRITE:
            self._close_stdin()
        if how & Shutdown.READ:
            self._close_stdout()

    def _close_stdin(self) -> None:
        if self._writable and not self._write_shut:
            self._write_shut = True
            if not self._stdin_lost:
                self.transport.unregisterProducer()
                self.transport.closeStdin()  # flushes queued input first

    def _close_stdout(self) -> None:
        if self._readable and not self._eof:
            self._eof = True
            self.transport.closeStdout()
        self._chunks.clear()
        self._buffered = 0

    def _io_close(self) -> Deferred[None] | None:
        # Close the pipes first: most children exit on EOF, the cleanest ending.
        self._close_stdin()
        self._close_stdout()
        if self._ended:
            return succeed(None)
        if not self._exited:
            self._timer = self.reactor.callLater(self._term_timeout, self._terminate)
        return self._ended_d

    # ---- terminating the child ----------------------------------------------------------

    def abort(self) -> Deferred[None]:
        """Close now and send SIGTERM at once (then SIGKILL after ``kill_timeout``)."""
        d = self.close()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
            self._terminate()
        return d

    def _terminate(self) -> None:
        self._timer = None
        if self._send_signal(signal.SIGTERM):
            self._timer = self.reactor.callLater(self._kill_timeout, self._kill)

    def _kill(self) -> None:
        self._timer = None
        self._send_signal(signal.SIGKILL)

    def _send_signal(self, signum: int) -> bool:
        if self._exited or self.transport is None:
            return False
        self.log.debug(
            "qio_channel_command_abort ioc={ioc!r} pid={pid} signal={signal}",
            ioc=self,
            pid=self.pid,
            signal=signum,
        )
        try:
            self.transport.signalProcess(signum)
        except ProcessExitedAlready:
            return False
        self._signals_sent.append(signum)
        return True

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    @property
    def buffered(self) -> int:
        """Bytes read from the child's stdout and not yet taken by a read."""
        return self._buffered

    @property
    def reading_paused(self) -> bool:
        """True while the buffer is above the high-water mark and the pipe is not read."""
        return self._read_paused

    @property
    def signals_sent(self) -> list[int]:
        """The signals :meth:`close` had to send (empty if the child exited by itself)."""
        return list(self._signals_sent)

    def when_ended(self) -> Deferred[CommandExit]:
        """Fire with :attr:`exit_status` once the child has exited and its pipes are closed.

        This does not close the channel or signal the child; it only waits.
        """
        d: Deferred[CommandExit] = Deferred()

        def relay(result: None) -> None:
            assert self.exit_status is not None
            d.callback(self.exit_status)
            return result

        if self._ended:
            relay(None)
        else:
            self._ended_d.addCallback(relay)
        return d
