"""Four TLS channels, one reactor thread: a multichannel transfer you can run without QEMU.

One process plays both ends, as a multifd migration uses four channels.  It
makes throw-away credentials, generates a random image and its sha256, starts
a destination (``NetListener`` + TLS server) and a source that sends the image
in four stripes over four TLS channels into the destination's file, then
hashes what arrived.  Every blocking step (key generation, credential loading,
disk reads and writes, hashing) is a ``Task`` whose worker runs in a
``qio-worker-N`` thread; every completion runs in the reactor thread, and the
output shows both::

    python examples/tls_migration/multichannel_demo.py            # 256 MiB
    python examples/tls_migration/multichannel_demo.py --mib 16

Exits by itself, with status 0 once the received image's sha256 matches.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import struct
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import defer, task
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from zope.interface import provider

from qiotwisted import NetListener, SocketChannel, Task
from qiotwisted.channel import port_of
from qiotwisted.channel.tls import TLSChannel
from qiotwisted.crypto import TLSCreds, generate_pki
from qiotwisted.task import set_trace_enabled

R = TypeVar("R")
CHANNELS, CHUNK = 4, 1 << 20  # CHUNK: one disk read or write, one TLS write_all
HEADER = struct.Struct(">QQ")  # each channel starts with its stripe's offset and length
ROLES = {"qio_task_thread_run": "worker", "qio_task_complete": "completion"}
traced: dict[Task[Any], dict[str, str]] = defaultdict(dict)  # task -> role -> thread name
seen: set[tuple[str, str, str]] = set()  # (what, role, thread name) already printed


@provider(ILogObserver)
def on_trace(event: LogEvent) -> None:
    """A log observer: qiotwisted's trace events are logged in the thread that runs the step."""
    role = ROLES.get(event.get("event", ""))
    if role is not None:
        traced[event["task"]][role] = threading.current_thread().name


async def step(what: str, t: Task[R]) -> R:
    """Await a Task, then print the threads that ran its worker and its completion (once each)."""
    result = await t
    for role, name in traced.pop(t, {}).items():
        if (what, role, name) not in seen:
            seen.add((what, role, name))
            print(f"  {role:<10}  {what:<34} ran on {name}", flush=True)
    return result


def in_thread(fn: Callable[..., R], *args: Any) -> Task[R]:
    """Run ``fn(*args)`` in a worker thread as a Task."""
    t: Task[R] = Task(fn.__name__)
    t.run_in_thread(lambda me, _: me.set_result(fn(*args)))  # me is t, in a worker thread
    return t


def make_files(tmp: str, size: int) -> tuple[str, int, int]:
    """The random image (hashed as it is written) and the preallocated file it goes to."""
    digest, path = hashlib.sha256(), os.path.join(tmp, "image.bin")
    with open(path, "wb") as f:
        for pos in range(0, size, CHUNK):
            block = os.urandom(min(CHUNK, size - pos))
            digest.update(block)
            f.write(block)
    dst = os.open(path + ".received", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(dst, size)
    return digest.hexdigest(), os.open(path, os.O_RDONLY), dst


def hash_and_close(src: int, dst: int) -> str:
    digest = hashlib.sha256()
    while block := os.read(dst, CHUNK):
        digest.update(block)
    os.close(src)
    os.close(dst)
    return digest.hexdigest()


async def receive(channel: SocketChannel, creds: TLSCreds, fd: int) -> int:
    """Destination side of one channel: TLS server, then its stripe into the file."""
    tls = TLSChannel.new_server(channel, creds)
    await step("TLS handshake (no worker)", tls.handshake())  # driven by readiness, no thread
    offset, length = HEADER.unpack(await tls.read_all(HEADER.size))
    print(f"destination: {tls.protocol_version} from {tls.get_peer_dn()}, stripe at "
          f"{offset >> 20} MiB", flush=True)  # fmt: skip
    writing: Task[int] | None = None
    for pos in range(offset, offset + length, CHUNK):
        data = await tls.read_all(min(CHUNK, offset + length - pos))
        if writing is not None:
            await step("write received chunk", writing)  # one write in flight at a time
        writing = in_thread(os.pwrite, fd, data, pos)
    if writing is not None:
        await step("write received chunk", writing)
    if await tls.read(1) != b"":
        raise RuntimeError("more data than the stripe header announced")
    await tls.close()
    return length


async def send(port: int, creds: TLSCreds, fd: int, offset: int, length: int) -> None:
    """Source side of one channel: connect (a Task), TLS client, then its stripe."""
    channel = await step("connect", SocketChannel.connect(("127.0.0.1", port)))
    tls = TLSChannel.new_client(channel, creds, "localhost")
    await step("TLS handshake (no worker)", tls.handshake())
    await tls.write_all(HEADER.pack(offset, length))
    end = offset + length
    reading = in_thread(os.pread, fd, min(CHUNK, length), offset)
    for pos in range(offset + CHUNK, end + CHUNK, CHUNK):
        data = await step("read image chunk", reading)
        if pos < end:  # read the next chunk while this one is sent
            reading = in_thread(os.pread, fd, min(CHUNK, end - pos), pos)
        await tls.write_all(data)  # waits while the socket's buffer is full
    await step("TLS bye (no worker)", tls.bye())  # close_notify
    await tls.close()


async def main(reactor: Any, tmp: str, mib: int) -> None:
    size, me = mib << 20, threading.current_thread().name
    set_trace_enabled(True)  # qiotwisted's debug trace events say which thread ran what
    stderr = textFileLogObserver(sys.stderr)  # warnings and errors only
    warnings = FilteringLogObserver(stderr, [LogLevelFilterPredicate(LogLevel.warn)])
    globalLogBeginner.beginLoggingTo([on_trace, warnings], redirectStandardIO=False)
    print(f"reactor thread: {me}", flush=True)
    await step("generate PKI (CA, server, client)", generate_pki(tmp))
    server_creds = await step("load server credentials", TLSCreds.load(tmp, "server"))
    client_creds = await step("load client credentials", TLSCreds.load(tmp, "client"))
    what = f"generate {mib} MiB image + sha256"
    expected, src, dst = await step(what, in_thread(make_files, tmp, size))

    received: list[defer.Deferred[int]] = []  # one per accepted channel

    def on_client(listener: NetListener, channel: SocketChannel, _: object) -> None:
        received.append(defer.Deferred.fromCoroutine(receive(channel, server_creds, dst)))

    listener = NetListener(reactor=reactor, name="demo-destination")
    listener.set_client_func(on_client)
    (address,) = await listener.open("tcp:0:interface=127.0.0.1")
    port = port_of(address)
    print(f"destination listening on 127.0.0.1:{port}", flush=True)
    started, stripe = time.monotonic(), -(-size // CHANNELS)
    sends = [send(port, client_creds, src, off, min(stripe, size - off))
             for off in range(0, size, stripe)]  # fmt: skip
    await defer.gatherResults([defer.Deferred.fromCoroutine(s) for s in sends], consumeErrors=True)
    # A client's handshake needs the server's, so every channel is accepted by now.
    total = sum(await defer.gatherResults(received, consumeErrors=True))
    elapsed = time.monotonic() - started
    await listener.disconnect()
    print(f"sent {total >> 20} MiB over {len(received)} TLS channels in {elapsed:.2f} s "
          f"({total / elapsed / 1e6:.0f} MB/s)")  # fmt: skip
    got = await step("hash received image", in_thread(hash_and_close, src, dst))
    roles = {r: {name for _, role, name in seen if role == r} for r in ROLES.values()}
    print(f"workers ran on: {', '.join(sorted(roles['worker']))}")
    print(f"completions ran on: {', '.join(sorted(roles['completion']))}")
    if roles["completion"] != {me} or me in roles["worker"]:
        raise RuntimeError("a completion left the reactor thread, or a worker ran on it")
    if got != expected:
        raise RuntimeError(f"sha256 mismatch: sent {expected}, received {got}")
    print(f"sha256 verified: {got}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="image size in MiB (default 256)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qio-demo-") as tmp:  # removed after react() exits
        task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, tmp, args.mib)))
