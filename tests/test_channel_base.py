"""The Channel base class: watches, wait, the *_all family and close, on an in-memory channel.

Reactor-free: a :class:`TurnReactor` stands in for the reactor so each test
decides when a reactor turn happens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure

from qiotwisted.channel import WOULD_BLOCK, Channel, Condition, Feature, Shutdown, WouldBlock
from qiotwisted.channel._base import Buffer
from qiotwisted.errors import ChannelClosedError, ChannelEOFError, ChannelError
from tests.channel_helpers import TurnReactor


class FakeChannel(Channel):
    """A channel over two in-memory queues; the test controls readiness."""

    def __init__(self, reactor: TurnReactor, features: Feature = Feature.CONCURRENT_IO) -> None:
        super().__init__(reactor=reactor)  # type: ignore[arg-type]  # a step-able fake, not a full IReactorTime
        self.features = features
        self.inbox = bytearray()
        self.inbox_fds: list[int] = []
        self.eof = False
        self.extra = Condition(0)
        self.blocked = False
        self.max_write: int | None = None
        self.sent = bytearray()
        self.sent_fds: list[list[int]] = []
        self.write_calls = 0
        self.close_result: Any = None
        self.close_calls = 0

    def feed(self, data: bytes = b"", *, eof: bool = False) -> None:
        self.inbox += data
        self.eof = self.eof or eof
        self._ready_changed()

    def _io_read(self, nbytes: int, *, peek: bool = False) -> bytes | WouldBlock:
        if not self.inbox:
            return b"" if self.eof else WOULD_BLOCK
        data = bytes(self.inbox[:nbytes])
        if not peek:
            del self.inbox[:nbytes]
        return data

    def _io_take_fds(self) -> list[int]:
        fds, self.inbox_fds = self.inbox_fds, []
        return fds

    def _io_write(self, chunks: Sequence[Buffer], fds: Sequence[int]) -> int | WouldBlock:
        if self.blocked:
            return WOULD_BLOCK
        self.write_calls += 1
        data = b"".join(bytes(c) for c in chunks)
        if self.max_write is not None:
            data = data[: self.max_write]
        self.sent += data
        self.sent_fds.append(list(fds))
        return len(data)

    def _io_condition(self) -> Condition:
        cond = self.extra
        if self.inbox or self.eof:
            cond |= Condition.IN
        if not self.blocked:
            cond |= Condition.OUT
        return cond

    def _io_close(self) -> Deferred[None] | None:
        self.close_calls += 1
        if isinstance(self.close_result, Exception):
            raise self.close_result
        return self.close_result


def result_of(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def failure_of(d: Deferred[Any]) -> BaseException:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out and isinstance(out[0], Failure), f"expected a failure, got {out!r}"
    value = out[0].value
    assert value is not None
    return value


def not_fired(d: Deferred[Any]) -> bool:
    return not d.called


def recorder(log: list[Any], keep: bool) -> Any:
    """A watch function that appends ``(data, condition)`` to *log* and returns *keep*."""

    def func(channel: Channel, cond: Condition, data: Any) -> bool:
        log.append((data, cond))
        return keep

    return func


@pytest.fixture
def turns() -> TurnReactor:
    return TurnReactor()


@pytest.fixture
def ch(turns: TurnReactor) -> FakeChannel:
    return FakeChannel(turns)


# ---- watches -----------------------------------------------------------------------


def test_watch_is_level_triggered(ch: FakeChannel, turns: TurnReactor) -> None:
    calls: list[Any] = []
    ch.add_watch(Condition.IN, recorder(calls, True))
    turns.turn()
    assert calls == [], "not ready: not called"
    ch.feed(b"x")
    assert calls == [], "never called synchronously"
    for _ in range(3):
        turns.turn()
    assert calls == [(None, Condition.IN)] * 3, "called on every turn while the condition holds"
    ch.read_nowait(1)
    turns.turn()
    assert len(calls) == 3, "not called once the condition stops holding"
    assert turns.pending() == [], "no busy loop while nothing is ready"


def test_watch_returning_false_is_removed_and_notified_once(
    ch: FakeChannel, turns: TurnReactor
) -> None:
    calls: list[Any] = []
    notified: list[Any] = []
    watch = ch.add_watch(Condition.OUT, recorder(calls, False), "d", notified.append)
    turns.turn()
    turns.turn()
    assert calls == [("d", Condition.OUT)]
    assert notified == ["d"]
    assert not watch.active
    watch.remove()
    assert notified == ["d"], "removing again does not notify again"


def test_watch_removed_by_handle_notifies_once(ch: FakeChannel, turns: TurnReactor) -> None:
    notified: list[Any] = []
    watch = ch.add_watch(Condition.OUT, lambda *a: True, 7, notified.append)
    watch.remove()
    watch.remove()
    turns.turn()
    assert notified == [7]


def test_watch_that_raises_is_logged_and_removed(ch: FakeChannel, turns: TurnReactor) -> None:
    notified: list[Any] = []

    def boom(c: Channel, cond: Condition, data: Any) -> bool:
        raise RuntimeError("watch bug")

    ch.add_watch(Condition.OUT, boom, None, notified.append)
    with capturedLogs() as events:
        turns.turn()
        turns.turn()
    failures = [e for e in events if e.get("log_failure") is not None]
    assert len(failures) == 1
    assert failures[0]["log_level"] == LogLevel.critical
    assert isinstance(failures[0]["log_failure"].value, RuntimeError)
    assert notified == [None]


def test_watch_sees_hup_and_err_only_when_requested(ch: FakeChannel, turns: TurnReactor) -> None:
    ch.extra = Condition.HUP | Condition.ERR
    ch.feed(b"x")
    log: list[Any] = []
    ch.add_watch(Condition.IN, recorder(log, False), "in")
    ch.add_watch(Condition.IN | Condition.HUP, recorder(log, False), "hup")
    ch.add_watch(Condition.ERR, recorder(log, False), "err")
    turns.turn()
    assert dict(log) == {
        "in": Condition.IN,
        "hup": Condition.IN | Condition.HUP,
        "err": Condition.ERR,
    }


def test_close_removes_watches_and_cancels_dispatch(ch: FakeChannel, turns: TurnReactor) -> None:
    notified: list[Any] = []
    ch.add_watch(Condition.OUT, lambda *a: True, 1, notified.append)
    ch.add_watch(Condition.IN, lambda *a: True, 2, notified.append)
    assert turns.pending()
    result_of(ch.close())
    assert sorted(notified) == [1, 2]
    assert turns.pending() == [], "the pending dispatch is cancelled"


def test_watch_closing_the_channel_stops_dispatch(ch: FakeChannel, turns: TurnReactor) -> None:
    calls: list[int] = []

    def closer(c: Channel, cond: Condition, data: Any) -> bool:
        calls.append(data)
        c.close()
        return True

    ch.add_watch(Condition.OUT, closer, 1)
    ch.add_watch(Condition.OUT, closer, 2)
    turns.turn()
    assert calls == [1], "the second watch was removed by the close"
    assert turns.pending() == []


# ---- wait ------------------------------------------------------------------------------


def test_wait_one_waiter_per_direction_and_cancel_frees_slot(ch: FakeChannel) -> None:
    first = ch.wait(Condition.IN)
    assert not_fired(first)
    second = ch.wait(Condition.IN)
    err = failure_of(second)
    assert isinstance(err, ChannelError) and "already waiting to read" in str(err)
    ch.blocked = True
    writer = ch.wait(Condition.OUT)
    assert not_fired(writer), "a writer may wait while a reader waits"
    first.cancel()
    assert isinstance(failure_of(first), CancelledError)
    third = ch.wait(Condition.IN)
    ch.feed(b"z")
    assert result_of(third) == Condition.IN
    ch.blocked = False
    ch._ready_changed()
    assert result_of(writer) == Condition.OUT


def test_wait_is_woken_by_hup(ch: FakeChannel) -> None:
    ch.blocked = True
    d = ch.wait(Condition.OUT)
    ch.extra = Condition.HUP
    ch._ready_changed()
    assert result_of(d) == Condition.HUP


def test_wait_rejects_other_conditions(ch: FakeChannel) -> None:
    assert isinstance(failure_of(ch.wait(Condition.IN | Condition.OUT)), ValueError)
    assert isinstance(failure_of(ch.wait(Condition.HUP)), ValueError)


def test_close_fails_waiters(ch: FakeChannel) -> None:
    ch.blocked = True
    r, w = ch.wait(Condition.IN), ch.wait(Condition.OUT)
    ch.close()
    assert isinstance(failure_of(r), ChannelClosedError)
    assert isinstance(failure_of(w), ChannelClosedError)
    assert isinstance(failure_of(ch.wait(Condition.IN)), ChannelClosedError)


# ---- read / write ------------------------------------------------------------------------


def test_read_waits_then_returns_what_is_there(ch: FakeChannel) -> None:
    d = ch.read(10)
    assert not_fired(d)
    ch.feed(b"abc")
    assert result_of(d) == b"abc"
    ch.feed(b"", eof=True)
    assert result_of(ch.read(10)) == b"", "EOF is b''"


def test_cancelled_read_loses_nothing_and_frees_slot(ch: FakeChannel) -> None:
    d = ch.read(4)
    d.cancel()
    assert isinstance(failure_of(d), CancelledError)
    d2 = ch.read(4)
    ch.feed(b"data")
    assert result_of(d2) == b"data"


def test_peek_needs_the_feature(ch: FakeChannel, turns: TurnReactor) -> None:
    ch.feed(b"hello")
    err = failure_of(ch.read(2, peek=True))
    assert str(err) == "Channel does not support peek read"
    peeky = FakeChannel(turns, Feature.READ_MSG_PEEK)
    peeky.feed(b"hello")
    assert result_of(peeky.read(2, peek=True)) == b"he"
    assert result_of(peeky.read(5)) == b"hello", "peek does not consume"


def test_fds_need_the_feature(ch: FakeChannel) -> None:
    assert str(failure_of(ch.write(b"x", [1]))) == (
        "Channel does not support file descriptor passing"
    )
    assert "file descriptor passing" in str(failure_of(ch.read_full(1)))


def test_read_full_returns_fds_with_data(turns: TurnReactor) -> None:
    ch = FakeChannel(turns, Feature.FD_PASS)
    d = ch.read_full(8)
    ch.inbox_fds = [5, 6]
    ch.feed(b"msg")
    assert result_of(d) == (b"msg", [5, 6])


def test_read_all_and_its_eof_rules(ch: FakeChannel) -> None:
    d = ch.read_all(6)
    ch.feed(b"ab")
    ch.feed(b"cd")
    assert not_fired(d)
    ch.feed(b"efgh")
    assert result_of(d) == b"abcdef"
    d = ch.read_all(4)
    ch.feed(b"", eof=True)
    err = failure_of(d)
    assert type(err) is ChannelEOFError
    assert str(err) == "Unexpected end-of-file before all data were read"


def test_read_all_eof_clean_eof_is_empty(ch: FakeChannel) -> None:
    d = ch.read_all_eof(4)
    ch.feed(eof=True)
    assert result_of(d) == b""
    assert result_of(ch.read_all_eof(4)) == b""
    err = failure_of(ch.read_all(1))
    assert str(err) == "Unexpected end-of-file before all data were read"


def test_read_all_eof_after_some_bytes_is_an_error(ch: FakeChannel) -> None:
    d = ch.read_all_eof(4)
    ch.feed(b"ab", eof=True)
    assert isinstance(failure_of(d), ChannelEOFError)


def test_readv_all_scatters(ch: FakeChannel) -> None:
    bufs: list[bytearray | memoryview] = [bytearray(2), bytearray(3), memoryview(bytearray(1))]
    d = ch.readv_all(bufs)
    ch.feed(b"abcdef")
    assert result_of(d) is None
    assert [bytes(b) for b in bufs] == [b"ab", b"cde", b"f"]
    pending = ch.readv_all_eof([bytearray(1)])
    assert not_fired(pending)
    ch.feed(eof=True)
    assert result_of(pending) is False


def test_writev_all_handles_short_writes_and_sends_fds_once(turns: TurnReactor) -> None:
    ch = FakeChannel(turns, Feature.FD_PASS)
    ch.max_write = 3
    d = ch.writev_all([b"abcd", bytearray(b"efg"), memoryview(b"hij")], [9])
    assert result_of(d) is None
    assert bytes(ch.sent) == b"abcdefghij"
    assert ch.sent_fds[0] == [9]
    assert all(f == [] for f in ch.sent_fds[1:]), "fds go with the first chunk only"


def test_write_waits_while_blocked(ch: FakeChannel) -> None:
    ch.blocked = True
    d = ch.write_all(b"payload")
    assert not_fired(d)
    assert ch.write_calls == 0
    ch.blocked = False
    ch._ready_changed()
    assert result_of(d) is None
    assert bytes(ch.sent) == b"payload"


def test_closed_channel_refuses_io(ch: FakeChannel) -> None:
    ch.close()
    assert isinstance(failure_of(ch.read(1)), ChannelClosedError)
    assert isinstance(failure_of(ch.write(b"x")), ChannelClosedError)
    with pytest.raises(ChannelClosedError, match="Channel is closed"):
        ch.read_nowait(1)


# ---- control ---------------------------------------------------------------------------------


def test_optional_hooks_default_errors(ch: FakeChannel) -> None:
    with pytest.raises(ChannelError, match="Data path shutdown not supported"):
        ch.shutdown(Shutdown.WRITE)
    with pytest.raises(ChannelError, match="Channel does not support random access"):
        ch.seek(0)
    ch.set_delay(False)  # hints: silently ignored without a hook
    ch.set_cork(True)


def test_close_twice_reports_the_same_outcome(ch: FakeChannel) -> None:
    pending: Deferred[None] = Deferred()
    ch.close_result = pending
    first, second = ch.close(), ch.close()
    assert not_fired(first) and not_fired(second)
    assert ch.close_calls == 1
    pending.callback(None)
    assert result_of(first) is None and result_of(second) is None
    assert result_of(ch.close()) is None


def test_second_close_after_failed_close_also_fails(ch: FakeChannel) -> None:
    pending: Deferred[None] = Deferred()
    ch.close_result = pending
    first = ch.close()
    pending.errback(OSError("flush failed"))
    assert str(failure_of(first)) == "flush failed"
    again = failure_of(ch.close())
    assert str(again) == "flush failed", "a later close must not report success"
    assert ch.close_calls == 1


def test_close_that_raises_fails_every_caller(ch: FakeChannel) -> None:
    ch.close_result = ChannelError("cannot close")
    assert str(failure_of(ch.close())) == "cannot close"
    assert str(failure_of(ch.close())) == "cannot close"
    assert ch.closed


def test_cancelling_one_close_observer_leaves_the_others(ch: FakeChannel) -> None:
    pending: Deferred[None] = Deferred()
    ch.close_result = pending
    a, b = ch.close(), ch.close()
    a.cancel()
    assert isinstance(failure_of(a), CancelledError)
    pending.callback(None)
    assert result_of(b) is None


def test_failed_close_deferred_is_consumed(ch: FakeChannel) -> None:
    """No 'Unhandled error in Deferred' from the channel's own bookkeeping."""
    ch.close_result = fail(OSError("x"))
    d = ch.close()
    failure_of(d)


class WaitHookChannel(FakeChannel):
    """A subclass that overrides wait(), as channels do that poll only while someone waits."""

    def __init__(self, reactor: TurnReactor) -> None:
        super().__init__(reactor)
        self.waits = 0

    def wait(self, condition: Condition) -> Deferred[Condition]:
        self.waits += 1
        return super().wait(condition)


def test_blocked_io_goes_through_an_overridden_wait(turns: TurnReactor) -> None:
    ch = WaitHookChannel(turns)
    d = ch.read(3)
    assert ch.waits == 1, "the subclass learns that someone waits"
    ch.feed(b"abc")
    assert result_of(d) == b"abc"
    ch.blocked = True
    w = ch.write(b"xyz")
    assert ch.waits == 2 and not w.called
    ch.blocked = False
    ch._ready_changed()
    assert result_of(w) == 3
    r = ch.read(1)
    r.cancel()
    assert isinstance(failure_of(r), CancelledError)
    assert ch._waiters["read"] is None, "cancel frees the slot on this path too"


class LyingChannel(FakeChannel):
    """Says IN while its read still blocks: must not spin, must finish once data comes."""

    def _io_condition(self) -> Condition:
        return super()._io_condition() | Condition.IN


def test_ready_but_blocked_does_not_spin(turns: TurnReactor) -> None:
    ch = LyingChannel(turns)
    d = ch.read(2)
    assert not d.called
    ch.feed(b"ok")
    assert result_of(d) == b"ok"
