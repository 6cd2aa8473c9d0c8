"""NullChannel: QEMU's tests/unit/test-io-channel-null.c, ported, plus its edges."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import task

from qiotwisted.channel import WOULD_BLOCK, Condition, Feature
from qiotwisted.channel.null import NullChannel
from qiotwisted.errors import ChannelClosedError, ChannelEOFError, ChannelError
from tests.channel_helpers import TurnReactor


def _record(gotcond: list[Condition]) -> Any:
    def func(channel: Any, condition: Condition, data: Any) -> bool:
        gotcond.append(condition)
        return False  # G_SOURCE_REMOVE

    return func


async def test_null_io(reactor: Any) -> None:
    """/io/channel/null/io."""
    null = NullChannel(reactor=reactor)

    assert await null.write(b"Hello World") == 11
    assert await null.read(1024) == b""

    gotcond: list[Condition] = []
    notified: list[str] = []
    watch = null.add_watch(Condition.IN, _record(gotcond), "in", notified.append)
    assert gotcond == []  # dispatched on a reactor turn, never inside add_watch
    await task.deferLater(reactor, 0)
    assert gotcond == [Condition.IN]
    assert not watch.active  # returning False removed it
    assert notified == ["in"]

    gotcond.clear()
    null.add_watch(Condition.IN | Condition.OUT, _record(gotcond))
    await task.deferLater(reactor, 0)
    assert gotcond == [Condition.IN | Condition.OUT]

    await null.close()

    with pytest.raises(ChannelError, match="Channel is closed"):
        await null.write(b"Hello World")
    with pytest.raises(ChannelError, match="Channel is closed"):
        await null.read(1024)
    with pytest.raises(ChannelClosedError):
        null.write_nowait(b"x")
    with pytest.raises(ChannelClosedError):
        null.read_nowait(1)


async def test_null_watch_reports_only_what_was_asked(reactor: Any) -> None:
    gotcond: list[Condition] = []
    null = NullChannel(reactor=reactor)
    null.add_watch(Condition.OUT | Condition.HUP, _record(gotcond))
    await task.deferLater(reactor, 0)
    assert gotcond == [Condition.OUT]
    await null.close()


async def test_null_watch_is_level_triggered_until_removed(reactor: Any) -> None:
    calls: list[Condition] = []

    def func(channel: Any, condition: Condition, data: Any) -> bool:
        calls.append(condition)
        return len(calls) < 3

    null = NullChannel(reactor=reactor)
    watch = null.add_watch(Condition.OUT, func)
    for _ in range(5):
        await task.deferLater(reactor, 0)
    assert calls == [Condition.OUT] * 3
    assert not watch.active
    await null.close()


async def test_null_swallows_bulk_and_reads_eof(reactor: Any) -> None:
    null = NullChannel.new(reactor=reactor)
    assert null.write_nowait(b"abc") == 3
    assert null.writev_nowait([b"ab", bytearray(b"cde"), memoryview(b"f")]) == 6
    assert null.read_nowait(10) == b""
    assert null.read_nowait(10) is not WOULD_BLOCK
    await null.writev_all([b"x" * 4194] * 250)
    assert await null.read_all_eof(100) == b""
    with pytest.raises(ChannelEOFError, match="Unexpected end-of-file"):
        await null.read_all(100)
    assert await null.wait(Condition.IN) == Condition.IN
    assert await null.wait(Condition.OUT) == Condition.OUT
    assert null.condition() == Condition.IN | Condition.OUT
    await null.close()
    assert null.condition() == Condition(0)


async def test_null_seek_features_and_close(reactor: Any) -> None:
    null = NullChannel(reactor=reactor, name="sink")
    assert null.seek(1234) == 0  # QEMU's null seek ignores its arguments
    assert null.features == Feature(0)
    assert "sink" in repr(null)
    with pytest.raises(ChannelError, match="shutdown not supported"):
        null.shutdown()
    d1 = null.close()
    d2 = null.close()  # closing twice is harmless
    await d1
    await d2
    assert d1.called and d2.called
    assert null.closed
    with pytest.raises(ChannelError, match="Channel is closed"):
        null.seek(0)


async def test_null_close_removes_watches_and_fails_waiters(reactor: Any) -> None:
    null = NullChannel(reactor=reactor)
    notified: list[object] = []
    watch = null.add_watch(Condition.IN, lambda c, cond, d: True, "data", notified.append)
    await null.close()
    assert not watch.active
    assert notified == ["data"]
    with pytest.raises(ChannelClosedError):
        await null.wait(Condition.IN)


def test_null_watch_fires_on_exactly_one_turn() -> None:
    """The same scenario with a step-able reactor: one turn, one dispatch."""
    turns = TurnReactor()
    null = NullChannel(reactor=turns)  # type: ignore[arg-type]  # a step-able fake, not a full IReactorTime
    gotcond: list[Condition] = []
    watch = null.add_watch(Condition.IN, _record(gotcond))
    assert gotcond == []
    assert turns.turn() == 1
    assert gotcond == [Condition.IN]
    assert not watch.active
    assert turns.pending() == []  # removed: nothing rescheduled
    null.add_watch(Condition.IN | Condition.OUT, _record(gotcond))
    turns.turn()
    assert gotcond == [Condition.IN, Condition.IN | Condition.OUT]
    null.close()
    assert turns.pending() == []
