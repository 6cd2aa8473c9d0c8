"""FileChannel and channel_new_fd: QEMU's tests/unit/test-io-channel-file.c, ported, plus
the poll-mode (pipe) and thread-mode (regular file) contracts.
"""

from __future__ import annotations

import fcntl
import os
import socket
import stat
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, task

from qiotwisted.channel import WOULD_BLOCK, Condition, Feature, SocketChannel
from qiotwisted.channel.file import FileChannel, FileMode
from qiotwisted.channel.util import channel_new_fd
from qiotwisted.errors import ChannelClosedError, ChannelError
from qiotwisted.testing import MemoryWorkerPool
from tests.channel_helpers import CHUNK, TOTAL, ChannelTest

TEST_MASK = 0o600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


# ---- /io/channel/file, /io/channel/file/rdwr ---------------------------------------------


@pytest.mark.parametrize(
    "flags",
    [os.O_WRONLY | os.O_CREAT | os.O_TRUNC, os.O_RDWR | os.O_CREAT | os.O_TRUNC],
    ids=["file", "file-rdwr"],
)
async def test_io_channel_file(reactor: Any, tmp_path: Path, flags: int) -> None:
    """/io/channel/file and /io/channel/file/rdwr."""
    path = tmp_path / "test-io-channel-file.txt"
    fds0 = _open_fds()
    src = FileChannel.new_path(path, flags, TEST_MASK, reactor=reactor)
    dst = FileChannel.new_path(path, os.O_RDONLY, 0, reactor=reactor)
    assert src.mode is FileMode.THREAD and dst.mode is FileMode.THREAD
    assert src.has_feature(Feature.SEEKABLE) and dst.has_feature(Feature.SEEKABLE)

    test = ChannelTest()
    await test.run_writer(src)
    # Writes are write-behind: another channel sees them once they are flushed.
    await src.flush()
    await test.run_reader(dst)
    test.validate()
    assert await dst.read(16) == b""  # and the file ends there

    # Check that the requested mode took effect.
    assert stat.S_IMODE(path.stat().st_mode) == TEST_MASK & ~_umask()
    assert path.stat().st_size == TOTAL

    await src.close()
    await dst.close()
    assert src.fd == -1 and dst.fd == -1
    assert _open_fds() == fds0


async def test_file_close_flushes_write_behind(reactor: Any, tmp_path: Path) -> None:
    path = tmp_path / "f"
    src = FileChannel.new_path(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600, reactor=reactor)
    test = ChannelTest()
    await test.run_writer(src)
    await src.close()  # no flush(): close drains the queue before closing
    assert path.read_bytes() == test.input


async def test_file_rdwr_seek_and_read_back(reactor: Any, tmp_path: Path) -> None:
    path = tmp_path / "f"
    ch = FileChannel.new_path(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600, reactor=reactor)
    test = ChannelTest()
    await test.run_writer(ch)
    # SEEK_END counts writes still queued behind the worker.
    assert ch.seek(0, os.SEEK_END) == TOTAL
    assert ch.seek(0, os.SEEK_CUR) == TOTAL
    assert ch.seek(0) == 0
    await test.run_reader(ch)
    test.validate()
    assert ch.seek(-CHUNK, os.SEEK_END) == TOTAL - CHUNK
    assert await ch.read_all(CHUNK) == bytes([249]) * CHUNK
    assert await ch.read(1) == b""
    # Overwrite in the middle, then read across the seam: no stale read-ahead.
    assert ch.seek(4190) == 4190
    assert await ch.read_all(2) == b"\x00\x00"
    await ch.write_all(b"XY")
    assert ch.seek(4190) == 4190
    assert await ch.read_all(8) == b"\x00\x00XY\x01\x01\x01\x01"
    with pytest.raises(ChannelError, match="Unable to seek to offset -1 whence 0"):
        ch.seek(-1)
    await ch.close()
    assert path.read_bytes()[4190:4198] == b"\x00\x00XY\x01\x01\x01\x01"


async def test_file_pread_pwrite(reactor: Any, tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"0123456789")
    ch = FileChannel.new_path(path, os.O_RDWR, reactor=reactor)
    assert await ch.read_all(3) == b"012"
    assert await ch.pread(4, 5) == b"5678"
    assert await ch.pwrite(b"ab", 8) == 2
    assert await ch.pwrite(bytearray(b"!"), 12) == 1  # past the end: leaves a hole
    assert await ch.pread(100, 20) == b""
    out = [bytearray(2), bytearray(3)]
    assert await ch.preadv(out, 6) == 5
    assert out == [bytearray(b"67"), bytearray(b"ab\x00")]
    assert await ch.pwritev([b"A", memoryview(b"BC")], 0) == 3
    assert ch.seek(0, os.SEEK_CUR) == 3  # positioned I/O left the position alone
    assert await ch.read_all(5) == b"34567"
    await ch.close()
    assert path.read_bytes() == b"ABC34567ab\x00\x00!"


async def test_file_write_behind_is_bounded_and_off_the_reactor(
    reactor: Any, tmp_path: Path
) -> None:
    """With a step-able pool: writes return at once, queue at most write_buffer bytes."""
    pool = MemoryWorkerPool()
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    ch = FileChannel(fd, reactor=reactor, worker=pool, write_buffer=10)
    assert ch.write_nowait(b"abcdef") == 6  # accepted; the worker has not run
    assert ch.write_nowait(bytearray(b"ghijkl")) == 4  # only what fits the buffer
    assert ch.write_nowait(b"zz") is WOULD_BLOCK
    assert not ch.condition() & Condition.OUT
    assert path.read_bytes() == b""
    waiting = ch.wait(Condition.OUT)
    flushed = ch.flush()
    assert not waiting.called and not flushed.called
    # The first write went to the pool at once; the second waits its turn in the channel.
    assert pool.queued == 1
    assert pool.perform() and pool.flush() == 1
    assert path.read_bytes() == b"abcdef"
    assert waiting.called  # 4 bytes queued now: room again
    assert not flushed.called  # the flush waits for the last write
    assert pool.run_until_idle() == 1
    assert path.read_bytes() == b"abcdefghij"
    assert flushed.called
    assert ch.condition() & Condition.OUT
    closing = ch.close()
    pool.run_until_idle()
    assert closing.called
    await closing
    with pytest.raises(OSError):
        os.fstat(fd)  # the channel closed it


async def test_file_io_runs_in_worker_threads(reactor: Any, tmp_path: Path) -> None:
    threads: set[int] = set()

    class RecordingPool:
        def __init__(self) -> None:
            from qiotwisted._pool import ThreadWorkerPool

            self.pool = ThreadWorkerPool(reactor, size=1, name="test-file-worker")

        def submit(self, job: Any, *, on_stop: Any = None) -> Any:
            def wrapped() -> None:
                threads.add(threading.get_ident())
                job()

            return self.pool.submit(wrapped, on_stop=on_stop)

        def call_in_reactor(self, fn: Any) -> None:
            self.pool.call_in_reactor(fn)

        def stop(self) -> None:
            self.pool.stop()

    pool = RecordingPool()
    try:
        path = tmp_path / "f"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        ch = FileChannel.new_fd(fd, reactor=reactor, worker=pool)
        await ch.write_all(b"x" * 100_000)
        ch.seek(0)
        assert await ch.read_all(100_000) == b"x" * 100_000
        await ch.close()
    finally:
        pool.stop()
    assert threads and threading.get_ident() not in threads


async def test_file_write_error_surfaces_at_flush_and_close(reactor: Any) -> None:
    """/dev/full cannot be polled (thread mode) and fails every write with ENOSPC."""
    if not os.path.exists("/dev/full"):
        pytest.fail("/dev/full is missing")
    ch = FileChannel.new_path("/dev/full", os.O_WRONLY, reactor=reactor)
    assert ch.mode is FileMode.THREAD
    assert ch.write_nowait(b"data") == 4  # write-behind: accepted before it fails
    with pytest.raises(ChannelError, match="Unable to write to file: No space left on device"):
        await ch.flush()
    with pytest.raises(ChannelError, match="No space left on device"):
        ch.write_nowait(b"more")
    assert ch.condition() & Condition.ERR
    with pytest.raises(ChannelError, match="No space left on device"):
        await ch.close()
    assert ch.closed


async def test_dev_null_thread_mode(reactor: Any) -> None:
    ch = FileChannel.new_path(os.devnull, os.O_RDWR, reactor=reactor)
    assert ch.mode is FileMode.THREAD
    await ch.write_all(b"gone")
    assert await ch.read(10) == b""
    assert await ch.read_all_eof(10) == b""
    await ch.close()


async def test_thread_mode_watch_in_reads_ahead(reactor: Any, tmp_path: Path) -> None:
    """Nothing polls a regular file, so an IN watch makes the channel fetch data."""
    path = tmp_path / "f"
    path.write_bytes(b"hello")
    ch = FileChannel.new_path(path, os.O_RDONLY, reactor=reactor)
    got: list[Condition] = []
    done: defer.Deferred[None] = defer.Deferred()

    def func(channel: Any, cond: Condition, data: Any) -> bool:
        got.append(cond)
        done.callback(None)
        return False

    ch.add_watch(Condition.IN, func)
    await done
    assert got == [Condition.IN]
    assert ch.read_nowait(100) == b"hello"
    await ch.close()


async def test_wrong_direction_errors(reactor: Any, tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    ro = FileChannel.new_path(path, os.O_RDONLY, reactor=reactor)
    with pytest.raises(ChannelError, match="Unable to write to file: Bad file descriptor"):
        await ro.write(b"x")
    wo = FileChannel.new_path(path, os.O_WRONLY, reactor=reactor)
    with pytest.raises(ChannelError, match="Unable to read from file: Bad file descriptor"):
        await wo.read(1)
    await ro.close()
    await wo.close()
    with pytest.raises(ChannelClosedError):
        await ro.read(1)
    with pytest.raises(ChannelError, match="Channel is closed"):
        await ro.pread(1, 0)


def test_new_path_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(ChannelError, match=f"Could not open '{missing}': No such file"):
        FileChannel.new_path(missing, os.O_RDONLY)
    with pytest.raises(ChannelError, match="Could not dup FD"):
        FileChannel.new_dupfd(_closed_fd())
    with pytest.raises(ChannelError, match="Unable to use FD"):
        FileChannel.new_fd(_closed_fd())


def _closed_fd() -> int:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    return r


async def test_new_dupfd_leaves_the_original_usable(reactor: Any, tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"0123456789")
    fd = os.open(path, os.O_RDONLY)
    try:
        ch = FileChannel.new_dupfd(fd, reactor=reactor)
        assert ch.fd != fd
        assert await ch.read_all(4) == b"0123"
        await ch.close()
        # The dup shares the file offset: the original continues where the channel stopped.
        assert os.read(fd, 3) == b"456"
    finally:
        os.close(fd)


# ---- /io/channel/file/fd ------------------------------------------------------------------


async def test_io_channel_fd(reactor: Any, tmp_path: Path) -> None:
    """/io/channel/file/fd: a regular file's fd becomes a FileChannel."""
    path = tmp_path / "test-io-channel-file.txt"
    fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
    ioc = channel_new_fd(fd, reactor=reactor)
    assert type(ioc) is FileChannel
    assert ioc.fd == fd  # ownership taken, no dup
    await ioc.close()
    with pytest.raises(OSError):
        os.fstat(fd)


async def test_channel_new_fd_pipe_and_socket(reactor: Any) -> None:
    r, w = os.pipe()
    reader = channel_new_fd(r, reactor=reactor)
    writer = channel_new_fd(w, reactor=reactor)
    assert isinstance(reader, FileChannel) and reader.mode is FileMode.POLL
    assert not reader.has_feature(Feature.SEEKABLE)
    await writer.write_all(b"ping")
    assert await reader.read_all(4) == b"ping"
    await writer.close()
    await reader.close()

    a, b = socket.socketpair()
    try:
        sock = channel_new_fd(a.detach(), reactor=reactor)
        assert type(sock) is SocketChannel
        await sock.write_all(b"pong")
        b.setblocking(False)
        got = b""
        for _ in range(500):  # the transport sends on a later reactor turn
            await task.deferLater(reactor, 0.01)
            try:
                got += b.recv(4)
            except BlockingIOError:
                continue
            if len(got) == 4:
                break
        assert got == b"pong"
        await sock.close()
    finally:
        b.close()


def test_channel_new_fd_bad_fd() -> None:
    with pytest.raises(ChannelError, match="Unable to stat FD"):
        channel_new_fd(_closed_fd())


# ---- /io/channel/pipe/sync, /io/channel/pipe/async ------------------------------------------


@pytest.mark.parametrize("blocking", [False, True], ids=["sync", "async"])
async def test_io_channel_pipe(reactor: Any, blocking: bool) -> None:
    """/io/channel/pipe/{sync,async} (QEMU passes "async" as blocking, so do we)."""
    fds0 = _open_fds()
    readers0 = set(reactor.getReaders())
    r, w = os.pipe()
    src = FileChannel.new_fd(w, reactor=reactor)
    dst = FileChannel.new_fd(r, reactor=reactor)
    assert src.mode is FileMode.POLL and dst.mode is FileMode.POLL

    test = ChannelTest()
    await test.run(src, dst, blocking=blocking)
    test.validate()

    await src.close()
    await dst.close()
    assert set(reactor.getReaders()) == readers0
    assert _open_fds() == fds0


# ---- poll mode: watches, backpressure, HUP/ERR -------------------------------------------------


async def test_pipe_watches_in_out_hup(reactor: Any) -> None:
    r, w = os.pipe()
    src = FileChannel.new_fd(w, reactor=reactor)
    dst = FileChannel.new_fd(r, reactor=reactor)
    assert src.condition() == Condition.OUT
    assert dst.condition() == Condition(0)

    events: list[Condition] = []
    fired: list[defer.Deferred[None]] = [defer.Deferred()]

    def on_ready(channel: Any, cond: Condition, data: Any) -> bool:
        events.append(cond)
        fired[0].callback(None)
        return False

    dst.add_watch(Condition.IN | Condition.HUP, on_ready)
    await task.deferLater(reactor, 0.01)
    assert events == []  # nothing to read yet
    await src.write_all(b"abc")
    await fired[0]
    assert events == [Condition.IN]

    out_events: list[Condition] = []

    def on_out(channel: Any, cond: Condition, data: Any) -> bool:
        out_events.append(cond)
        return False

    src.add_watch(Condition.OUT, on_out)
    await task.deferLater(reactor, 0)
    assert out_events == [Condition.OUT]

    await src.close()  # the writer goes: HUP for the reader, after the data
    fired[0] = defer.Deferred()
    dst.add_watch(Condition.IN | Condition.HUP, on_ready)
    await fired[0]
    assert events[-1] == Condition.IN | Condition.HUP
    assert dst.read_nowait(10) == b"abc"
    assert dst.read_nowait(10) == b""
    assert await dst.wait(Condition.IN) == Condition.IN | Condition.HUP
    await dst.close()


async def test_pipe_backpressure_and_wait(reactor: Any) -> None:
    r, w = os.pipe()
    src = FileChannel.new_fd(w, reactor=reactor)
    dst = FileChannel.new_fd(r, reactor=reactor)
    block = b"z" * 65536
    written = 0
    for _ in range(1000):  # the pipe fills long before this bound
        n = src.write_nowait(block)
        if n is WOULD_BLOCK:
            break
        written += n
    else:
        pytest.fail("a pipe never filled")
    assert not src.condition() & Condition.OUT
    writable = src.wait(Condition.OUT)
    await task.deferLater(reactor, 0.01)
    assert not writable.called
    assert src.fd in {s.fileno() for s in reactor.getWriters()}  # registered while waited on

    got = 0
    for _ in range(1000):
        data = dst.read_nowait(1 << 20)
        if data is WOULD_BLOCK:
            break
        got += len(data)
    assert got == written
    assert await writable & Condition.OUT
    await task.deferLater(reactor, 0)
    # Nobody waits any more: the fd is no longer registered with the reactor.
    assert src.fd not in {s.fileno() for s in reactor.getWriters()}
    await src.close()
    await dst.close()


async def test_pipe_broken_pipe(reactor: Any) -> None:
    r, w = os.pipe()
    src = FileChannel.new_fd(w, reactor=reactor)
    os.close(r)  # the reader is gone
    assert src.condition() & Condition.ERR
    assert await src.wait(Condition.OUT) & Condition.ERR
    with pytest.raises(ChannelError, match="Unable to write to file: Broken pipe"):
        await src.write(b"x")
    await src.close()


async def test_pipe_wait_for_hup_in_reactor(reactor: Any) -> None:
    """A reader parked in wait(IN) wakes when the writer closes (HUP, no data)."""
    r, w = os.pipe()
    dst = FileChannel.new_fd(r, reactor=reactor)
    reading = dst.read(10)
    assert not reading.called
    reactor.callLater(0.01, os.close, w)
    assert await reading == b""
    await task.deferLater(reactor, 0)
    assert dst.fd not in {s.fileno() for s in reactor.getReaders()}
    await dst.close()


async def test_pipe_cancelled_wait_unregisters(reactor: Any) -> None:
    r, w = os.pipe()
    dst = FileChannel.new_fd(r, reactor=reactor)
    waiting = dst.wait(Condition.IN)
    assert dst.fd in {s.fileno() for s in reactor.getReaders()}
    waiting.cancel()
    with pytest.raises(defer.CancelledError):
        await waiting
    os.write(w, b"x")  # wakes the stale registration once, which then goes away
    await task.deferLater(reactor, 0.01)
    assert dst.fd not in {s.fileno() for s in reactor.getReaders()}
    assert dst.read_nowait(5) == b"x"
    os.close(w)
    await dst.close()


async def test_pipe_not_seekable(reactor: Any) -> None:
    r, w = os.pipe()
    ch = FileChannel.new_fd(r, reactor=reactor)
    with pytest.raises(ChannelError, match="Illegal seek"):
        ch.seek(0)
    with pytest.raises(ChannelError, match="Requested channel is not seekable"):
        await ch.pread(1, 0)
    await ch.flush()  # poll mode: nothing is queued
    os.close(w)
    await ch.close()


async def test_close_restores_blocking_mode(reactor: Any) -> None:
    r, w = os.pipe()
    try:
        ch = FileChannel.new_dupfd(r, reactor=reactor)
        assert fcntl.fcntl(r, fcntl.F_GETFL) & os.O_NONBLOCK  # shared file description
        await ch.close()
        assert not fcntl.fcntl(r, fcntl.F_GETFL) & os.O_NONBLOCK
    finally:
        os.close(r)
        os.close(w)


async def test_fifo_poll_mode(reactor: Any, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    dst = FileChannel.new_path(fifo, os.O_RDONLY | os.O_NONBLOCK, reactor=reactor)
    src = FileChannel.new_path(fifo, os.O_WRONLY, reactor=reactor)
    assert dst.mode is FileMode.POLL and src.mode is FileMode.POLL
    test = ChannelTest()
    await test.run(src, dst, blocking=True)
    test.validate()
    await src.close()
    assert await dst.read(1) == b""
    await dst.close()


def _iov_total(iov: Sequence[bytes]) -> int:
    return sum(len(b) for b in iov)


async def test_writev_many_iovecs_pipe(reactor: Any) -> None:
    """More iovecs than IOV_MAX are written in slices, not refused with EINVAL."""
    r, w = os.pipe()
    src = FileChannel.new_fd(w, reactor=reactor)
    dst = FileChannel.new_fd(r, reactor=reactor)
    iov = [bytes([i % 256]) for i in range(3000)]
    reading = dst.read_all(_iov_total(iov))
    await src.writev_all(iov)
    assert await reading == b"".join(iov)
    await src.close()
    await dst.close()


async def test_small_reads_across_read_ahead(reactor: Any, tmp_path: Path) -> None:
    """Odd-sized reads over several read-ahead chunks return the file in order."""
    path = tmp_path / "f"
    content = bytes(i * 7 % 251 for i in range(700_000))
    path.write_bytes(content)
    ch = FileChannel.new_path(path, os.O_RDONLY, reactor=reactor)
    got = bytearray()
    for _ in range(len(content)):  # bounded: every read returns data until EOF
        data = await ch.read(4093)
        if not data:
            break
        got += data
    assert bytes(got) == content
    assert ch.seek(0, os.SEEK_CUR) == len(content)
    assert ch.seek(10) == 10
    assert await ch.read_all(5) == content[10:15]
    await ch.close()


async def test_writev_many_iovecs_file(reactor: Any, tmp_path: Path) -> None:
    """Thread mode: one worker job of more than IOV_MAX buffers is written in slices."""
    path = tmp_path / "f"
    ch = FileChannel.new_path(path, os.O_WRONLY | os.O_CREAT, 0o600, reactor=reactor)
    iov = [bytes([i % 256]) * (1 + i % 3) for i in range(3000)]
    await ch.writev_all(iov)
    await ch.close()
    assert path.read_bytes() == b"".join(iov)
