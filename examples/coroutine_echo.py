"""An echo server and two clients over loopback TCP, written as QEMU-style coroutines.

Each connection is served by one :class:`~qiotwisted.coroutine.Coroutine` that
reads length-prefixed messages with ``await ch.read_all(n)`` and writes them
back.  Every ``await`` on a channel that has to wait hands control back to
whoever entered the coroutine (here: the reactor), and the reactor re-enters
it when the data arrives, which is what QEMU's ``qio_channel_yield`` does.

The two clients share one :class:`~qiotwisted.coroutine.CoMutex`-protected
transcript, so their lines never interleave mid-message.

Run it with ``python examples/coroutine_echo.py``; it exits by itself with
status 0 once both clients got every echo back.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, endpoints, protocol, task
from twisted.internet.interfaces import IAddress

from qiotwisted.channel import Shutdown, SocketChannel
from qiotwisted.coroutine import CoMutex, Coroutine, co_sleep

MESSAGES = [b"hello", b"", b"coroutines on twisted", bytes(range(256)) * 64]


def frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


async def serve(ch: SocketChannel) -> int:
    """Echo frames until the client half-closes; return how many were echoed."""
    echoed = 0
    while True:
        header = await ch.read_all_eof(4)  # b"" = clean EOF between frames
        if not header:
            break
        payload = await ch.read_all(int.from_bytes(header, "big"))
        await ch.write_all(header + payload)
        echoed += 1
    await ch.close()
    return echoed


class EchoFactory(protocol.Factory):
    """Builds one SocketChannel per connection and starts a serving coroutine on it."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.served: list[defer.Deferred[int]] = []

    def buildProtocol(self, addr: IAddress | None) -> protocol.Protocol:
        ch = SocketChannel(reactor=self.reactor, name=f"echo-server {addr}", on_connect=self.start)
        return ch.protocol

    def start(self, ch: SocketChannel) -> None:
        # Runs in connectionMade: the coroutine reads until it must wait, then
        # enter() returns and Twisted carries on; data re-enters it later.
        self.served.append(Coroutine(serve, name=ch.name).start(ch))


async def client(args: tuple[int, SocketChannel, CoMutex, list[str]]) -> int:
    number, ch, transcript_lock, transcript = args
    for msg in MESSAGES:
        await ch.write_all(frame(msg))
        header = await ch.read_all(4)
        reply = await ch.read_all(int.from_bytes(header, "big"))
        if reply != msg:
            raise AssertionError(f"client {number}: sent {len(msg)} bytes, got {len(reply)} back")
        async with transcript_lock:
            transcript.append(f"client {number}: echoed {len(msg)} bytes")
            await co_sleep(0)  # hold the lock across a wait: the other client queues
            transcript.append(f"client {number}: ok")
    ch.shutdown(Shutdown.WRITE)  # the server sees EOF, closes, and we see EOF too
    if await ch.read(1) != b"":
        raise AssertionError("expected EOF from the server")
    await ch.close()
    return len(MESSAGES)


async def main(reactor: Any) -> None:
    factory = EchoFactory(reactor)
    port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    try:
        lock = CoMutex()
        transcript: list[str] = []
        clients = []
        for number in (1, 2):
            ch = SocketChannel(reactor=reactor, name=f"echo-client {number}")
            endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
            await endpoints.connectProtocol(endpoint, ch.protocol)
            co = Coroutine(client, name=f"client {number}")
            clients.append(co.start((number, ch, lock, transcript)))
            print(f"client {number} entered; now {co!r}")
        sent = await defer.gatherResults(clients, consumeErrors=True)
        echoed = await defer.gatherResults(factory.served, consumeErrors=True)
    finally:
        await port.stopListening()
    for line in transcript:
        print(line)
    # Each "echoed" line is followed by its own client's "ok": the CoMutex kept them paired.
    for first, second in zip(transcript[::2], transcript[1::2], strict=True):
        if first.split(":")[0] != second.split(":")[0]:
            raise AssertionError("transcript interleaved under the CoMutex")
    print(f"clients sent {sent} messages; servers echoed {sorted(echoed)}")
    print("coroutine echo: OK")


if __name__ == "__main__":
    task.react(main)
