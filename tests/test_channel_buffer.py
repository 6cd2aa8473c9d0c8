"""BufferChannel: QEMU's tests/unit/test-io-channel-buffer.c plus the buffer's own rules."""

from __future__ import annotations

import os
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from qiotwisted.channel import BufferChannel, Channel, Condition, Feature
from qiotwisted.errors import ChannelClosedError, ChannelError
from tests.channel_helpers import TOTAL, ChannelTest, TurnReactor


def result_of(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


async def test_io_channel_buf() -> None:
    """/io/channel/buf: writev_all of 1,048,500 bytes in 250 iovecs, offset = 0, readv_all."""
    buf = BufferChannel(0)
    test = ChannelTest()
    await test.run_writer(buf)
    assert buf.usage == TOTAL and buf.offset == TOTAL
    buf.offset = 0
    await test.run_reader(buf)
    test.validate()
    await buf.close()


async def test_io_channel_buf_nonblocking_primitives() -> None:
    buf = BufferChannel()
    test = ChannelTest()
    await test.run_writer(buf, blocking=False)
    buf.offset = 0
    await test.run_reader(buf, blocking=False)
    test.validate()
    await buf.close()


def test_features() -> None:
    buf = BufferChannel()
    assert buf.has_feature(Feature.SEEKABLE)
    assert not buf.has_feature(Feature.FD_PASS)
    assert not buf.has_feature(Feature.SHUTDOWN)
    assert isinstance(buf, Channel)


def test_read_from_offset_and_eof() -> None:
    buf = BufferChannel()
    assert buf.write_nowait(b"hello world") == 11
    assert (buf.usage, buf.offset) == (11, 11)
    assert buf.read_nowait(5) == b"", "reading at usage is EOF"
    buf.offset = 6
    assert buf.read_nowait(100) == b"world"
    assert buf.offset == 11
    assert result_of(buf.read(1)) == b""
    assert result_of(buf.read_all_eof(4)) == b""
    with pytest.raises(ChannelError, match="Unexpected end-of-file before all data were read"):
        buf.offset = 8
        result_of(buf.read_all(10))


def test_write_at_offset_overwrites_and_extends() -> None:
    buf = BufferChannel(16)
    assert buf.capacity == 16 and buf.usage == 0
    buf.write_nowait(b"abcdef")
    buf.seek(2)
    buf.writev_nowait([b"XY", bytearray(b"Z")])
    assert buf.getvalue() == b"abXYZf" and buf.offset == 5
    buf.write_nowait(b"1234")  # runs past usage
    assert buf.getvalue() == b"abXYZ1234" and buf.usage == 9
    assert buf.capacity == 16


def test_write_past_usage_zero_fills_the_gap() -> None:
    buf = BufferChannel()
    buf.write_nowait(b"ab")
    buf.offset = 5
    buf.write_nowait(memoryview(b"cd"))
    assert buf.getvalue() == b"ab\0\0\0cd"
    assert (buf.usage, buf.offset) == (7, 7)


def test_seek_whence() -> None:
    buf = BufferChannel()
    buf.write_nowait(b"0123456789")
    assert buf.seek(3) == 3
    assert buf.seek(2, os.SEEK_CUR) == 5
    assert buf.read_nowait(2) == b"56"
    assert buf.seek(-3, os.SEEK_END) == 7
    assert buf.read_nowait(10) == b"789"
    with pytest.raises(ChannelError, match="Invalid seek offset"):
        buf.seek(-1)
    with pytest.raises(ValueError):
        buf.offset = -1


def test_peek_and_fds_unsupported() -> None:
    buf = BufferChannel()
    buf.write_nowait(b"x")
    with pytest.raises(ChannelError, match="Channel does not support peek read"):
        buf.read_nowait(1, peek=True)
    with pytest.raises(ChannelError, match="Channel does not support file descriptor passing"):
        buf.write_nowait(b"x", [0])
    with pytest.raises(ChannelError, match="Data path shutdown not supported"):
        buf.shutdown()


def test_watch_always_ready_and_masked() -> None:
    clock = TurnReactor()
    buf = BufferChannel(reactor=clock)  # type: ignore[arg-type]  # a step-able fake, not a full IReactorTime
    seen: list[tuple[str, Condition]] = []

    def record(ch: Channel, cond: Condition, tag: str) -> bool:
        seen.append((tag, cond))
        return tag != "in"  # the IN watch removes itself after one call

    buf.add_watch(Condition.IN, record, "in")
    buf.add_watch(Condition.IN | Condition.OUT | Condition.HUP, record, "all")
    assert seen == [], "watches never fire inside add_watch"
    clock.turn()
    assert seen == [("in", Condition.IN), ("all", Condition.IN | Condition.OUT)]
    clock.turn()
    assert seen[2:] == [("all", Condition.IN | Condition.OUT)], "level-triggered: fires again"
    result_of(buf.close())
    assert clock.pending() == []


def test_close_frees_and_blocks_io() -> None:
    buf = BufferChannel()
    buf.write_nowait(b"data")
    result_of(buf.close())
    assert (buf.usage, buf.offset, buf.capacity) == (0, 0, 0)
    with pytest.raises(ChannelClosedError, match="Channel is closed"):
        buf.read_nowait(1)
    with pytest.raises(ChannelClosedError):
        result_of(buf.write_all(b"x"))
    assert result_of(buf.close()) is None, "a second close reports the first close's outcome"
