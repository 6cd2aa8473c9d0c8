"""The recorder in-process, over real loopback sockets, fed with synthetic streams.

The end-to-end proof with a real QEMU is tests/test_record_qemu.py; these cover
the session rules quickly: content decides `complete`, multifd channels join
their session by id, refusals store nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import endpoints
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.logger import capturedLogs

from qiotwisted.channel import BufferChannel, SocketChannel
from qiotwisted.listener import NetListener
from qiotwisted.migration.recorder import READ_SIZE, Recorder
from tests.channel_helpers import TurnCounter
from tests.test_wire import build_multifd, build_stream


class Rig:
    def __init__(self, reactor: Any, output: Path) -> None:
        self.reactor = reactor
        self.recorder = Recorder(output, reactor=reactor, classify_timeout=5)
        self.listener = NetListener(reactor=reactor, name="test-record")
        self.listener.set_client_func(self.recorder.client_func)
        self.port = 0

    async def connect(self) -> SocketChannel:
        ch = SocketChannel(reactor=self.reactor)
        ep = endpoints.TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.port)
        await endpoints.connectProtocol(ep, ch.protocol)
        return ch

    async def send(self, data: bytes, *, chunk: int = 1 << 16) -> None:
        ch = await self.connect()
        for k in range(0, len(data), chunk):
            await ch.write_all(data[k : k + chunk])
        await ch.close()


@pytest_twisted.async_yield_fixture
async def rig(reactor: Any, tmp_path: Path) -> AsyncIterator[Rig]:
    r = Rig(reactor, tmp_path / "rec")
    (address,) = await r.listener.open("tcp:0:interface=127.0.0.1")
    assert isinstance(address, IPv4Address)
    r.port = address.port
    yield r
    await r.listener.disconnect()
    await r.recorder.stop()


def manifest(path: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((path / "manifest.json").read_text())
    return result


async def test_complete_stream_is_filed_complete(rig: Rig) -> None:
    stream = build_stream(parts=3).data
    filed = rig.recorder.next_session()
    await rig.send(stream, chunk=7)
    path, status = await filed
    assert status == "complete"
    m = manifest(path)
    assert m["status"] == "complete" and m["reason"] is None
    (ch,) = m["channels"]
    assert (path / "main.bin").read_bytes() == stream
    assert ch["bytes"] == len(stream)
    assert ch["sha256"] == hashlib.sha256(stream).hexdigest()
    assert ch["stream"]["machine_type"] == "pc-i440fx-7.2"
    assert not path.name.startswith(".")
    assert [p.name for p in path.parent.iterdir()] == [path.name]


@pytest.mark.parametrize("cut", [8, 100, -1])
async def test_truncated_stream_is_incomplete_and_kept(rig: Rig, cut: int) -> None:
    stream = build_stream().data[:cut]
    filed = rig.recorder.next_session()
    await rig.send(stream)
    path, status = await filed
    assert status == "incomplete"
    m = manifest(path)
    assert m["reason"].startswith("main.bin: "), m["reason"]
    assert (path / "main.bin").read_bytes() == stream  # nothing stored is lost


async def test_malformed_stream_is_recorded_whole_and_incomplete(rig: Rig) -> None:
    good = build_stream().data
    stream = good[:40] + b"\xff" * 1000 + good[40:]
    filed = rig.recorder.next_session()
    await rig.send(stream)
    path, status = await filed
    assert status == "incomplete"
    assert (path / "main.bin").read_bytes() == stream
    assert "main.bin" in manifest(path)["reason"]


async def test_multifd_channels_join_their_session_by_id(rig: Rig) -> None:
    s = build_stream(parts=2)
    syncs = s.ram_sections
    filed = rig.recorder.next_session()
    # QEMU 7.2 connects main first but its header comes after the multifd init
    # packets: open main, then send the multifd channels (ids out of order), then main.
    main = await rig.connect()
    await gatherResults(
        [
            Deferred.fromCoroutine(rig.send(build_multifd(syncs, channel_id=1))),
            Deferred.fromCoroutine(rig.send(build_multifd(syncs, channel_id=0))),
        ]
    )
    await main.write_all(s.data)
    await main.close()
    path, status = await filed
    m = manifest(path)
    assert status == "complete", m
    files = sorted(c["file"] for c in m["channels"])
    assert files == ["main.bin", "multifd-0.bin", "multifd-1.bin"]
    assert {c["id"] for c in m["channels"] if c["kind"] == "multifd"} == {0, 1}
    assert (path / "multifd-1.bin").read_bytes() == build_multifd(syncs, channel_id=1)
    assert m["uuid"]


async def test_multifd_channel_short_of_sync_packets_is_incomplete(rig: Rig) -> None:
    s = build_stream(parts=2)
    filed = rig.recorder.next_session()
    main = await rig.connect()
    # A channel cut exactly at a packet boundary looks well-formed: only the
    # SYNC count against the main stream's ram sections catches it.
    await rig.send(build_multifd(s.ram_sections - 1, channel_id=0))
    await main.write_all(s.data)
    await main.close()
    path, status = await filed
    assert status == "incomplete"
    assert "SYNC" in manifest(path)["reason"]


async def test_two_migrations_in_a_row_are_two_sessions(rig: Rig) -> None:
    for _ in range(2):
        filed = rig.recorder.next_session()
        await rig.send(build_stream().data)
        assert (await filed)[1] == "complete"
    assert len(rig.recorder.sessions_done) == 2
    assert len({p for p, _ in rig.recorder.sessions_done}) == 2


async def test_two_sources_at_once_are_never_mixed(rig: Rig, reactor: Any) -> None:
    """A second migration while the first is open gets its own session."""
    first, second = build_stream(parts=1).data, build_stream(parts=3).data
    a = await rig.connect()
    b = await rig.connect()
    await a.write_all(first[:100])
    await b.write_all(second[:100])
    for _ in range(200):  # bounded: until both have been classified
        if len(rig.recorder.open_sessions) == 2:
            break
        await deferLater(reactor, 0.01)
    assert len(rig.recorder.open_sessions) == 2
    await a.write_all(first[100:])
    await b.write_all(second[100:])
    await a.close()
    await b.close()
    for _ in range(500):
        if len(rig.recorder.sessions_done) == 2:
            break
        await deferLater(reactor, 0.01)
    stored = sorted((p / "main.bin").read_bytes() for p, _ in rig.recorder.sessions_done)
    assert stored == sorted([first, second])
    assert [status for _, status in rig.recorder.sessions_done] == ["complete", "complete"]


@pytest.mark.parametrize(
    "payload,reason",
    [
        (bytes.fromhex("16030100a5010000a10303"), "TLS"),
        (b"GET / HTTP/1.1\r\n\r\n", "HTTP"),
        (b"\x00\x01\x02\x03garbage", "magic"),
    ],
    ids=["tls", "http", "garbage"],
)
async def test_refused_connections_store_nothing(
    rig: Rig, reactor: Any, payload: bytes, reason: str
) -> None:
    with capturedLogs() as events:
        ch = await rig.connect()
        await ch.write_all(payload)
        assert await ch.read(100) == b""  # closed by the recorder, nothing sent back
        await ch.close()
    refusals = [e for e in events if "refused" in e.get("log_format", "")]
    assert refusals and reason.lower() in str(refusals[0]["reason"]).lower()
    assert not rig.recorder.output.exists() or not list(rig.recorder.output.iterdir())


async def test_stop_files_in_flight_sessions_as_incomplete(rig: Rig, reactor: Any) -> None:
    ch = await rig.connect()
    await ch.write_all(build_stream().data[:500])
    filed = rig.recorder.next_session()
    for _ in range(200):  # bounded: until the recorder has the session open and 500 bytes in
        sessions = rig.recorder.open_sessions
        if sessions and sessions[0].sinks and sessions[0].sinks["main.bin"].bytes == 500:
            break
        await deferLater(reactor, 0.01)
    await rig.recorder.stop()
    path, status = await filed
    assert status == "incomplete"
    assert manifest(path)["channels"][0]["bytes"] == 500
    await ch.close()


async def test_a_backlog_is_recorded_over_several_reactor_turns(
    reactor: Any, tmp_path: Path
) -> None:
    """A channel with megabytes ready at once does not hold the reactor for all of them."""
    stream = build_stream().data + bytes(5 * READ_SIZE)  # a garbage tail: kept, incomplete
    channel = BufferChannel(reactor=reactor)
    await channel.write_all(stream)
    channel.seek(0)
    turns = TurnCounter(reactor)
    read_at: list[int] = []
    read = channel.read

    def counted_read(nbytes: int, *, peek: bool = False) -> Deferred[bytes]:
        read_at.append(turns.tick)
        return read(nbytes, peek=peek)

    spied: Any = channel  # an instance-level spy on read()
    spied.read = counted_read

    recorder = Recorder(tmp_path / "rec", reactor=reactor)
    filed = recorder.next_session()
    turns.start()
    recorder.client_func(None, channel)
    path, status = await filed
    turns.stop()
    await recorder.stop()
    assert status == "incomplete"
    assert (path / "main.bin").read_bytes() == stream  # nothing stored is lost
    # Every read returned at once, yet the reads span at least one turn per READ_SIZE.
    assert len(set(read_at)) >= len(stream) // READ_SIZE
