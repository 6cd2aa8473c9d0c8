"""FileChannel: QEMU's QIOChannelFile over any file descriptor.

QEMU reads and writes the fd directly and relies on poll() for readiness.
That works for pipes, FIFOs and character devices, but a regular file is
always "ready" and its reads and writes block on the disk.  So a FileChannel
runs in one of two modes, chosen once from the fd:

*poll mode* (pipes, FIFOs, sockets, ttys: anything the kernel can poll)
    The fd is made non-blocking and read and written directly in the reactor
    thread, exactly as QEMU does; a read or write that would block returns
    :data:`WOULD_BLOCK`.  While someone waits or watches, the fd is registered
    with the reactor (``addReader``/``addWriter``).  Conditions come from
    ``poll()``: IN when a read will not block (data or end-of-file), OUT when
    a write will not block, HUP when the writer has gone (a read then gives
    ``b""``), ERR when the reader has gone (a write then fails with EPIPE).

*thread mode* (regular files, block devices, and char devices that cannot be
polled, such as ``/dev/null``)
    Every read and write runs in a worker thread of a
    :class:`~qiotwisted._pool.WorkerPool` (the shared ``qio-worker`` pool by
    default), one job at a time and in the order issued, so the reactor never
    waits on the disk.  Writes are *write-behind*: a write copies the data,
    returns its length at once and queues it; up to ``write_buffer`` bytes may
    be queued, and beyond that writes return :data:`WOULD_BLOCK` (OUT is false)
    until the worker catches up.  A write that fails in the worker fails the
    next write and :meth:`close`.  Reads are issued to the worker on demand and
    return :data:`WOULD_BLOCK` until the data arrives (IN then holds); a
    read-only channel also reads the next chunk ahead.  Positions are tracked
    by the channel (``pread``/``pwrite``), so :meth:`seek` is immediate and
    ``SEEK_END`` counts queued writes; at close the fd's own offset is set to
    the channel's, which matters only to holders of a duplicate of the fd.

:class:`~qiotwisted.channel._base.Feature.SEEKABLE` is set when ``lseek``
works on the fd, as in QEMU.  Closing (:meth:`close`) flushes queued writes,
then closes the fd; its Deferred fails if a queued write failed.

Thread contract: every method is called in the reactor thread and every
callback runs there.  Worker threads touch only the fd and the job's buffers.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import select
import stat
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime, IReadDescriptor, IWriteDescriptor
from twisted.python.failure import Failure
from zope.interface import implementer

from .._pool import WorkerPool, get_default_pool
from ..errors import ChannelClosedError, ChannelError, QIOError
from ._base import (
    WOULD_BLOCK,
    Buffer,
    Channel,
    Condition,
    Feature,
    Watch,
    WatchFunc,
    WouldBlock,
)

__all__ = [
    "DEFAULT_READ_CHUNK",
    "DEFAULT_WRITE_BUFFER",
    "FileChannel",
    "FileMode",
]

#: Largest single read from the fd (bounds the buffer one read allocates).
MAX_READ = 4 * 1024 * 1024
#: Thread mode: a read asks the worker for at least this much (read-ahead).
DEFAULT_READ_CHUNK = 256 * 1024
#: Thread mode: bytes a write may queue before writes return WOULD_BLOCK.
DEFAULT_WRITE_BUFFER = 4 * 1024 * 1024
#: Linux's IOV_MAX: writev takes at most this many buffers per call.
IOV_MAX = 1024

_IN_MASK = Condition.IN | Condition.PRI | Condition.HUP | Condition.ERR


class FileMode(enum.Enum):
    """How a :class:`FileChannel` does its I/O (see the module docstring)."""

    POLL = "poll"
    THREAD = "thread"


def _strerror(e: OSError) -> str:
    return e.strerror or str(e)


def _is_pollable(fd: int, st: os.stat_result) -> bool:
    """True if the kernel can tell us when *fd* is ready (epoll accepts it)."""
    if stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode) or stat.S_ISDIR(st.st_mode):
        return False
    epoll = getattr(select, "epoll", None)
    if epoll is None:
        return stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode) or stat.S_ISCHR(st.st_mode)
    ep = epoll()
    try:
        ep.register(fd, 0)
    except OSError:
        return False  # EPERM: a file without a poll method (/dev/null, /dev/urandom)
    finally:
        ep.close()
    return True


@implementer(IReadDescriptor, IWriteDescriptor)
class _FDWatcher:
    """The reactor's handle on a poll-mode fd: it only reports events to the channel."""

    def __init__(self, channel: FileChannel, fd: int) -> None:
        self.channel = channel
        self.fd = fd
        self.reading = False
        self.writing = False
        # Set when the reactor saw HUP/ERR and dropped us; see _update_interest.
        self.lost = False

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "FileChannel"

    def doRead(self) -> None:
        self.channel._fd_event()

    def doWrite(self) -> None:
        self.channel._fd_event()

    def connectionLost(self, reason: Failure) -> None:
        # The reactor has already removed us from both sets (HUP or ERR with no
        # data left to read); the condition is still visible through poll().
        self.reading = self.writing = False
        self.lost = True
        self.channel._fd_event()


class _Job:
    """One unit of thread-mode work; :func:`_run_job` executes it in a worker thread."""

    __slots__ = ("done", "generation", "handle", "kind", "nbytes", "offset", "result")

    def __init__(self, kind: str, offset: int | None, generation: int) -> None:
        self.kind = kind
        self.offset = offset  # None: use the fd's own offset (streams, O_APPEND)
        self.generation = generation
        self.nbytes = 0
        self.handle: Any = None
        self.done: Callable[[_Job], None] | None = None
        self.result: Any = None


class _WriteJob(_Job):
    """Writes; stream writes (from write/writev) coalesce while they wait their turn."""

    __slots__ = ("append", "bufs", "flush_waiters", "sealed", "size", "stream")

    def __init__(self, offset: int | None, generation: int, *, append: bool, stream: bool) -> None:
        super().__init__("write", offset, generation)
        self.bufs: list[Buffer] = []
        self.size = 0
        self.append = append
        self.stream = stream
        self.sealed = False  # a flush() waits for it: take no more data
        self.flush_waiters: list[Deferred[None]] = []


def _write_fully(fd: int, bufs: list[Buffer], offset: int | None) -> None:
    """Write every byte of *bufs* at *offset* (or the fd's offset); worker thread."""
    views = [memoryview(b).cast("B") for b in bufs]
    i = 0
    while i < len(views):
        batch = views[i : i + IOV_MAX]
        n = os.writev(fd, batch) if offset is None else os.pwritev(fd, batch, offset)
        if n <= 0:
            raise OSError(errno.EIO, "Short write")
        if offset is not None:
            offset += n
        while n:  # skip what went out; a partly written buffer keeps its tail
            if n >= len(views[i]):
                n -= len(views[i])
                i += 1
            else:
                views[i] = views[i][n:]
                n = 0


class FileChannel(Channel):
    """A file descriptor as a channel: QEMU's ``QIOChannelFile``.

    Use :meth:`new_fd` (takes ownership of the fd), :meth:`new_dupfd` (works
    on a duplicate; the caller keeps the original) or :meth:`new_path`.  See the
    module docstring for the poll and thread modes.

    :param worker: thread mode only: the :class:`~qiotwisted._pool.WorkerPool`
        that runs the I/O (default: the reactor's shared pool).
    :param write_buffer: thread mode only: bytes writes may queue.
    :param read_chunk: thread mode only: the smallest read issued to the worker.
    """

    def __init__(
        self,
        fd: int,
        *,
        reactor: IReactorTime | None = None,
        worker: WorkerPool | None = None,
        name: str | None = None,
        write_buffer: int = DEFAULT_WRITE_BUFFER,
        read_chunk: int = DEFAULT_READ_CHUNK,
    ) -> None:
        super().__init__(reactor=reactor, name=name)
        if write_buffer < 1 or read_chunk < 1:
            raise ValueError("write_buffer and read_chunk must be positive")
        try:
            st = os.fstat(fd)
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        except OSError as e:
            raise ChannelError(f"Unable to use FD {fd}: {_strerror(e)}") from e
        self._fd = fd
        accmode = flags & os.O_ACCMODE
        self._readable = accmode in (os.O_RDONLY, os.O_RDWR)
        self._writable = accmode in (os.O_WRONLY, os.O_RDWR)
        self._append = bool(flags & os.O_APPEND)
        try:
            os.lseek(fd, 0, os.SEEK_CUR)
        except OSError:
            pass
        else:
            self.features |= Feature.SEEKABLE
        self.mode = FileMode.POLL if _is_pollable(fd, st) else FileMode.THREAD

        # poll mode
        self._watcher: _FDWatcher | None = None
        self._poller: Any = None
        self._restore_blocking = False
        # thread mode
        self._worker_arg = worker
        self._write_buffer = write_buffer
        self._read_chunk = read_chunk
        self._jobs: deque[_Job] = deque()
        self._running: _Job | None = None
        self._offset = 0
        self._generation = 0  # bumped by writes and seeks: read results before it are stale
        # Read data not yet returned: _held[_held_pos:], which starts at file offset
        # _held_offset.  An index instead of re-slicing keeps small reads O(n).
        self._held = b""
        self._held_pos = 0
        self._held_offset = 0
        self._held_eof = False
        self._read_queued: _Job | None = None
        self._read_error: ChannelError | None = None
        self._write_error: ChannelError | None = None
        self._write_pending = 0

        if self.mode is FileMode.POLL:
            if not flags & os.O_NONBLOCK:
                fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
                self._restore_blocking = True
            self._watcher = _FDWatcher(self, fd)
            self._poller = select.poll()
            events = (select.POLLIN if self._readable else 0) | (
                select.POLLOUT if self._writable else 0
            )
            self._poller.register(fd, events)
        elif self.features & Feature.SEEKABLE:
            self._offset = os.lseek(fd, 0, os.SEEK_CUR)
        self.log.debug(
            "qio_channel_file_new_fd ioc={ioc!r} fd={fd} mode={mode} thread={thread}",
            ioc=self,
            fd=fd,
            mode=self.mode.value,
            thread=threading.get_ident(),
        )

    # ---- constructors --------------------------------------------------------------

    @classmethod
    def new_fd(
        cls,
        fd: int,
        *,
        reactor: IReactorTime | None = None,
        worker: WorkerPool | None = None,
        name: str | None = None,
    ) -> FileChannel:
        """``qio_channel_file_new_fd``: wrap *fd*; the channel owns it and closes it.

        A poll-mode fd is switched to non-blocking (which the whole open file
        description shares); closing the channel switches it back.
        """
        return cls(fd, reactor=reactor, worker=worker, name=name)

    @classmethod
    def new_dupfd(
        cls,
        fd: int,
        *,
        reactor: IReactorTime | None = None,
        worker: WorkerPool | None = None,
        name: str | None = None,
    ) -> FileChannel:
        """``qio_channel_file_new_dupfd``: wrap a duplicate of *fd*; the caller keeps *fd*.

        The duplicate shares the open file description (offset, O_NONBLOCK).
        """
        try:
            newfd = os.dup(fd)
        except OSError as e:
            raise ChannelError(f"Could not dup FD {fd}: {_strerror(e)}") from e
        try:
            return cls(newfd, reactor=reactor, worker=worker, name=name)
        except BaseException:
            os.close(newfd)
            raise

    @classmethod
    def new_path(
        cls,
        path: str | os.PathLike[str],
        flags: int,
        mode: int = 0o666,
        *,
        reactor: IReactorTime | None = None,
        worker: WorkerPool | None = None,
        name: str | None = None,
    ) -> FileChannel:
        """``qio_channel_file_new_path``: ``open(path, flags, mode)`` (close-on-exec added).

        The ``open`` itself runs in the calling (reactor) thread, as in QEMU:
        opening a FIFO without ``O_NONBLOCK`` blocks until its other end opens.
        """
        try:
            fd = os.open(path, flags | os.O_CLOEXEC, mode)
        except OSError as e:
            raise ChannelError(f"Could not open '{os.fspath(path)}': {_strerror(e)}") from e
        try:
            channel = cls(fd, reactor=reactor, worker=worker, name=name)
        except BaseException:
            os.close(fd)
            raise
        channel.log.debug(
            "qio_channel_file_new_path ioc={ioc!r} path={path} flags={flags} mode={mode} fd={fd}",
            ioc=channel,
            path=os.fspath(path),
            flags=flags,
            mode=mode,
            fd=fd,
        )
        return channel

    # ---- properties --------------------------------------------------------------------

    @property
    def fd(self) -> int:
        """The file descriptor, or -1 once the channel is closed."""
        return -1 if self._closed else self._fd

    @property
    def worker(self) -> WorkerPool:
        if self._worker_arg is None:
            self._worker_arg = get_default_pool(self.reactor)
        return self._worker_arg

    # ---- the Channel contract ----------------------------------------------------------

    def _io_read(self, nbytes: int, *, peek: bool = False) -> bytes | WouldBlock:
        if self.mode is FileMode.POLL:
            try:
                return os.read(self._fd, min(nbytes, MAX_READ))
            except BlockingIOError:
                return WOULD_BLOCK
            except OSError as e:
                raise ChannelError(f"Unable to read from file: {_strerror(e)}") from e
        return self._thread_read(nbytes)

    def _io_write(self, chunks: Sequence[Buffer], fds: Sequence[int]) -> int | WouldBlock:
        if self.mode is FileMode.POLL:
            try:
                return os.writev(self._fd, chunks[:IOV_MAX])
            except BlockingIOError:
                return WOULD_BLOCK
            except OSError as e:
                raise ChannelError(f"Unable to write to file: {_strerror(e)}") from e
        return self._thread_write(chunks)

    def _io_condition(self) -> Condition:
        if self.mode is FileMode.POLL:
            return self._poll_condition()
        cond = Condition(0)
        if (
            self._read_error is not None
            or self._held_eof
            or (self._held_len() and self._held_valid())
        ):
            cond |= Condition.IN
        if self._write_error is not None:
            cond |= Condition.OUT | Condition.ERR
        elif self._write_pending < self._write_buffer:
            cond |= Condition.OUT
        return cond

    def _io_seek(self, offset: int, whence: int) -> int:
        if not self.features & Feature.SEEKABLE:
            raise ChannelError(
                f"Unable to seek to offset {offset} whence {whence} in file: Illegal seek"
            )
        if self.mode is FileMode.POLL:
            try:
                return os.lseek(self._fd, offset, whence)
            except OSError as e:
                raise ChannelError(
                    f"Unable to seek to offset {offset} whence {whence} in file: {_strerror(e)}"
                ) from e
        if whence == os.SEEK_SET:
            new = offset
        elif whence == os.SEEK_CUR:
            new = self._offset + offset
        elif whence == os.SEEK_END:
            try:
                size = os.fstat(self._fd).st_size
            except OSError as e:
                raise ChannelError(f"Unable to seek in file: {_strerror(e)}") from e
            new = max(size, self._pending_write_end()) + offset
        else:
            raise ChannelError(
                f"Unable to seek to offset {offset} whence {whence} in file: Invalid argument"
            )
        if new < 0:
            raise ChannelError(
                f"Unable to seek to offset {offset} whence {whence} in file: Invalid argument"
            )
        self._offset = new
        self._invalidate_reads()
        return new

    def _io_close(self) -> Deferred[None] | None:
        if self.mode is FileMode.POLL:
            self._set_interest(False, False)
            self._poller = None
            try:
                if self._restore_blocking:
                    flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
                    fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
            except OSError:
                pass  # the fd is going away anyway; restoring is a courtesy to dup holders
            try:
                os.close(self._fd)
            except OSError as e:
                raise ChannelError(f"Unable to close file: {_strerror(e)}") from e
            return None
        return self._thread_close()

    # ---- readiness: register with the reactor only while someone waits ------------------

    def wait(self, condition: Condition) -> Deferred[Condition]:
        d = super().wait(condition)
        self._update_interest()
        return d

    def add_watch(
        self,
        condition: Condition,
        func: WatchFunc,
        data: Any = None,
        notify: Callable[[Any], None] | None = None,
    ) -> Watch:
        watch = super().add_watch(condition, func, data, notify)
        self._update_interest()
        return watch

    def _interest(self) -> tuple[bool, bool]:
        """(read, write): whether a waiter or watch needs IN-side / OUT-side events."""
        want_read = self._waiters["read"] is not None
        want_write = self._waiters["write"] is not None
        for watch in self._watches:
            if watch.condition & Condition.OUT:
                want_write = True
            if watch.condition & _IN_MASK:
                want_read = True
        return want_read, want_write

    def _update_interest(self) -> None:
        if self._closed:
            return
        want_read, want_write = self._interest()
        if self.mode is FileMode.THREAD:
            # Nothing polls a regular file: make IN come true by reading ahead.
            if (
                want_read
                and self._readable
                and self._read_queued is None
                and not self._io_condition() & Condition.IN
            ):
                self._queue_read(self._read_chunk)
            return
        watcher = self._watcher
        assert watcher is not None
        if watcher.lost and (want_read or want_write):
            # HUP/ERR persist, and the reactor drops an fd that reports them, so
            # re-registering would spin.  Waiters already saw the condition;
            # re-arm only once it has cleared (a FIFO that got a new writer).
            if self._poll_events() & (select.POLLHUP | select.POLLERR):
                return
            watcher.lost = False
        self._set_interest(want_read, want_write)

    def _set_interest(self, want_read: bool, want_write: bool) -> None:
        watcher = self._watcher
        if watcher is None:
            return
        reactor: Any = self.reactor
        if want_read != watcher.reading:
            watcher.reading = want_read
            (reactor.addReader if want_read else reactor.removeReader)(watcher)
        if want_write != watcher.writing:
            watcher.writing = want_write
            (reactor.addWriter if want_write else reactor.removeWriter)(watcher)

    def _fd_event(self) -> None:
        """The reactor saw the fd ready (or hung up): wake waiters, then re-check interest."""
        if self._closed:
            return
        self._ready_changed()
        self._update_interest()  # drops the registration once nobody waits any more

    def _poll_events(self) -> int:
        try:
            got = self._poller.poll(0)
        except OSError:
            return select.POLLERR
        return got[0][1] if got else 0

    def _poll_condition(self) -> Condition:
        ev = self._poll_events()
        cond = Condition(0)
        if ev & select.POLLIN:
            cond |= Condition.IN
        if ev & select.POLLPRI:
            cond |= Condition.PRI
        if ev & select.POLLOUT:
            cond |= Condition.OUT
        if ev & select.POLLHUP:
            # The writer is gone: a read returns EOF at once, so it will not block.
            cond |= Condition.HUP | (Condition.IN if self._readable else Condition(0))
        if ev & (select.POLLERR | select.POLLNVAL):
            # The reader is gone (or the fd is bad): I/O fails at once.
            cond |= Condition.ERR
            cond |= Condition.OUT if self._writable else Condition(0)
            cond |= Condition.IN if self._readable else Condition(0)
        return cond

    # ---- thread mode ---------------------------------------------------------------------

    def _seekable(self) -> bool:
        return bool(self.features & Feature.SEEKABLE)

    def _held_len(self) -> int:
        return len(self._held) - self._held_pos

    def _held_valid(self) -> bool:
        return not self._seekable() or self._held_offset == self._offset

    def _all_jobs(self) -> list[_Job]:
        return ([self._running] if self._running is not None else []) + list(self._jobs)

    def _pending_write_end(self) -> int:
        """The end offset of the furthest write not yet done (0 if none)."""
        ends = [
            j.offset + j.size
            for j in self._all_jobs()
            if isinstance(j, _WriteJob) and j.offset is not None
        ]
        return max(ends, default=0)

    def _invalidate_reads(self) -> None:
        """A write or seek happened: read data fetched before it may be stale."""
        if not self._seekable():
            return  # a stream: data read is consumed and stays valid
        self._generation += 1
        self._held, self._held_pos = b"", 0
        self._held_eof = False
        queued = self._read_queued
        if queued is not None:
            self._read_queued = None
            if queued is not self._running:
                self._jobs.remove(queued)

    def _thread_read(self, nbytes: int) -> bytes | WouldBlock:
        if self._read_error is not None:
            error, self._read_error = self._read_error, None
            raise error
        if not self._readable:
            raise ChannelError("Unable to read from file: Bad file descriptor")
        if self._held_len() and self._held_valid():
            held, pos = self._held, self._held_pos
            if pos == 0 and nbytes >= len(held):
                data = held  # the common bulk case: hand over the job's buffer, no copy
            else:
                data = held[pos : pos + nbytes]
            self._held_pos = pos + len(data)
            if self._held_pos == len(held):
                self._held, self._held_pos = b"", 0
            self._offset += len(data)
            self._held_offset = self._offset
            if (
                not self._writable
                and not self._held_eof
                and self._read_queued is None
                and self._held_len() < self._read_chunk
            ):
                # A read-only channel is read front to back: fetch the next chunk
                # while the caller consumes this one.
                self._queue_read(max(len(data), self._read_chunk))
            return data
        if self._held_eof:
            # EOF is reported once per read, as read(2) does: the file may grow.
            self._held_eof = False
            return b""
        if self._read_queued is None:
            self._queue_read(max(nbytes, self._read_chunk))
        return WOULD_BLOCK

    def _queue_read(self, nbytes: int) -> None:
        offset = self._offset + self._held_len() if self._seekable() else None
        job = _Job("read", offset, self._generation)
        job.nbytes = min(nbytes, MAX_READ)
        job.done = self._read_done
        self._read_queued = job
        self._enqueue(job)

    def _read_done(self, job: _Job) -> None:
        if self._read_queued is job:
            self._read_queued = None
        if job.generation != self._generation:
            return  # a write or seek came after it was issued: the data may be stale
        if isinstance(job.result, BaseException):
            self._read_error = _as_channel_error(job.result, "Unable to read from file")
        elif job.result:
            if not self._held_len():
                self._held, self._held_pos = job.result, 0
                self._held_offset = job.offset if job.offset is not None else 0
            else:
                self._held, self._held_pos = self._held[self._held_pos :] + job.result, 0
        else:
            self._held_eof = True
        self._ready_changed()

    def _thread_write(self, chunks: Sequence[Buffer]) -> int | WouldBlock:
        if self._write_error is not None:
            raise self._write_error
        if not self._writable:
            raise ChannelError("Unable to write to file: Bad file descriptor")
        room = self._write_buffer - self._write_pending
        if room <= 0:
            return WOULD_BLOCK
        offset = self._offset if self._seekable() and not self._append else None
        last = self._jobs[-1] if self._jobs else None
        if (
            isinstance(last, _WriteJob)
            and last.stream
            and not last.sealed
            and (last.offset is None) == (offset is None)
            and (offset is None or last.offset == offset - last.size)
        ):
            job = last  # still waiting its turn: one worker hop for both writes
        else:
            job = _WriteJob(offset, self._generation, append=self._append, stream=True)
            job.done = self._write_done
            self._jobs.append(job)
        accepted = 0
        for chunk in chunks:
            n = min(len(chunk), room - accepted)
            if n > 0:
                job.bufs.append(_stable_copy(chunk, n))
                accepted += n
            if accepted >= room:
                break
        job.size += accepted
        self._write_pending += accepted
        if self._seekable():
            self._offset += accepted
        self._invalidate_reads()
        self._run_next()
        return accepted

    def _write_done(self, job: _Job) -> None:
        assert isinstance(job, _WriteJob)
        self._write_pending -= job.size
        error: ChannelError | None = None
        if isinstance(job.result, BaseException):
            error = _as_channel_error(job.result, "Unable to write to file")
            if self._write_error is None:
                self._write_error = error
        elif job.append and isinstance(job.result, int):
            if not any(isinstance(j, _WriteJob) for j in self._jobs):
                self._offset = job.result  # O_APPEND: the kernel chose where it went
        for waiter in job.flush_waiters:
            if error is not None:
                waiter.errback(Failure(error))
            else:
                waiter.callback(None)
        self._ready_changed()

    def flush(self) -> Deferred[None]:
        """Fire once every byte written so far has been handed to the kernel.

        Thread mode writes are write-behind: another channel or process sees
        the data only after the worker has written it, so await this (or
        :meth:`close`) first.  Fails with the error of a write that failed.
        Poll mode writes go straight to the kernel: this fires at once.
        It does not ``fsync``.
        """
        if self._write_error is not None:
            return fail(self._write_error)
        writes = [j for j in self._all_jobs() if isinstance(j, _WriteJob) and j.stream]
        if not writes:
            return succeed(None)
        last = writes[-1]
        last.sealed = True
        d: Deferred[None] = Deferred()
        last.flush_waiters.append(d)
        return d

    def _thread_close(self) -> Deferred[None]:
        # Reads nobody will take are dropped; queued writes are flushed first.
        self._jobs = deque(j for j in self._jobs if j.kind != "read")
        self._read_queued = None
        self._held, self._held_pos = b"", 0
        result: Deferred[None] = Deferred()
        offset = self._offset if self._seekable() and not self._append else None
        job = _Job("close", offset, self._generation)

        def closed(job: _Job) -> None:
            error = self._write_error
            if isinstance(job.result, BaseException):
                error = error or _as_channel_error(job.result, "Unable to close file")
            if error is not None:
                result.errback(Failure(error))
            else:
                result.callback(None)

        job.done = closed
        self._enqueue(job)
        return result

    def _enqueue(self, job: _Job) -> None:
        self._jobs.append(job)
        self._run_next()

    def _run_next(self) -> None:
        """Start the next job unless one is running: jobs run one at a time, in order."""
        if self._running is not None or not self._jobs:
            return
        job = self._jobs.popleft()
        self._running = job
        fd = self._fd
        worker = self.worker

        def work() -> None:  # worker thread
            try:
                job.result = _run_job(fd, job)
            except BaseException as e:  # handed to the reactor thread, never lost
                job.result = e
            worker.call_in_reactor(lambda: self._job_finished(job))

        def on_stop() -> None:  # reactor thread: the pool is stopping
            if job.handle is not None and job.handle.cancel():
                job.result = ChannelError("Worker pool is stopped")
                self._job_finished(job)

        try:
            job.handle = worker.submit(work, on_stop=on_stop)
        except QIOError as e:
            job.result = e
            self._job_finished(job)

    def _job_finished(self, job: _Job) -> None:
        if self._running is not job:
            return
        self._running = None
        if job.kind == "close" and isinstance(job.result, QIOError):
            # The worker never ran the close (pool stopped or full): don't leak the fd.
            try:
                os.close(self._fd)
            except OSError:
                pass
        try:
            if job.done is not None:
                job.done(job)
        finally:
            self._run_next()

    # ---- positioned I/O ------------------------------------------------------------------

    def pread(self, nbytes: int, offset: int) -> Deferred[bytes]:
        """Read up to *nbytes* at *offset*, leaving the channel's position alone.

        ``b""`` means *offset* is at or past the end of the file.  Thread mode:
        runs in the worker after every job issued before it.  Fails with
        "Requested channel is not seekable" on pipes and the like.
        """
        return self._positioned("pread", nbytes, offset, b"")

    def pwrite(self, data: Buffer, offset: int) -> Deferred[int]:
        """Write all of *data* at *offset*, leaving the channel's position alone.

        Fires with ``len(data)`` once the data is written (thread mode: after
        every job issued before it).  The data is copied at the call.
        """
        return self._positioned("pwrite", 0, offset, data)

    def preadv(self, buffers: Sequence[bytearray | memoryview], offset: int) -> Deferred[int]:
        """Scatter one :meth:`pread` into *buffers*; fires with the byte count."""
        total = sum(len(b) for b in buffers)

        def scatter(data: bytes) -> int:
            pos = 0
            for buf in buffers:
                n = min(len(buf), len(data) - pos)
                if n <= 0:
                    break
                buf[:n] = data[pos : pos + n]
                pos += n
            return len(data)

        return self.pread(total, offset).addCallback(scatter)

    def pwritev(self, iov: Sequence[Buffer], offset: int) -> Deferred[int]:
        """Gather *iov* into one :meth:`pwrite`; fires with the byte count."""
        return self.pwrite(b"".join(bytes(b) for b in iov), offset)

    def _positioned(self, kind: str, nbytes: int, offset: int, data: Buffer) -> Deferred[Any]:
        if self._closed:
            return fail(ChannelClosedError())
        if not self._seekable():
            return fail(ChannelError("Requested channel is not seekable"))
        if offset < 0:
            return fail(ChannelError(f"Invalid offset {offset}"))
        if self.mode is FileMode.POLL:
            try:
                if kind == "pread":
                    return succeed(os.pread(self._fd, min(nbytes, MAX_READ), offset))
                return succeed(os.pwrite(self._fd, data, offset))
            except OSError as e:
                return fail(ChannelError(f"Unable to access file: {_strerror(e)}"))
        result: Deferred[Any] = Deferred()
        job: _Job
        if kind == "pwrite":
            wjob = _WriteJob(offset, self._generation, append=False, stream=False)
            wjob.bufs.append(_stable_copy(data, len(data)))
            wjob.size = len(data)
            self._invalidate_reads()
            job = wjob
        else:
            job = _Job("pread", offset, self._generation)
            job.nbytes = min(nbytes, MAX_READ)

        def finished(job: _Job) -> None:
            if isinstance(job.result, BaseException):
                result.errback(Failure(_as_channel_error(job.result, "Unable to access file")))
            elif isinstance(job, _WriteJob):
                result.callback(job.size)
            else:
                result.callback(job.result)

        job.done = finished
        self._enqueue(job)
        return result


def _run_job(fd: int, job: _Job) -> Any:
    """Execute *job* on *fd* (worker thread)."""
    if job.kind in ("read", "pread"):
        if job.offset is None:
            return os.read(fd, job.nbytes)
        return os.pread(fd, job.nbytes, job.offset)
    if job.kind == "write":
        assert isinstance(job, _WriteJob)
        if job.append or job.offset is None:
            _write_fully(fd, job.bufs, None)
            return os.lseek(fd, 0, os.SEEK_CUR) if job.append else None
        _write_fully(fd, job.bufs, job.offset)
        return None
    if job.kind == "close":
        if job.offset is not None:
            try:
                # Leave the fd's offset where the channel's is, for holders of a dup.
                os.lseek(fd, job.offset, os.SEEK_SET)
            except OSError:
                pass
        os.close(fd)
        return None
    raise AssertionError(f"unknown job kind {job.kind}")


def _stable_copy(chunk: Buffer, n: int) -> Buffer:
    """The first *n* bytes of *chunk*, safe to use after the caller reuses its buffer."""
    if isinstance(chunk, bytes):
        return chunk if n == len(chunk) else memoryview(chunk)[:n]
    if isinstance(chunk, memoryview) and chunk.readonly and isinstance(chunk.obj, bytes):
        return chunk[:n]  # a view of immutable bytes: no copy needed
    return bytes(memoryview(chunk)[:n])


def _as_channel_error(error: BaseException, what: str) -> ChannelError:
    if isinstance(error, ChannelError):
        return error
    if isinstance(error, OSError):
        return ChannelError(f"{what}: {_strerror(error)}")
    return ChannelError(f"{what}: {error}")
