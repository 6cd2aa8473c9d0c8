"""The limits of `twistd qio record` / `proxy`: options with safe defaults, and each limit
enforced by the recorder in-process over real loopback sockets.

A refused connection must be closed at once with a clear log line and never receive a
byte (a QEMU 7.2 source that receives one drops the end of its stream).
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import endpoints
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock, deferLater
from twisted.logger import capturedLogs, formatEvent
from twisted.python import usage

from qiotwisted.channel import SocketChannel, port_of
from qiotwisted.listener import NetListener
from qiotwisted.migration.limits import (
    ConnectionLimiter,
    IdleWatchdog,
    Limits,
    format_size,
    parse_size,
)
from qiotwisted.migration.recorder import Recorder
from qiotwisted.tap import Options
from tests.test_wire import build_multifd, build_stream

# Generous everywhere except the limit a test is about: nothing else may interfere.
ROOMY = Limits(
    handshake_timeout=5,
    idle_timeout=5,
    max_connections=0,
    max_connections_per_peer=0,
    max_sessions=0,
    min_free_space=0,
    min_rate=0,
)


# -- options -------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["record", "proxy"])
def test_limit_options_have_safe_defaults(command: str) -> None:
    opts = Options()
    args = [command] + (["--to", "127.0.0.1:1"] if command == "proxy" else [])
    opts.parseOptions(args)
    sub = opts.subOptions
    assert sub["handshake-timeout"] == 10.0
    assert sub["idle-timeout"] == 60.0
    assert sub["max-connections"] == 256
    assert sub["max-connections-per-peer"] == 64
    assert sub["max-sessions"] == 8
    assert sub["min-free-space"] == 1 << 30
    assert sub["workers"] == 8
    assert sub["max-queued-jobs"] == 1024
    # multifd with 8 channels plus main fits the per-peer default
    assert sub["max-connections-per-peer"] >= 9
    help_text = str(sub)
    for name in (
        "--handshake-timeout",
        "--idle-timeout",
        "--max-connections=",
        "--max-connections-per-peer",
        "--max-sessions",
        "--min-free-space",
        "--workers",
        "--max-queued-jobs",
    ):
        assert name in help_text, name
    assert "[default: 1G]" in help_text and "[default: 256]" in help_text


def test_limit_options_parse_and_validate() -> None:
    opts = Options()
    opts.parseOptions(
        [
            "record",
            "--min-free-space",
            "512M",
            "--idle-timeout",
            "0.5",
            "--max-sessions",
            "0",
            "--workers",
            "2",
        ]
    )
    sub = opts.subOptions
    assert sub["min-free-space"] == 512 << 20
    assert sub["idle-timeout"] == 0.5 and sub["max-sessions"] == 0 and sub["workers"] == 2
    for bad in (
        ["--min-free-space", "lots"],
        ["--idle-timeout", "-1"],
        ["--max-connections", "-3"],
        ["--workers", "0"],
    ):
        with pytest.raises(usage.UsageError):
            Options().parseOptions(["record", *bad])


def test_parse_and_format_size() -> None:
    assert parse_size("0") == 0
    assert parse_size("1G") == parse_size("1GiB") == parse_size("1 gb") == 1 << 30
    assert parse_size("2.5K") == 2560
    assert parse_size("100") == parse_size("100B") == 100
    with pytest.raises(ValueError, match="not a size"):
        parse_size("")
    with pytest.raises(ValueError, match="negative"):
        parse_size("-1G")
    assert format_size(3 << 30) == "3.0 GiB" and format_size(12) == "12 bytes"
    with pytest.raises(ValueError, match="max_sessions"):
        Limits(max_sessions=-1)


# -- the pieces ----------------------------------------------------------------------


def test_connection_limiter_counts_total_and_per_peer() -> None:
    lim = ConnectionLimiter(max_total=3, max_per_peer=2)
    assert lim.try_admit("a") is None
    assert lim.try_admit("a") is None
    reason = lim.try_admit("a")
    assert reason == "2 connections open from a, max-connections-per-peer is 2"
    assert lim.try_admit("b") is None
    assert lim.try_admit("c") == "3 connections open, max-connections is 3"
    lim.release("a")
    assert lim.open_from("a") == 1 and lim.total == 2
    assert lim.try_admit("c") is None
    with pytest.raises(RuntimeError):
        lim.release("zzz")
    unlimited = ConnectionLimiter(0, 0)
    assert all(unlimited.try_admit("x") is None for _ in range(1000))


def test_idle_watchdog_fires_once_after_silence_only() -> None:
    clock = Clock()
    fired: list[float] = []
    dog = IdleWatchdog(clock, 10, lambda: fired.append(clock.seconds())).start()
    for _ in range(5):  # data every 6 s: never idle
        clock.advance(6)
        dog.touch()
    assert not fired
    dog.busy = True  # we are the ones not reading: not the peer's silence
    clock.advance(25)
    assert not fired
    dog.busy = False
    clock.advance(9.9)
    assert not fired
    clock.advance(0.2)
    assert fired == [clock.seconds()] and dog.fired
    clock.advance(100)
    assert len(fired) == 1 and not clock.getDelayedCalls()
    # one timer per period, not per touch; stop() cancels it
    dog2 = IdleWatchdog(clock, 10, lambda: fired.append(-1)).start()
    for _ in range(100):
        dog2.touch()
    assert len(clock.getDelayedCalls()) == 1
    dog2.stop()
    assert not clock.getDelayedCalls()
    assert IdleWatchdog(clock, 0, lambda: None).start()._call is None  # 0 = off


# -- the recorder, in-process over loopback --------------------------------------------


class Client:
    """Connects to a service on 127.0.0.1:*port*, from any loopback source address."""

    def __init__(self, reactor: Any, port: int = 0) -> None:
        self.reactor = reactor
        self.port = port

    async def connect(self, source: str = "127.0.0.1") -> SocketChannel:
        ch = SocketChannel(reactor=self.reactor)
        ep = endpoints.TCP4ClientEndpoint(
            self.reactor, "127.0.0.1", self.port, timeout=5, bindAddress=(source, 0)
        )
        await endpoints.connectProtocol(ep, ch.protocol)
        return ch

    async def send(self, data: bytes, *, chunk: int = 1 << 16, source: str = "127.0.0.1") -> None:
        ch = await self.connect(source)
        for k in range(0, len(data), chunk):
            await ch.write_all(data[k : k + chunk])
        await ch.close()

    async def wait_for(self, cond: Callable[[], bool], what: str, rounds: int = 500) -> None:
        for _ in range(rounds):  # bounded poll of state another party changes
            if cond():
                return
            await deferLater(self.reactor, 0.01)
        raise AssertionError(f"timed out waiting for {what}")


class Rig(Client):
    """A recorder behind a NetListener."""

    def __init__(self, reactor: Any, output: Path, limits: Limits, **kw: Any) -> None:
        super().__init__(reactor)
        self.recorder = Recorder(output, reactor=reactor, limits=limits, **kw)
        self.listener = NetListener(reactor=reactor, name="test-limits")
        self.listener.set_client_func(self.recorder.client_func)


@pytest_twisted.async_yield_fixture
async def rigs(reactor: Any, tmp_path: Path) -> AsyncIterator[Any]:
    """``await rigs(limits, **recorder_kw)``: a recorder listening on 127.0.0.1."""
    made: list[Rig] = []

    async def make(limits: Limits = ROOMY, **kw: Any) -> Rig:
        r = Rig(reactor, tmp_path / f"rec{len(made)}", limits, **kw)
        made.append(r)
        (address,) = await r.listener.open("tcp:0:interface=127.0.0.1")
        assert isinstance(address, IPv4Address)
        r.port = address.port
        return r

    yield make
    for r in made:
        await r.listener.disconnect()
        await r.recorder.stop()


def text(events: Sequence[Any]) -> str:
    return "\n".join(formatEvent(e) for e in events)


def manifest(path: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((path / "manifest.json").read_text())
    return result


async def assert_closed_with_nothing_written(ch: SocketChannel) -> None:
    """The service closed *ch* without writing a byte (the read sees EOF or a reset)."""
    try:
        data = await ch.read(4096)
    except Exception:
        data = b""
    assert data == b""
    await ch.close()


async def test_max_connections_refuses_at_once_and_frees_slots(rigs: Any) -> None:
    rig = await rigs(replace(ROOMY, max_connections=2))
    with capturedLogs() as events:
        a = await rig.connect()
        b = await rig.connect()
        await rig.wait_for(lambda: rig.recorder.admission.total == 2, "two admissions")
        c = await rig.connect()
        await assert_closed_with_nothing_written(c)
    assert "2 connections open, max-connections is 2" in text(events)
    assert "refused 127.0.0.1:" in text(events)
    # A slot frees when a connection ends; the next migration is recorded.
    await a.close()
    await rig.wait_for(lambda: rig.recorder.admission.total == 1, "a release")
    filed = rig.recorder.next_session()
    await rig.send(build_stream().data)
    assert (await filed)[1] == "complete"
    await b.close()


async def test_max_connections_per_peer_is_per_address(rigs: Any) -> None:
    rig = await rigs(replace(ROOMY, max_connections=10, max_connections_per_peer=1))
    with capturedLogs() as events:
        a = await rig.connect("127.0.0.1")
        await rig.wait_for(lambda: rig.recorder.admission.total == 1, "admission")
        refused = await rig.connect("127.0.0.1")
        await assert_closed_with_nothing_written(refused)
        # Another source address still gets in (all of 127/8 is loopback).
        filed = rig.recorder.next_session()
        await rig.send(build_stream().data, source="127.0.0.2")
        assert (await filed)[1] == "complete"
    assert "1 connections open from 127.0.0.1, max-connections-per-peer is 1" in text(events)
    await a.close()


async def test_default_per_peer_limit_fits_multifd_8_plus_main(rigs: Any) -> None:
    rig = await rigs(replace(ROOMY, max_connections_per_peer=Limits().max_connections_per_peer))
    s = build_stream(parts=2)
    filed = rig.recorder.next_session()
    main = await rig.connect()
    await gatherResults(
        [
            Deferred.fromCoroutine(rig.send(build_multifd(s.ram_sections, channel_id=i)))
            for i in range(8)
        ]
    )
    await main.write_all(s.data)
    await main.close()
    path, status = await filed
    assert status == "complete", manifest(path)
    assert len(manifest(path)["channels"]) == 9


async def test_max_sessions_refuses_a_further_migration(rigs: Any) -> None:
    rig = await rigs(replace(ROOMY, max_sessions=1))
    data = build_stream().data
    first = await rig.connect()
    await first.write_all(data[:200])
    await rig.wait_for(lambda: len(rig.recorder.open_sessions) == 1, "one open session")
    with capturedLogs() as events:
        second = await rig.connect("127.0.0.2")
        await second.write_all(data)
        await assert_closed_with_nothing_written(second)
    assert "1 sessions open, max-sessions is 1" in text(events)
    filed = rig.recorder.next_session()
    await first.write_all(data[200:])
    await first.close()
    assert (await filed)[1] == "complete"
    # The slot is free again.
    filed = rig.recorder.next_session()
    await rig.send(data, source="127.0.0.2")
    assert (await filed)[1] == "complete"
    assert len(list(rig.recorder.output.iterdir())) == 2  # nothing stored for the refused one


async def test_silent_plain_connection_is_closed_after_handshake_timeout(rigs: Any) -> None:
    rig = await rigs(replace(ROOMY, handshake_timeout=0.2))
    with capturedLogs() as events:
        silent = await rig.connect()
        await assert_closed_with_nothing_written(silent)
        # A multifd magic followed by a stalled init packet is cut off the same way.
        partial = await rig.connect()
        await partial.write_all(build_multifd(1)[:20])
        await assert_closed_with_nothing_written(partial)
    log = text(events)
    assert log.count("sent no migration stream header within 0.2 s (handshake-timeout)") == 2
    assert not rig.recorder.output.exists() or not list(rig.recorder.output.iterdir())


async def test_classify_timeout_overrides_handshake_timeout_for_the_magic(rigs: Any) -> None:
    rig = await rigs(replace(ROOMY, handshake_timeout=60), classify_timeout=0.2)
    with capturedLogs() as events:
        await assert_closed_with_nothing_written(await rig.connect())
    assert "within 0.2 s" in text(events)


async def test_idle_channel_is_closed_and_its_session_filed_incomplete(rigs: Any) -> None:
    rig = await rigs(replace(ROOMY, idle_timeout=0.3))
    filed = rig.recorder.next_session()
    ch = await rig.connect()
    await ch.write_all(build_stream().data[:500])
    with capturedLogs() as events:
        path, status = await filed
    await assert_closed_with_nothing_written(ch)
    m = manifest(path)
    assert status == "incomplete"
    assert m["reason"] == "main.bin: no data for 0.3 s (idle-timeout)", m["reason"]
    assert m["channels"][0]["bytes"] == 500 == (path / "main.bin").stat().st_size
    assert "no data for 0.3 s" in text(events)


async def test_slow_but_steady_channel_is_not_idle(rigs: Any, reactor: Any) -> None:
    rig = await rigs(replace(ROOMY, idle_timeout=0.3))
    data = build_stream(parts=4).data
    filed = rig.recorder.next_session()
    ch = await rig.connect()
    step = len(data) // 8 + 1
    for k in range(0, len(data), step):  # ~1.2 s in all, never 0.3 s of silence
        await ch.write_all(data[k : k + step])
        await deferLater(reactor, 0.15)
    await ch.close()
    path, status = await filed
    assert status == "complete", manifest(path)


async def test_a_trickling_session_is_stopped_by_min_rate(rigs: Any, reactor: Any) -> None:
    """Slowloris after the header: a byte per 0.1 s is never idle, but far below min-rate."""
    rig = await rigs(replace(ROOMY, min_rate=1000, rate_window=0.5))
    data = build_stream().data
    filed = rig.recorder.next_session()
    ch = await rig.connect()
    await ch.write_all(data[:100])
    with capturedLogs() as events:
        for k in range(100, 130):  # bounded: at most 3 s of trickle
            if filed.called:
                break
            try:
                await ch.write_all(data[k : k + 1])
            except Exception:
                break  # the recorder closed us
            await deferLater(reactor, 0.1)
        path, status = await filed
    await ch.close()
    m = manifest(path)
    assert status == "incomplete"
    assert "below the minimum of 1000 (min-rate)" in m["reason"], m["reason"]
    assert "min-rate" in text(events)


async def test_min_rate_leaves_a_real_rate_alone(rigs: Any, reactor: Any) -> None:
    rig = await rigs(replace(ROOMY, min_rate=1000, rate_window=0.3))
    data = build_stream(parts=4).data
    filed = rig.recorder.next_session()
    ch = await rig.connect()
    step = len(data) // 8 + 1
    for k in range(0, len(data), step):  # well above 1000 bytes/s, over several windows
        await ch.write_all(data[k : k + step])
        await deferLater(reactor, 0.1)
    await ch.close()
    path, status = await filed
    assert status == "complete", manifest(path)


async def test_multifd_idle_channel_stops_the_whole_session(rigs: Any) -> None:
    rig = await rigs(replace(ROOMY, idle_timeout=0.3))
    s = build_stream(parts=2)
    filed = rig.recorder.next_session()
    main = await rig.connect()
    mf = await rig.connect()
    await mf.write_all(build_multifd(s.ram_sections, channel_id=0)[:2000])
    # main keeps talking (a few bytes every 0.1 s); the multifd channel went silent
    for k in range(20):
        try:
            await main.write_all(s.data[k * 10 : k * 10 + 10])
        except Exception:
            break  # the recorder closed it
        await deferLater(rig.reactor, 0.1)
        if filed.called:
            break
    path, status = await filed
    m = manifest(path)
    assert status == "incomplete"
    assert m["reason"] == "multifd-0.bin: no data for 0.3 s (idle-timeout)", m["reason"]
    await assert_closed_with_nothing_written(main)
    await assert_closed_with_nothing_written(mf)


async def test_min_free_space_refuses_new_sessions(rigs: Any) -> None:
    rig = await rigs(replace(ROOMY, min_free_space=1 << 60))
    with capturedLogs() as events:
        ch = await rig.connect()
        await ch.write_all(build_stream().data)
        await assert_closed_with_nothing_written(ch)
    assert "disk nearly full:" in text(events)
    assert "min-free-space is 1048576.0 TiB" in text(events)
    assert not rig.recorder.output.exists() or not list(rig.recorder.output.iterdir())


class FakeStatvfs:
    """os.statvfs with a settable free-byte count (other fields from the real call)."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.calls = 0

    def __call__(self, path: str) -> Any:
        self.calls += 1
        real = os.statvfs(path)

        class Result:
            f_frsize = 4096
            f_bavail = self.free // 4096
            f_blocks = real.f_blocks

        return Result()


async def test_running_session_stopped_when_disk_fills(rigs: Any) -> None:
    fake = FakeStatvfs(10 << 30)
    limits = replace(ROOMY, min_free_space=1 << 30, disk_check_interval=0.05)
    rig = await rigs(limits, statvfs=fake)
    filed = rig.recorder.next_session()
    ch = await rig.connect()
    data = build_stream().data
    await ch.write_all(data[:700])
    await rig.wait_for(
        lambda: (
            bool(rig.recorder.open_sessions)
            and rig.recorder.open_sessions[0].sinks.get("main.bin") is not None
            and rig.recorder.open_sessions[0].sinks["main.bin"].on_disk == 700
        ),
        "700 bytes on disk",
    )
    calls = fake.calls
    await rig.wait_for(lambda: fake.calls > calls, "a periodic check")  # checks keep coming
    with capturedLogs() as events:
        fake.free = 100 << 20
        path, status = await filed
    m = manifest(path)
    assert status == "incomplete"
    assert m["reason"].startswith("disk nearly full: 100.0 MiB free on "), m["reason"]
    assert "min-free-space is 1.0 GiB" in m["reason"]
    assert m["channels"][0]["bytes"] == 700 == (path / "main.bin").stat().st_size
    assert "stopping 1 session(s)" in text(events)
    await assert_closed_with_nothing_written(ch)
    # No check runs without open sessions (the hygiene fixture would see the timer).
    assert rig.recorder._disk_call is None


# -- the proxy -------------------------------------------------------------------------


class Destination:
    """A stand-in destination: counts connections and keeps what each one sent."""

    def __init__(self, reactor: Any) -> None:
        self.listener = NetListener(reactor=reactor, name="test-dst")
        self.listener.set_client_func(self._client)
        self.received: list[bytearray] = []
        self.port = 0
        self._pumps: list[Deferred[None]] = []

    def _client(self, listener: Any, channel: SocketChannel, data: Any) -> None:
        buf = bytearray()
        self.received.append(buf)

        async def pump() -> None:
            while chunk := await channel.read(1 << 16):
                buf.extend(chunk)
            await channel.close()

        self._pumps.append(Deferred.fromCoroutine(pump()).addErrback(lambda _: None))

    async def stop(self) -> None:
        await self.listener.disconnect()
        for d in self._pumps:
            await d


@pytest_twisted.async_yield_fixture
async def proxy_rig(reactor: Any) -> AsyncIterator[Any]:
    from qiotwisted.migration.proxy import Proxy

    made: list[tuple[Proxy, NetListener, Destination]] = []

    async def make(limits: Limits) -> tuple[Client, Destination]:
        dst = Destination(reactor)
        (daddr,) = await dst.listener.open("tcp:0:interface=127.0.0.1")
        dst.port = port_of(daddr)
        proxy = Proxy(f"127.0.0.1:{dst.port}", reactor=reactor, limits=limits)
        listener = NetListener(reactor=reactor, name="test-proxy")
        listener.set_client_func(proxy.client_func)
        (address,) = await listener.open("tcp:0:interface=127.0.0.1")
        made.append((proxy, listener, dst))
        return Client(reactor, port_of(address)), dst

    yield make
    for proxy, listener, dst in made:
        await listener.disconnect()
        await proxy.stop()
        await dst.stop()


async def test_proxy_never_opens_the_destination_for_a_probe_or_junk(proxy_rig: Any) -> None:
    rig, dst = await proxy_rig(replace(ROOMY, handshake_timeout=0.2))
    with capturedLogs() as events:
        await assert_closed_with_nothing_written(await rig.connect())  # silent
        junk = await rig.connect()
        await junk.write_all(b"GET / HTTP/1.1\r\n\r\n")
        await assert_closed_with_nothing_written(junk)
        empty = await rig.connect()
        await empty.close()
        await rig.wait_for(lambda: "closed without sending" in text(events), "the probe")
    log = text(events)
    assert "sent no migration stream header within 0.2 s (handshake-timeout)" in log
    assert "HTTP request" in log
    # a QEMU destination takes any connection as its main channel: none was made
    assert dst.received == []
    stream = build_stream().data
    await rig.send(stream)
    await rig.wait_for(lambda: bool(dst.received) and dst.received[0] == stream, "forwarding")


async def test_proxy_admission_limits(proxy_rig: Any) -> None:
    rig, dst = await proxy_rig(replace(ROOMY, max_connections=1))
    first = await rig.connect()
    await first.write_all(build_stream().data[:100])
    await rig.wait_for(lambda: len(dst.received) == 1, "the first forwarded")
    with capturedLogs() as events:
        second = await rig.connect()
        await assert_closed_with_nothing_written(second)
    assert "1 connections open, max-connections is 1" in text(events)
    assert len(dst.received) == 1
    await first.close()


async def test_proxy_idle_pair_is_closed_both_ways(proxy_rig: Any) -> None:
    rig, dst = await proxy_rig(replace(ROOMY, idle_timeout=0.3))
    with capturedLogs() as events:
        ch = await rig.connect()
        await ch.write_all(build_stream().data[:100])
        await assert_closed_with_nothing_written(ch)
    assert "no data either way for 0.3 s (idle-timeout)" in text(events)
    await rig.wait_for(lambda: len(dst.received) == 1, "forwarded")
    assert len(dst.received[0]) == 100
