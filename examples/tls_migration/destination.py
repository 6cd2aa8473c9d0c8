"""A TLS migration destination for a real QEMU source: one migration's main stream into a file.

A ``NetListener`` on 127.0.0.1 takes one connection, a ``TLSChannel`` server
with verify-peer handshakes with it (the source must show a client certificate
from our CA), and every byte QEMU sends is written to the output file by
``Task`` workers, a batch at a time, off the reactor thread.  The credentials
are loaded with ``PRIORITY_QEMU_RECEIVER`` (TLS 1.2): a TLS 1.3 server would
send session tickets that QEMU 7.2 never reads, and QEMU would then lose the
end of its stream.  QEMU 7.2 never sends close_notify, so the stream's own
end marker (checked by ``MainStreamWalker``) is what proves it complete::

    python -m qiotwisted.cli pki pki          # or `qio pki pki`: CA, server and client
    python examples/tls_migration/destination.py --tls-creds pki --port 4444 stream.bin

then migrate a QEMU started with ``-object tls-creds-x509,id=tls0,endpoint=client,dir=pki``
(``migrate-set-parameters tls-creds=tls0 tls-hostname=localhost``, ``migrate
tcp:127.0.0.1:4444``; see README.md).  Prints the peer's DN and the byte
count, exits after one migration (or Ctrl-C): 0 if the stream is complete.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable
from typing import IO, Any, TypeVar

from twisted.internet import defer, task

from qiotwisted import NetListener, QIOError, Task
from qiotwisted.channel import port_of
from qiotwisted.channel.tls import TLSChannel
from qiotwisted.crypto import PRIORITY_QEMU_RECEIVER, TLSCreds
from qiotwisted.migration.wire import MainStreamWalker, WireError

R = TypeVar("R")
CHUNK, BATCH = 1 << 20, 8 << 20  # read size; bytes handed to one disk-writing Task


def in_thread(fn: Callable[..., R], *args: Any) -> Task[R]:
    """Run ``fn(*args)`` in a worker thread as a Task; ``await`` it in the reactor thread."""
    t: Task[R] = Task(fn.__name__)
    t.run_in_thread(lambda me, _: me.set_result(fn(*args)))
    return t


def store(out: IO[bytes], batch: list[bytes], walker: MainStreamWalker, eof: bool) -> None:
    """Worker thread: append *batch* to the file and follow the stream's structure."""
    for data in [*batch, b""] if eof else batch:
        out.write(data)
        with contextlib.suppress(WireError):  # kept in walker.problem; store it anyway
            walker.feed(data)  # b"" = end of stream
    if eof:
        out.close()


async def main(reactor: Any, args: argparse.Namespace) -> None:
    creds = await TLSCreds.load(  # a Task: files are read and keys parsed in a worker thread
        args.tls_creds, endpoint="server", verify_peer=True, priority=PRIORITY_QEMU_RECEIVER
    )
    listener = NetListener(reactor=reactor, name="migration-tls-incoming")
    (address,) = await listener.open(f"tcp:{args.port}:interface=127.0.0.1")
    print(f"listening on 127.0.0.1:{port_of(address)}", flush=True)
    out = await in_thread(open, args.output, "wb")
    walker = MainStreamWalker()  # fed in the writing worker: is the stream complete?
    tls: TLSChannel | None = None
    peer, total, batch, batched, writing = None, 0, [], 0, None
    flushed: defer.Deferred[None] = defer.Deferred()

    def interrupt() -> defer.Deferred[None]:
        # Reactor shutdown (Ctrl-C): stop reading, but let what arrived reach the disk.
        listener.disconnect()
        if tls is not None:
            tls.close()  # the pending read fails with ChannelClosedError
        return flushed

    reactor.addSystemEventTrigger("before", "shutdown", interrupt)
    try:
        channel = await listener.wait_client()
        await listener.disconnect()  # one migration per run
        tls = TLSChannel.new_server(channel, creds)
        await tls.handshake()  # a Task: completes in the reactor thread
        peer = tls.get_peer_dn()
        print(f"TLS {tls.protocol_version} with {peer}", flush=True)
        while data := await tls.read(CHUNK):  # b"": QEMU closed the connection
            total += len(data)
            batch.append(data)
            batched += len(data)
            if batched >= BATCH:
                if writing is not None:
                    await writing  # one batch on its way to disk: memory stays bounded
                writing, batch, batched = in_thread(store, out, batch, walker, False), [], 0
    except QIOError as e:  # handshake refused, connection error, or Ctrl-C
        print(f"stopped: {e}", flush=True)
    finally:
        try:
            if tls is not None:
                await tls.close()
            if writing is not None:
                await writing
            await in_thread(store, out, batch, walker, True)
        finally:
            flushed.callback(None)
    state = "complete" if walker.complete else f"INCOMPLETE ({walker.reason})"
    print(f"received {total} bytes from {peer} into {args.output}: {state}", flush=True)
    raise SystemExit(0 if walker.complete else 1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output", help="file for the main migration stream")
    parser.add_argument("--tls-creds", required=True, help="QEMU-layout dir with server certs")
    parser.add_argument("--port", type=int, default=4444, help="TCP port (0: any free port)")
    args = parser.parse_args()
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, args)))
