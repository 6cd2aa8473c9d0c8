"""``qio send``'s Sender in-process, into a loopback receiver: the sendfile path.

The proof against a real QEMU destination is tests/test_replay_qemu.py; these
check the bytes exactly, the uuid rewrite, and the failures (a destination
that goes away, a file that shrank) quickly.
"""

from __future__ import annotations

import json
import os
import uuid as uuidlib
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, gatherResults

from qiotwisted.channel import SocketChannel, port_of
from qiotwisted.migration import _sendfile
from qiotwisted.migration.replay import Sender, send_session
from qiotwisted.migration.wire import MultifdInit

OLD = uuidlib.UUID("11111111-2222-3333-4444-555555555555")
NEW = uuidlib.UUID("99999999-8888-7777-6666-555555555555")


def make_session(root: Path, *, multifd: int, size: int) -> Path:
    root.mkdir()
    (root / "main.bin").write_bytes(b"QEVM" + os.urandom(size))
    channels: list[dict[str, Any]] = [{"kind": "main", "file": "main.bin"}]
    for k in range(multifd):
        name = f"multifd-{k}.bin"
        (root / name).write_bytes(MultifdInit.build(OLD.bytes, k) + os.urandom(size))
        channels.append({"kind": "multifd", "file": name, "id": k})
    (root / "manifest.json").write_text(json.dumps({"channels": channels}))
    return root


class Receiver:
    """Accepts *n* connections on loopback and reads each to EOF (or until *cut* bytes)."""

    def __init__(self, reactor: Any, n: int, cut: int | None = None) -> None:
        self.reactor = reactor
        self.listener = SocketChannel.listen("127.0.0.1:0", backlog=8, reactor=reactor)
        self.port = port_of(self.listener.get_local_address())
        self.n = n
        self.cut = cut
        self.streams: list[bytes] = []

    async def _drain(self, channel: SocketChannel) -> None:
        parts: list[bytes] = []
        got = 0
        try:
            while self.cut is None or got < self.cut:
                data = await channel.read(1 << 20)
                if not data:
                    break
                parts.append(data)
                got += len(data)
        finally:
            self.streams.append(b"".join(parts))
            if self.cut is not None:
                channel.transport.abortConnection()  # a destination that dies: RST
            await channel.close()

    async def run(self) -> None:
        drains = []
        for _ in range(self.n):
            channel = await self.listener.accept()
            drains.append(Deferred.fromCoroutine(self._drain(channel)))
        await gatherResults(drains)
        await self.listener.close()


async def send(reactor: Any, session: Path, receiver: Receiver, **kw: Any) -> tuple[bool, Sender]:
    """Send *session* into *receiver*; (the sender's verdict, the sender) once both ended."""
    received = Deferred.fromCoroutine(receiver.run())
    sender = send_session(session, f"127.0.0.1:{receiver.port}", reactor=reactor, **kw)
    ok = await sender.run()
    await received
    return ok, sender


@pytest.fixture
def pumps(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every SendfilePump.run call (so a test knows the sendfile path was taken)."""
    calls: list[object] = []
    run = _sendfile.SendfilePump.run

    def spy(self: _sendfile.SendfilePump, *args: Any, **kw: Any) -> Any:
        calls.append(self)
        return run(self, *args, **kw)

    monkeypatch.setattr(_sendfile.SendfilePump, "run", spy)
    return calls


async def test_send_multifd_session_with_uuid_rewrite(
    reactor: Any, tmp_path: Path, pumps: list[object]
) -> None:
    session = make_session(tmp_path / "s", multifd=2, size=3 << 20)
    receiver = Receiver(reactor, 3)
    ok, sender = await send(reactor, session, receiver, uuid=NEW)
    assert ok is True
    assert len(pumps) == 3  # every channel went through sendfile
    main = (session / "main.bin").read_bytes()
    assert receiver.streams.count(main) == 1
    by_id = {}
    for stream in receiver.streams:
        if stream != main:
            init = MultifdInit.parse(stream[: MultifdInit.SIZE])
            by_id[init.channel_id] = (init, stream)
    assert sorted(by_id) == [0, 1]
    for k, (init, stream) in by_id.items():
        original = (session / f"multifd-{k}.bin").read_bytes()
        assert init.uuid == NEW
        assert stream[MultifdInit.SIZE :] == original[MultifdInit.SIZE :]
    assert all(p.done and p.error is None and p.sent == p.size for p in sender.plans)
    assert sender.progress.sent == sender.progress.total


async def test_destination_gone_mid_stream_is_a_clear_error(
    reactor: Any, tmp_path: Path, pumps: list[object]
) -> None:
    session = make_session(tmp_path / "s", multifd=0, size=64 << 20)
    receiver = Receiver(reactor, 1, cut=1 << 20)
    ok, sender = await send(reactor, session, receiver)
    assert ok is False
    (plan,) = sender.plans
    assert len(pumps) == 1
    assert not plan.done and plan.error is not None
    assert plan.error.startswith("Unable to write to socket: Connection lost"), plan.error
    assert 1 << 20 <= plan.sent < plan.size


async def test_a_file_that_shrank_is_reported(
    reactor: Any, tmp_path: Path, pumps: list[object]
) -> None:
    session = make_session(tmp_path / "s", multifd=0, size=2 << 20)
    main = session / "main.bin"
    full = main.stat().st_size
    receiver = Receiver(reactor, 1)
    received = Deferred.fromCoroutine(receiver.run())
    sender = send_session(session, f"127.0.0.1:{receiver.port}", reactor=reactor)
    os.truncate(main, full // 2)  # after the plan was made
    ok = await sender.run()
    await received
    assert ok is False
    (plan,) = sender.plans
    assert plan.error == f"file changed while sending: {full // 2} of {full} bytes"
    assert receiver.streams == [main.read_bytes()]  # what there was, all of it
