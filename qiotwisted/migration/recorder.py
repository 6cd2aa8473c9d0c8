"""The migration recorder behind ``twistd qio record``.

Each accepted connection is classified from its first bytes, as QEMU's own
destination does on plain sockets (``qemu-io.md`` §10.3): a ``QEVM`` magic is a
main channel, a multifd magic a multifd channel; anything else is refused with
a logged reason and stores nothing.  The recorder never writes a byte back to
the source: a QEMU 7.2 source that receives anything resets its socket at close
and silently drops the end of its stream (``qemu-interop.md`` trap 1).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import UUID

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from .._pool import WorkerPool
from ..channel import Channel
from ..errors import ChannelError
from . import wire
from .session import ChannelSink, Session

__all__ = ["Recorder"]

READ_SIZE = 1024 * 1024


class Recorder:
    """Files incoming migrations under *output*; plug :meth:`client_func` into a NetListener.

    Thread contract: everything here runs in the reactor thread; disk work goes
    to the worker pool through :class:`~qiotwisted.migration.session.ChannelSink`.

    :param classify_timeout: seconds a new connection may take to send its magic.
    :param tls: turns each accepted channel into a handshaken TLS channel
        (``twistd qio record --tls-creds``); a failed handshake stores nothing.
    :ivar sessions_done: ``(path, status)`` of every finished session, newest last.
    """

    log = Logger()

    def __init__(
        self,
        output: Path | str,
        *,
        reactor: Any = None,
        pool: WorkerPool | None = None,
        classify_timeout: float = 60.0,
        tls: Callable[[Channel], Deferred[Channel]] | None = None,
    ) -> None:
        self.output = Path(output)
        self._tls = tls
        self._reactor = reactor
        self._pool = pool
        self._classify_timeout = classify_timeout
        self._open: list[Session] = []
        self.sessions_done: list[tuple[Path, str]] = []
        self._active: set[Deferred[None]] = set()
        self._channels: set[Channel] = set()
        self._filed_waiters: list[Deferred[tuple[Path, str]]] = []

    @property
    def reactor(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    @property
    def open_sessions(self) -> list[Session]:
        return list(self._open)

    def next_session(self) -> Deferred[tuple[Path, str]]:
        """Fires with ``(path, status)`` when the next session is filed (reactor thread)."""
        d: Deferred[tuple[Path, str]] = Deferred(self._filed_waiters.remove)
        self._filed_waiters.append(d)
        return d

    def client_func(self, listener: object, channel: Channel, data: object = None) -> None:
        """NetListener client func: take ownership of *channel* and record it."""
        self._channels.add(channel)
        d = Deferred.fromCoroutine(self._handle(channel))
        self._active.add(d)
        d.addErrback(lambda f: self.log.failure("recording {channel!r} failed", f, channel=channel))

        def forget(_: object) -> None:
            self._active.discard(d)
            self._channels.discard(channel)

        d.addBoth(forget)

    async def _handle(self, channel: Channel) -> None:
        peer = _peer(channel)
        if self._tls is not None:
            try:
                tls_channel = await self._tls(channel)
            except Exception as e:
                self.log.warn("refused {peer}: TLS handshake failed: {error}", peer=peer, error=e)
                await channel.close()
                return
            # stop() closes the socket underneath, which ends the TLS channel too.
            channel = tls_channel
        try:
            head = await channel.read_all_eof(4).addTimeout(self._classify_timeout, self.reactor)
        except Exception as e:
            self.log.warn("refused {peer}: no migration magic ({error})", peer=peer, error=e)
            await channel.close()
            return
        kind = wire.classify(head)
        if kind is wire.ChannelKind.MAIN:
            await self._record_main(channel, head, peer)
        elif kind is wire.ChannelKind.MULTIFD:
            await self._record_multifd(channel, head, peer)
        else:
            self.log.warn("refused {peer}: {reason}", peer=peer, reason=wire.classify_reason(head))
            await channel.close()

    async def _record_main(self, channel: Channel, head: bytes, peer: str) -> None:
        session = await self._join(peer, main=True, uuid=None, channel_id=None)
        if session is None:
            await channel.close()
            return
        self.log.info("session {name}: main channel from {peer}", name=session.name, peer=peer)
        sink = session.add_channel("main", "main.bin")
        get_peer_dn = getattr(channel, "get_peer_dn", None)
        if get_peer_dn is not None:
            session.extra["tls"] = {
                "peer_dn": get_peer_dn(),
                "protocol": getattr(channel, "protocol_version", None),
                "cipher": getattr(channel, "cipher", None),
            }
        await self._pump(session, channel, sink, "main.bin", head)
        await self._maybe_close(session)

    async def _record_multifd(self, channel: Channel, head: bytes, peer: str) -> None:
        try:
            rest = await channel.read_all(wire.MULTIFD_INIT_SIZE - len(head))
            init = wire.MultifdInit.parse(head + rest)
        except (ChannelError, wire.WireError) as e:
            self.log.warn("refused multifd channel from {peer}: {error}", peer=peer, error=e)
            await channel.close()
            return
        session = await self._join(peer, main=False, uuid=init.uuid, channel_id=init.channel_id)
        if session is None:
            await channel.close()
            return
        filename = f"multifd-{init.channel_id}.bin"
        self.log.info(
            "session {name}: multifd channel {id} from {peer}",
            name=session.name,
            id=init.channel_id,
            peer=peer,
        )
        sink = session.add_channel("multifd", filename, init.channel_id)
        await self._pump(session, channel, sink, filename, head + rest)
        await self._maybe_close(session)

    async def _join(
        self, peer: str, *, main: bool, uuid: UUID | None, channel_id: int | None
    ) -> Session | None:
        """Find the open session this channel belongs to, or start one.

        QEMU 7.2 connects the main channel first but writes its header only
        after every multifd channel has sent its init packet, so the channels of
        one migration are classified in any order.  A channel joins the newest
        open session from the same host that still lacks a channel of its kind
        (for multifd: same uuid, id not taken); otherwise it starts its own
        session, so two migrations are never mixed in one.
        """
        host = _host(peer)
        for session in reversed(self._open):
            if _host(session.peer) != host or session.closing:
                continue
            if main and session.has_main:
                continue
            if not main:
                if session.uuid is not None and session.uuid != uuid:
                    continue
                if f"multifd-{channel_id}.bin" in session.sinks:
                    self.log.warn(
                        "refused multifd channel from {peer}: id {id} already set up in "
                        "session {name}",
                        peer=peer,
                        id=channel_id,
                        name=session.name,
                    )
                    return None
            break
        else:
            session = Session(self.output, peer=peer, pool=self._pool, reactor=self.reactor)
            self._open.append(session)
            await session.open()
        if uuid is not None:
            session.uuid = uuid
        return session

    async def _maybe_close(self, session: Session) -> None:
        """Close the session once it has a main channel and every channel seen has ended."""
        if session.closing or not session.has_main:
            return
        if not all(c.ended for c in session.channels):
            return
        session.closing = True
        self._open.remove(session)
        path = await session.close()
        self.sessions_done.append((path, session.status))
        waiters, self._filed_waiters = self._filed_waiters, []
        for d in waiters:
            d.callback((path, session.status))
        self.log.info(
            "session {name}: {status}{reason} ({bytes} bytes) -> {path}",
            name=session.name,
            status=session.status,
            reason=f" ({session.reason})" if session.reason else "",
            bytes=sum(c.bytes for c in session.channels),
            path=str(path),
        )

    async def _pump(
        self, session: Session, channel: Channel, sink: ChannelSink, filename: str, first: bytes
    ) -> None:
        """Copy the channel into its sink until EOF or error, with backpressure."""
        error: str | None = None
        clean_eof = False
        sink.write(first)
        try:
            while True:
                data = await channel.read(READ_SIZE)
                if not data:
                    clean_eof = True
                    break
                sink.write(data)
                await sink.drained()
        except ChannelError as e:
            error = str(e)
        finally:
            await sink.finish(eof=clean_eof)
            await channel.close()
            session.channel_ended(filename, error)

    def stop(self) -> Deferred[None]:
        """Close every open session as ``incomplete`` (service shutdown)."""
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        # Closing a channel fails its pending read with ChannelClosedError, so
        # each pump ends, its session is judged on content (incomplete) and
        # filed; then wait for every handler to finish writing.
        for channel in list(self._channels):
            channel.close()
        from twisted.internet.defer import DeferredList

        await DeferredList(list(self._active), consumeErrors=True)


def _host(peer: str) -> str:
    return peer.rsplit(":", 1)[0]


def _peer(channel: Channel) -> str:
    addr: Any = getattr(channel, "remote_address", None)
    host = getattr(addr, "host", None)
    if host is not None:
        return f"{host}:{addr.port}"
    if addr is not None:
        return f"unix:{getattr(addr, 'name', '')!r}"
    return "unknown"
