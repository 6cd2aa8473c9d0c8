"""A TLS migration source: send a recorded main stream into a real QEMU destination.

``SocketChannel.connect`` resolves and connects in a worker thread (a
``Task``), a ``TLSChannel`` client handshakes and checks the destination's
certificate against ``--tls-hostname`` (default: the host of ``--to``, as
QEMU does), then the file is read in ``Task`` workers, one chunk ahead, and
written with ``write_all``, which waits whenever the socket's buffer is full:
memory stays near two chunks whatever the stream's size.  ``bye()`` sends
close_notify at the end.  A recording is plaintext, so one made from a plain
or a TLS migration (``destination.py``, ``twistd qio record``) works::

    python -m qiotwisted.cli pki pki          # or `qio pki pki`, once, shared with QEMU
    # QEMU: -object tls-creds-x509,id=tls0,endpoint=server,dir=pki -incoming defer,
    #       migrate-set-parameters tls-creds=tls0, migrate-incoming tcp:127.0.0.1:4444
    python examples/tls_migration/source.py --tls-creds pki --to 127.0.0.1:4444 stream.bin

Prints progress lines; exits 0 once every byte was sent (QEMU then loads it:
watch ``query-migrate`` on the destination, see README.md).  Ctrl-C aborts the
connection, so the destination sees a cut stream, and exits 1.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import IO, Any, TypeVar

from twisted.internet import defer, task

from qiotwisted import QIOError, SocketChannel, Task
from qiotwisted.channel import InetSocketAddress, parse_address
from qiotwisted.channel.tls import TLSChannel
from qiotwisted.crypto import TLSCreds

R = TypeVar("R")
CHUNK = 4 << 20  # bytes per file read and per write_all


def in_thread(fn: Callable[..., R], *args: Any) -> Task[R]:
    """Run ``fn(*args)`` in a worker thread as a Task; ``await`` it in the reactor thread."""
    t: Task[R] = Task(fn.__name__)
    t.run_in_thread(lambda me, _: me.set_result(fn(*args)))
    return t


def open_stream(path: str) -> tuple[IO[bytes], int]:
    f = open(path, "rb")  # closed at the end of main(), in a worker
    return f, os.fstat(f.fileno()).st_size


async def main(reactor: Any, args: argparse.Namespace) -> None:
    address = parse_address(args.to)
    hostname = args.tls_hostname or (
        address.host if isinstance(address, InetSocketAddress) else "localhost"
    )
    creds = await TLSCreds.load(args.tls_creds, endpoint="client")  # a Task, in a worker
    stream, size = await in_thread(open_stream, args.stream)
    reading = in_thread(stream.read, CHUNK)  # the first chunk, while we connect
    connecting = SocketChannel.connect(address)  # a Task: resolve and connect() in a worker
    channel: SocketChannel | None = None
    tls: TLSChannel | None = None
    sent, report, started = 0, size // 10, time.monotonic()
    finished: defer.Deferred[None] = defer.Deferred()

    def interrupt() -> defer.Deferred[None]:
        # Reactor shutdown (Ctrl-C): stop; the destination sees a cut stream and fails.
        connecting.cancel()  # no effect once connected
        if channel is not None:
            channel.abort()  # drop unsent data; a pending handshake, write or bye fails
        return finished

    reactor.addSystemEventTrigger("before", "shutdown", interrupt)
    try:
        channel = await connecting
        tls = TLSChannel.new_client(channel, creds, hostname)
        await tls.handshake()  # fails unless the certificate is our CA's and names hostname
        print(f"TLS {tls.protocol_version} with {tls.get_peer_dn()}", flush=True)
        while data := await reading:
            reading = in_thread(stream.read, CHUNK)  # read ahead while this one is sent
            await tls.write_all(data)  # waits while the socket's buffer is full
            sent += len(data)
            if sent >= report or sent == size:  # a line every 10% or so, and at the end
                rate = sent / (time.monotonic() - started) / 1e6
                print(f"sent {sent} of {size} bytes ({100 * sent // size}%, "
                      f"{rate:.0f} MB/s)", flush=True)  # fmt: skip
                report = sent + size // 10
        await tls.bye()  # close_notify (QEMU 7.2 itself never sends one)
    except QIOError as e:  # connect, handshake or write failed, or Ctrl-C
        print(f"failed after {sent} bytes: {e}", flush=True)
    finally:
        try:
            if tls is not None:
                await tls.close()
            await reading  # never close the file under a running read
            await in_thread(stream.close)
        finally:
            finished.callback(None)
    print(f"sent {sent} bytes of {size} in {time.monotonic() - started:.2f} s", flush=True)
    raise SystemExit(0 if sent == size else 1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stream", help="a recorded main migration stream")
    parser.add_argument("--to", required=True, help="destination, HOST:PORT (QEMU's -incoming)")
    parser.add_argument("--tls-creds", required=True, help="QEMU-layout dir with client certs")
    parser.add_argument("--tls-hostname", help="name the destination's certificate must hold")
    args = parser.parse_args()
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, args)))
