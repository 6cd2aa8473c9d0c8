"""CommandChannel: QEMU's tests/unit/test-io-channel-command.c, ported, plus the process
life cycle (EOF, shutdown, SIGTERM/SIGKILL at close, reaping) and read backpressure.

socat is required: a missing socat fails these tests (QEMU skips them).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import task

from qiotwisted.channel import WOULD_BLOCK, Condition, Feature, Shutdown
from qiotwisted.channel.command import CommandChannel, CommandExit
from qiotwisted.errors import ChannelError
from tests.channel_helpers import ChannelTest

TEST_FIFO = "test-io-channel-command.fifo"


def _socat() -> str:
    socat = shutil.which("socat")
    assert socat is not None, "socat is not found in PATH (the project's set-up installs it)"
    return socat


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _assert_reaped(pid: int | None) -> None:
    """The child is gone and was waited for: no zombie left."""
    assert pid is not None
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    assert not os.path.exists(f"/proc/{pid}")


# ---- /io/channel/command/fifo/{sync,async} ------------------------------------------------


@pytest.mark.timeout_s(30)
@pytest.mark.parametrize("blocking", [False, True], ids=["sync", "async"])
async def test_io_channel_command_fifo(reactor: Any, tmp_path: Path, blocking: bool) -> None:
    """/io/channel/command/fifo/{sync,async}: two socat children around a FIFO."""
    socat = _socat()
    fds0 = _open_fds()
    fifo = tmp_path / TEST_FIFO
    os.mkfifo(fifo, 0o600)
    src = CommandChannel.new_spawn(
        [socat, "-", f"PIPE:{fifo},wronly"], os.O_WRONLY, reactor=reactor
    )
    dst = CommandChannel.new_spawn(
        [socat, f"PIPE:{fifo},rdonly", "-"], os.O_RDONLY, reactor=reactor
    )

    test = ChannelTest()
    await test.run(src, dst, blocking=blocking)
    test.validate()

    await src.close()  # socat sees EOF on stdin and closes the FIFO...
    await dst.close()  # ...so the reader's socat sees EOF and exits too
    for ch in (src, dst):
        assert ch.exit_status == CommandExit(ch.pid or -1, 0, None)
        assert ch.signals_sent == []  # both ended by themselves
        _assert_reaped(ch.pid)
    fifo.unlink()
    assert _open_fds() == fds0


# ---- /io/channel/command/echo/{sync,async} ------------------------------------------------


@pytest.mark.timeout_s(30)
@pytest.mark.parametrize("blocking", [False, True], ids=["sync", "async"])
async def test_io_channel_command_echo(reactor: Any, blocking: bool) -> None:
    """/io/channel/command/echo/{sync,async}: one ``socat - -`` is both src and dst."""
    socat = _socat()
    fds0 = _open_fds()
    ioc = CommandChannel.new_spawn([socat, "-", "-"], os.O_RDWR, reactor=reactor)
    assert ioc.has_feature(Feature.SHUTDOWN)

    test = ChannelTest()
    await test.run(ioc, ioc, blocking=blocking)
    test.validate()

    await ioc.close()
    assert ioc.exit_status is not None and ioc.exit_status.success
    _assert_reaped(ioc.pid)
    assert _open_fds() == fds0


# ---- directions ---------------------------------------------------------------------------


async def test_read_only_command(reactor: Any) -> None:
    ch = CommandChannel.new_spawn(["printf", "hello"], os.O_RDONLY, reactor=reactor)
    assert await ch.read_all(5) == b"hello"
    assert await ch.read(1) == b""
    assert await ch.read_all_eof(1) == b""
    with pytest.raises(ChannelError, match="spawned O_RDONLY"):
        await ch.write(b"x")
    await ch.close()
    assert ch.exit_status == CommandExit(ch.pid or -1, 0, None)
    _assert_reaped(ch.pid)


async def test_read_only_command_stdin_is_dev_null(reactor: Any) -> None:
    """QEMU gives an O_RDONLY child /dev/null as stdin: cat sees EOF at once."""
    ch = CommandChannel.new_spawn(["cat"], os.O_RDONLY, reactor=reactor)
    assert await ch.read(10) == b""
    await ch.close()
    assert ch.signals_sent == []
    assert ch.exit_status is not None and ch.exit_status.success


async def test_write_only_command(reactor: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    ch = CommandChannel.new_spawn(
        ["sh", "-c", f"cat > '{out}'; echo to-dev-null"], os.O_WRONLY, reactor=reactor
    )
    test = ChannelTest()
    await test.run_writer(ch)
    assert test.writeerr is None
    assert await ch.read(10) == b""  # stdout is /dev/null: reads see EOF, as in QEMU
    await ch.close()
    assert ch.exit_status is not None and ch.exit_status.success
    assert out.read_bytes() == test.input


async def test_shutdown_write_closes_child_stdin(reactor: Any) -> None:
    ch = CommandChannel.new_spawn(["cat"], os.O_RDWR, reactor=reactor)
    await ch.write_all(b"abc")
    ch.shutdown(Shutdown.WRITE)
    with pytest.raises(ChannelError, match="Broken pipe"):
        await ch.write(b"late")
    assert not ch.condition() & Condition.OUT
    # cat sees EOF, prints what it had and exits: we read it all, then EOF.
    data = b""
    for _ in range(100):
        chunk = await ch.read(100)
        if not chunk:
            break
        data += chunk
    assert data == b"abc"
    ended = await ch.when_ended()
    assert ended.success
    assert ch.condition() & Condition.HUP
    await ch.close()
    assert ch.signals_sent == []
    _assert_reaped(ch.pid)


async def test_shutdown_read_gives_eof(reactor: Any) -> None:
    ch = CommandChannel.new_spawn(["cat"], os.O_RDWR, reactor=reactor)
    ch.shutdown(Shutdown.READ)
    assert await ch.read(10) == b""
    await ch.close()  # cat sees EOF on stdin and exits
    assert ch.exit_status is not None and ch.exit_status.success


async def test_write_after_child_exit_is_broken_pipe(reactor: Any) -> None:
    ch = CommandChannel.new_spawn(["true"], os.O_WRONLY, reactor=reactor)
    assert (await ch.when_ended()).success
    assert ch.condition() & Condition.ERR
    with pytest.raises(ChannelError, match="Unable to write to command: Broken pipe"):
        await ch.write(b"x")
    await ch.close()
    _assert_reaped(ch.pid)


async def test_exit_code_reported(reactor: Any) -> None:
    ch = CommandChannel.new_spawn(["sh", "-c", "exit 3"], os.O_RDONLY, reactor=reactor)
    assert await ch.read(1) == b""
    await ch.close()  # a failing child is not a close error, as in QEMU
    assert ch.exit_status == CommandExit(ch.pid or -1, 3, None)
    assert not ch.exit_status.success


# ---- terminating the child at close -------------------------------------------------------


async def test_close_kills_child_that_ignores_sigterm(reactor: Any) -> None:
    fds0 = _open_fds()
    ch = CommandChannel.new_spawn(
        ["sh", "-c", 'trap "" TERM; echo ready; exec sleep 60'],
        os.O_RDWR,
        reactor=reactor,
        term_timeout=0.05,
        kill_timeout=0.2,
    )
    # Wait until the trap is set, or SIGTERM could arrive before it.
    assert await ch.read_all(6) == b"ready\n"
    await ch.close()
    assert ch.signals_sent == [signal.SIGTERM, signal.SIGKILL]
    assert ch.exit_status == CommandExit(ch.pid or -1, None, signal.SIGKILL)
    _assert_reaped(ch.pid)
    assert _open_fds() == fds0


async def test_close_terminates_child_that_ignores_eof(reactor: Any) -> None:
    ch = CommandChannel.new_spawn(
        ["sleep", "60"], os.O_RDWR, reactor=reactor, term_timeout=0.05, kill_timeout=5
    )
    await ch.close()
    assert ch.signals_sent == [signal.SIGTERM]
    assert ch.exit_status == CommandExit(ch.pid or -1, None, signal.SIGTERM)
    _assert_reaped(ch.pid)


async def test_abort_signals_at_once(reactor: Any) -> None:
    ch = CommandChannel.new_spawn(["sleep", "60"], os.O_RDONLY, reactor=reactor, kill_timeout=5)
    await ch.abort()
    assert ch.signals_sent == [signal.SIGTERM]
    assert ch.exit_status is not None and ch.exit_status.signal == signal.SIGTERM
    _assert_reaped(ch.pid)


async def test_close_twice_and_after_exit(reactor: Any) -> None:
    ch = CommandChannel.new_spawn(["true"], os.O_RDONLY, reactor=reactor)
    await ch.when_ended()
    d1 = ch.close()
    d2 = ch.close()
    await d1
    await d2
    assert ch.closed and ch.signals_sent == []
    with pytest.raises(ChannelError, match="Channel is closed"):
        await ch.read(1)


async def test_close_with_unread_output(reactor: Any) -> None:
    """A child blocked writing output nobody reads dies of EPIPE when we close."""
    ch = CommandChannel.new_spawn(
        ["sh", "-c", "exec yes"], os.O_RDONLY, reactor=reactor, high_water=65536, low_water=0
    )
    for _ in range(500):
        if ch.reading_paused:
            break
        await task.deferLater(reactor, 0.01)
    assert ch.reading_paused
    await ch.close()
    assert ch.exit_status is not None
    assert ch.exit_status.signal == signal.SIGPIPE or ch.exit_status.exit_code != 0
    assert ch.signals_sent == []
    _assert_reaped(ch.pid)


# ---- backpressure -------------------------------------------------------------------------


@pytest.mark.timeout_s(30)
async def test_read_backpressure_bounds_the_buffer(reactor: Any) -> None:
    total = 8 * 1024 * 1024
    high = 128 * 1024
    ch = CommandChannel.new_spawn(
        ["head", "-c", str(total), "/dev/zero"],
        os.O_RDONLY,
        reactor=reactor,
        high_water=high,
        low_water=32 * 1024,
    )
    for _ in range(500):
        if ch.reading_paused:
            break
        await task.deferLater(reactor, 0.01)
    assert ch.reading_paused
    await task.deferLater(reactor, 0.05)
    # Paused: the child blocks on a full pipe instead of filling our memory.
    assert high < ch.buffered <= high + 1024 * 1024
    got = 0
    peak = 0
    for _ in range(100_000):
        data = await ch.read(65536)
        if not data:
            break
        assert data == bytes(len(data))
        got += len(data)
        peak = max(peak, ch.buffered)
    assert got == total
    assert peak <= high + 1024 * 1024
    await ch.close()
    assert ch.exit_status is not None and ch.exit_status.success


async def test_write_backpressure(reactor: Any) -> None:
    """A child that does not read: writes go WOULD_BLOCK once the pipe and buffer fill."""
    ch = CommandChannel.new_spawn(
        ["sh", "-c", 'trap "" TERM; echo ready; exec sleep 60'],
        os.O_RDWR,
        reactor=reactor,
        term_timeout=0.05,
        kill_timeout=0.2,
    )
    assert await ch.read_all(6) == b"ready\n"
    block = b"w" * 65536
    for _ in range(1000):
        n = ch.write_nowait(block)
        if n is WOULD_BLOCK:
            break
        await task.deferLater(reactor, 0)
    else:
        pytest.fail("writes never blocked")
    assert not ch.condition() & Condition.OUT
    pending = ch.write(b"more")
    assert not pending.called
    await ch.close()  # the write waiter fails, the child is killed
    with pytest.raises(ChannelError):
        await pending
    assert ch.exit_status is not None and ch.exit_status.signal == signal.SIGKILL
    _assert_reaped(ch.pid)


# ---- errors -------------------------------------------------------------------------------


def test_spawn_errors() -> None:
    with pytest.raises(ChannelError, match="Unable to spawn command 'no-such-program-qio'"):
        CommandChannel.new_spawn(["no-such-program-qio"], os.O_RDONLY)
    with pytest.raises(ChannelError, match="Unable to spawn command '/nonexistent/prog'"):
        CommandChannel.new_spawn(["/nonexistent/prog"], os.O_RDONLY)
    with pytest.raises(ValueError, match="argv"):
        CommandChannel.new_spawn([], os.O_RDONLY)
    with pytest.raises(ValueError, match="flags"):
        CommandChannel.new_spawn(["true"], os.O_ACCMODE)


async def test_env_and_cwd(reactor: Any, tmp_path: Path) -> None:
    ch = CommandChannel.new_spawn(
        [sys.executable, "-c", "import os; print(os.environ['QIO_X'], os.getcwd())"],
        os.O_RDONLY,
        reactor=reactor,
        env={"QIO_X": "42"},
        cwd=str(tmp_path),
    )
    out = b""
    for _ in range(100):
        chunk = await ch.read(1024)
        if not chunk:
            break
        out += chunk
    assert out.decode().split() == ["42", str(tmp_path)]
    await ch.close()
