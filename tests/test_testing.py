"""qiotwisted.testing: the fakes users test their own code with, tested and used here."""

from __future__ import annotations

import json
from pathlib import Path

from twisted.internet.task import Clock

from qiotwisted.channel import WOULD_BLOCK
from qiotwisted.migration.recorder import Recorder
from qiotwisted.testing import MemoryNetListener, MemoryWorkerPool, channel_pair
from tests.test_wire import build_stream


def test_bytes_cross_only_when_pumped() -> None:
    pair = channel_pair(capacity=16, reactor=Clock())
    assert pair.client.write_nowait(b"hello") == 5
    assert pair.server.read_nowait(100) is WOULD_BLOCK
    read = pair.server.read(100)
    assert not read.called
    assert pair.pump() == 5
    assert read.result == b"hello"


def test_backpressure_and_eof() -> None:
    pair = channel_pair(capacity=8, reactor=Clock())
    assert pair.client.write_nowait(b"0123456789") == 8  # the outbox holds 8
    assert pair.client.write_nowait(b"x") is WOULD_BLOCK
    written = pair.client.write_all(b"89")
    assert not written.called
    pair.pump()  # 8 bytes cross, and fill the server's side: still no room
    assert not written.called
    assert pair.server.read_nowait(100) == b"01234567"  # the reader makes room
    assert written.called
    pair.client.close()
    pair.pump()
    assert pair.server.read_nowait(100) == b"89"
    assert pair.server.read_nowait(100) == b""  # EOF crossed with the pump


def test_listener_delivers_on_the_clock_and_a_recorder_runs_on_fakes(tmp_path: Path) -> None:
    """A whole recording with no socket, thread or reactor: every step is the test's."""
    clock = Clock()
    pool = MemoryWorkerPool()
    recorder = Recorder(tmp_path / "rec", reactor=clock, pool=pool, classify_timeout=5)
    listener = MemoryNetListener(clock, name="fake")
    listener.set_client_func(recorder.client_func)
    pair = listener.connect()
    assert recorder.open_sessions == [] and not pool.queued
    clock.advance(0)  # the "accept"
    stream = build_stream(parts=2).data
    written = pair.client.write_all(stream)
    filed = recorder.next_session()
    pair.client.close()
    for _ in range(10_000):  # bounded: pump bytes, run worker jobs, deliver completions
        if filed.called:
            break
        pair.pump()
        pool.run_until_idle()
        clock.advance(0)
    assert written.called
    results: list[tuple[Path, str]] = []
    filed.addCallback(results.append)
    ((path, status),) = results
    assert status == "complete"
    assert (path / "main.bin").read_bytes() == stream
    assert json.loads((path / "manifest.json").read_text())["channels"][0]["bytes"] == len(stream)
    listener.disconnect()


def test_wait_client_and_notify() -> None:
    clock = Clock()
    listener = MemoryNetListener(clock)
    notified: list[object] = []
    listener.set_client_func(lambda *a: None, "old", notified.append)
    waiter = listener.wait_client()
    pair = listener.connect()
    clock.advance(0)
    assert waiter.result is pair.server
    listener.set_client_func(None)
    assert notified == ["old"]
