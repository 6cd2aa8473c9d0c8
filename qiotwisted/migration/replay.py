"""``qio send``: replay a recorded session into a QEMU destination.

The order matters to QEMU 7.2 (``qemu-interop.md`` traps 3-5): the main
channel is connected first (with TLS, handshaken) and its first bytes are
written before any multifd channel connects, because 7.2 does not peek and
takes the first connection as main; then every multifd channel connects on
its own and all are fed concurrently, since the destination waits on sync
points across channels.  A plain TCP or UNIX channel is sent with
``sendfile(2)`` by a thread of its own (:mod:`._sendfile`): the bytes never
enter Python, and the thread waits while the socket is full.  Any other
channel (TLS) is written with backpressure (``write_all`` waits while the
socket's buffer is full) from a file read in worker threads, one chunk
ahead.  Either way memory stays bounded whatever the size.

Never connect to a destination just to probe it: a plain QEMU destination takes
any connection as its main channel and exits when it closes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger
from twisted.python.failure import Failure

from .._address import AddressLike
from .._pool import WorkerPool
from ..channel import Channel, SocketChannel
from ..task import run_in_worker
from . import wire
from ._sendfile import SendfilePump
from .session import MANIFEST

__all__ = ["ChannelPlan", "Progress", "ReplayError", "load_plan", "send_session"]

# 1 MiB: each channel holds one chunk in flight and one read ahead, and
# Twisted copies a chunk once more when it sends; 4 MiB put a multifd-4
# replay at 132 MiB peak RSS, 1 MiB at 74 MiB, at the same speed.
CHUNK = 1 << 20


class ReplayError(Exception):
    """The session cannot be sent (bad session directory, connect or TLS failure)."""


@dataclass
class ChannelPlan:
    kind: str  # "main" or "multifd"
    path: Path
    size: int
    channel_id: int | None = None
    sent: int = 0
    done: bool = False
    error: str | None = None


@dataclass
class Progress:
    """Byte counters shared by the senders, read by the progress reporter."""

    channels: list[ChannelPlan]
    started: float = field(default_factory=time.monotonic)

    @property
    def total(self) -> int:
        return sum(c.size for c in self.channels)

    @property
    def sent(self) -> int:
        return sum(c.sent for c in self.channels)


def load_plan(session: Path) -> list[ChannelPlan]:
    """The channels of a session, main first; from its manifest when it has one.

    Blocking (small reads): call it before the reactor runs, or in a worker.
    """
    if session.is_file():
        return [ChannelPlan("main", session, session.stat().st_size)]
    if not session.is_dir():
        raise ReplayError(f"{session}: no such session directory")
    manifest_path = session / MANIFEST
    plans: list[ChannelPlan] = []
    if manifest_path.exists():
        try:
            manifest = json.loads(manifest_path.read_text())
            entries = manifest["channels"]
        except (ValueError, KeyError, TypeError) as e:
            raise ReplayError(f"{manifest_path}: unreadable manifest ({e})") from e
        for entry in entries:
            path = session / str(entry["file"])
            if not path.is_file():
                raise ReplayError(f"{path}: listed in the manifest but missing")
            plans.append(
                ChannelPlan(str(entry["kind"]), path, path.stat().st_size, entry.get("id"))
            )
    else:
        for path in sorted(session.glob("*.bin")):
            if path.name == "main.bin":
                plans.append(ChannelPlan("main", path, path.stat().st_size))
            elif path.name.startswith("multifd-"):
                plans.append(
                    ChannelPlan("multifd", path, path.stat().st_size, int(path.stem.split("-")[1]))
                )
    mains = [p for p in plans if p.kind == "main"]
    if len(mains) != 1:
        raise ReplayError(f"{session}: expected one main channel, found {len(mains)}")
    return mains + sorted(
        (p for p in plans if p.kind == "multifd"), key=lambda p: p.channel_id or 0
    )


class _FileReader:
    """Reads a file in chunks in worker threads, one chunk ahead of the writer."""

    def __init__(self, path: Path, *, pool: WorkerPool | None, reactor: Any) -> None:
        self.path = path
        self._pool = pool
        self._reactor = reactor
        self._file: Any = None

    def _read(self, n: int) -> bytes:
        if self._file is None:
            self._file = open(self.path, "rb")  # closed by close()
        data: bytes = self._file.read(n)
        return data

    def read(self, n: int = CHUNK) -> Deferred[bytes]:
        return run_in_worker(self._read, n, pool=self._pool, reactor=self._reactor)

    def close(self) -> Deferred[None]:
        f, self._file = self._file, None
        if f is None:
            return Deferred.fromCoroutine(_noop())
        return run_in_worker(f.close, pool=self._pool, reactor=self._reactor)


async def _noop() -> None:
    return None


Connector = Callable[[], Deferred[Channel]]


class Sender:
    """Sends one session to one destination; see the module docstring for the order.

    :param connect: opens one channel to the destination (plain or TLS);
        called once for main, then once per multifd channel.
    :param uuid: rewrite every multifd init packet to this uuid.
    """

    log = Logger()

    def __init__(
        self,
        plans: list[ChannelPlan],
        connect: Connector,
        *,
        uuid: UUID | None = None,
        pool: WorkerPool | None = None,
        reactor: Any = None,
    ) -> None:
        self.plans = plans
        self.progress = Progress(plans)
        self._connect = connect
        self._uuid = uuid
        self._pool = pool
        self._reactor = reactor

    async def run(self) -> bool:
        """Send everything; True when every channel was delivered."""
        main_plan, multifd = self.plans[0], self.plans[1:]
        try:
            main = await self._connect()
        except Exception as e:
            main_plan.error = f"connect: {e}"
            return False
        pump = SendfilePump.take(main, main_plan)
        if pump is not None:
            # The pump writes main's first bytes; the multifd channels connect
            # once they went out, as below.
            started: Deferred[None] = Deferred()
            sends = [Deferred.fromCoroutine(self._pump(main_plan, main, pump, b"", started))]
            try:
                await started
            except Exception:
                await sends[0]  # it recorded the error and closed the channel
                return False
        else:
            main_reader = _FileReader(main_plan.path, pool=self._pool, reactor=self._reactor)
            try:
                first = await main_reader.read(min(CHUNK, 1 << 16))
                await main.write_all(first)
                main_plan.sent += len(first)
            except Exception as e:
                main_plan.error = str(e)
                await main.close()
                await main_reader.close()
                return False
            sends = [Deferred.fromCoroutine(self._send(main_plan, main, main_reader))]
        for plan in multifd:
            sends.append(Deferred.fromCoroutine(self._connect_and_send(plan)))
        results = await DeferredList(sends, consumeErrors=True)
        for (ok, value), plan in zip(results, self.plans, strict=True):
            if not ok and plan.error is None and isinstance(value, Failure):
                plan.error = value.getErrorMessage()
        return all(p.done and p.error is None for p in self.plans)

    async def _connect_and_send(self, plan: ChannelPlan) -> None:
        try:
            channel = await self._connect()
        except Exception as e:
            plan.error = f"connect: {e}"
            return
        reader = _FileReader(plan.path, pool=self._pool, reactor=self._reactor)
        pump = SendfilePump.take(channel, plan)
        if pump is None:
            await self._send(plan, channel, reader)
            return
        head = b""
        if self._uuid is not None:
            # The init packet (first 64 KiB read, rewritten) goes before the file.
            try:
                head = wire.rewrite_multifd_uuid(await reader.read(1 << 16), self._uuid)
            except Exception as e:
                plan.error = str(e)
                await channel.close()
                return
            finally:
                await reader.close()
        else:
            await reader.close()
        await self._pump(plan, channel, pump, head)

    async def _pump(
        self,
        plan: ChannelPlan,
        channel: Channel,
        pump: SendfilePump,
        head: bytes,
        started: Deferred[None] | None = None,
    ) -> None:
        """Send *plan*'s file with :class:`SendfilePump`; *head* replaces its first bytes."""
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor
        try:
            await pump.run(reactor, head, len(head), plan.size, started)
            _settle(plan)
        except Exception as e:
            self._fail(plan, e)
        finally:
            await channel.close()

    def _fail(self, plan: ChannelPlan, error: Exception) -> None:
        plan.error = str(error)
        self.log.error("{file}: {error}", file=plan.path.name, error=error)

    async def _send(self, plan: ChannelPlan, channel: Channel, reader: _FileReader) -> None:
        try:
            pending = reader.read()
            rewrite = plan.kind == "multifd" and self._uuid is not None and plan.sent == 0
            while True:
                data = await pending
                if not data:
                    break
                pending = reader.read()  # read ahead while this chunk is written
                if rewrite:
                    data = wire.rewrite_multifd_uuid(data, self._uuid) if self._uuid else data
                    rewrite = False
                await channel.write_all(data)
                plan.sent += len(data)
            bye = getattr(channel, "bye", None)
            if bye is not None:
                await bye()
            _settle(plan)
        except Exception as e:
            self._fail(plan, e)
        finally:
            await channel.close()
            await reader.close()


def _settle(plan: ChannelPlan) -> None:
    """Mark *plan* done if all of its file went out, else say the file changed."""
    plan.done = plan.sent == plan.size
    if not plan.done:
        plan.error = f"file changed while sending: {plan.sent} of {plan.size} bytes"


def send_session(
    session: Path,
    to: AddressLike,
    *,
    tls: Callable[[Channel], Deferred[Channel]] | None = None,
    uuid: UUID | None = None,
    reactor: Any = None,
    pool: WorkerPool | None = None,
) -> Sender:
    """Build a :class:`Sender` for *session* to address *to*; ``await sender.run()``.

    *tls*, if given, turns a connected plain channel into a handshaken TLS one.
    """
    plans = load_plan(session)

    def connect() -> Deferred[Channel]:
        d: Deferred[Any] = SocketChannel.connect(to, reactor=reactor, pool=pool).deferred
        if tls is not None:
            d.addCallback(tls)
        return d

    return Sender(plans, connect, uuid=uuid, pool=pool, reactor=reactor)


def _format_progress(progress: Progress, *, bar: bool) -> str:
    elapsed = max(time.monotonic() - progress.started, 1e-6)
    sent, total = progress.sent, progress.total
    rate = sent / elapsed
    eta = (total - sent) / rate if rate > 0 else float("inf")
    pct = 100.0 * sent / total if total else 100.0
    eta_text = f"{eta:5.1f} s" if eta != float("inf") else "  ?"
    text = f"{sent / 1e6:9.1f} / {total / 1e6:.1f} MB  {rate / 1e6:7.1f} MB/s  ETA {eta_text}"
    if not bar:
        return f"sent {pct:5.1f}%  {text}"
    width = 30
    filled = int(width * sent / total) if total else width
    return f"\r[{'#' * filled}{'.' * (width - filled)}] {pct:5.1f}%  {text}"


def main(argv: list[str]) -> int:
    """``qio send SESSION --to ADDRESS [--tls-creds DIR --tls-hostname NAME] [--uuid UUID]``."""
    import argparse
    import sys

    from twisted.internet import task as _task

    parser = argparse.ArgumentParser(
        prog="qio send",
        description="Send a recorded session into a QEMU destination started with -incoming.",
    )
    parser.add_argument("session", type=Path, help="a session directory (or a main.bin file)")
    parser.add_argument(
        "--to", required=True, help="destination address: HOST:PORT, tcp:HOST:PORT or unix:PATH"
    )
    parser.add_argument("--tls-creds", type=Path, help="client credentials dir (QEMU layout)")
    parser.add_argument("--tls-hostname", help="name to verify in the destination's certificate")
    parser.add_argument("--uuid", type=UUID, help="rewrite multifd init packets to this -uuid")
    parser.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    args = parser.parse_args(argv)
    try:
        load_plan(args.session)  # fail fast, before any connection is made
    except (ReplayError, OSError) as e:
        print(f"qio send: {e}", file=sys.stderr)
        return 2
    if args.tls_hostname and not args.tls_creds:
        parser.error("--tls-hostname needs --tls-creds")

    async def run(reactor: Any) -> int:
        tls = None
        if args.tls_creds is not None:
            tls = await _client_tls(reactor, args.tls_creds, args.tls_hostname or _host_of(args.to))
        try:
            sender = send_session(args.session, args.to, tls=tls, uuid=args.uuid, reactor=reactor)
        except (ReplayError, ValueError) as e:
            print(f"qio send: {e}", file=sys.stderr)
            return 2
        tty = sys.stderr.isatty() and not args.json
        ticker = _task.LoopingCall(
            lambda: print(
                _format_progress(sender.progress, bar=tty),
                end="" if tty else "\n",
                file=sys.stderr,
                flush=True,
            )
        )
        ticker.clock = reactor
        ticker.start(0.25 if tty else 1.0, now=False)
        try:
            ok = await sender.run()
        finally:
            ticker.stop()
        print(_format_progress(sender.progress, bar=tty), file=sys.stderr)
        elapsed = time.monotonic() - sender.progress.started
        for p in sender.plans:
            if p.error:
                print(f"qio send: {p.path.name}: {p.error}", file=sys.stderr)
        if args.json:
            print(
                json.dumps(
                    {
                        "ok": ok,
                        "seconds": round(elapsed, 3),
                        "bytes": sender.progress.sent,
                        "channels": [
                            {
                                "file": p.path.name,
                                "kind": p.kind,
                                "id": p.channel_id,
                                "bytes": p.sent,
                                "size": p.size,
                                "delivered": p.done and p.error is None,
                                "error": p.error,
                            }
                            for p in sender.plans
                        ],
                    },
                    indent=2,
                )
            )
        return 0 if ok else 1

    result: list[int] = []

    async def main_coro(reactor: Any) -> None:
        result.append(await run(reactor))

    try:
        _task.react(lambda r: Deferred.fromCoroutine(main_coro(r)))
    except SystemExit as e:
        if e.code not in (0, None):
            return int(e.code) if isinstance(e.code, int) else 1
    return result[0] if result else 1


def _host_of(address: str) -> str:
    from .._address import InetSocketAddress, parse_address

    addr = parse_address(address)
    return addr.host if isinstance(addr, InetSocketAddress) else "localhost"


async def _client_tls(
    reactor: Any, creds_dir: Path, hostname: str
) -> Callable[[Channel], Deferred[Channel]]:
    from ..channel.tls import TLSChannel
    from ..crypto import TLSCreds

    creds = await TLSCreds.load(creds_dir, endpoint="client", reactor=reactor).deferred

    def upgrade(channel: Channel) -> Deferred[Channel]:
        tls = TLSChannel.new_client(channel, creds, hostname)

        def done(_: object) -> Channel:
            return tls

        return tls.handshake().deferred.addCallback(done)

    return upgrade
