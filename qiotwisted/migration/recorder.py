"""The migration recorder behind ``twistd qio record``.

Each accepted connection is classified from its first bytes, as QEMU's own
destination does on plain sockets (``qemu-io.md`` §10.3): a ``QEVM`` magic is a
main channel, a multifd magic a multifd channel; anything else is refused with
a logged reason and stores nothing.  The recorder never writes a byte back to
the source: a QEMU 7.2 source that receives anything resets its socket at close
and silently drops the end of its stream (``qemu-interop.md`` trap 1).

Limits (:class:`~qiotwisted.migration.limits.Limits`) and what they do here:

* a connection beyond ``max_connections`` (``max_connections_per_peer`` from
  one address) is closed at once, before anything is read from it;
* a connection that does not identify itself in ``handshake_timeout`` (TLS
  handshake, then the magic and multifd init packet) is closed;
* a channel that sends nothing for ``idle_timeout`` is closed and its session
  stopped: it is filed ``incomplete`` with that reason;
* no session starts beyond ``max_sessions``, nor when the output filesystem
  has less than ``min_free_space`` free; while sessions are open the space is
  checked every ``disk_check_interval`` and, below the floor, every open
  session is stopped and filed ``incomplete`` ("disk nearly full");
* a write error (``EFBIG``, ``ENOSPC``) stops the session the same way;
* so does a channel that fails (reset mid-stream): QEMU fails the whole
  migration then, but a 7.2 source was seen keeping its main channel open
  after a multifd channel died, which would otherwise hold the session until
  the idle timeout.

:meth:`Recorder.stop` (SIGTERM) stops every open session the same way, with
the reason "the service stopped while recording".

Nothing already stored is lost: an ended session is always filed with a
parseable manifest (or, if even that cannot be written, left as
``.incoming-*`` for :meth:`Recorder.start` to file at the next start).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import UUID

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import deferLater
from twisted.logger import Logger

from .._pool import WorkerPool
from ..channel import Channel
from ..errors import ChannelError, QIOError
from ..task import run_in_worker
from . import wire
from .limits import ConnectionLimiter, FreeSpace, IdleWatchdog, Limits, RateWatchdog
from .session import ChannelSink, Session, SessionStatus, recover_incoming

__all__ = ["DISK_FULL", "LOCK_NAME", "STOPPED_REASON", "Recorder"]

READ_SIZE = 1024 * 1024
LOCK_NAME = ".qio-record.lock"
STOPPED_REASON = "the service stopped while recording"
DISK_FULL = "disk nearly full"


class Recorder:
    """Files incoming migrations under *output*; plug :meth:`client_func` into a NetListener.

    Thread contract: everything here runs in the reactor thread; disk work goes
    to the worker pool through :class:`~qiotwisted.migration.session.ChannelSink`.

    :param classify_timeout: seconds a new connection may take to send its
        magic (and multifd init packet) once connected (and, with TLS,
        handshaken); default: ``limits.handshake_timeout``.
    :param tls: turns each accepted channel into a handshaken TLS channel
        (``twistd qio record --tls-creds``); a failed handshake stores nothing.
    :param limits: see the module docstring; default :class:`Limits`'s defaults.
    :param statvfs: ``os.statvfs`` stand-in for the free-space checks.
    :ivar sessions_done: ``(path, status)`` of every finished session, newest last.
    """

    log = Logger()

    def __init__(
        self,
        output: Path | str,
        *,
        reactor: Any = None,
        pool: WorkerPool | None = None,
        classify_timeout: float | None = None,
        tls: Callable[[Channel], Deferred[Channel]] | None = None,
        limits: Limits | None = None,
        statvfs: Callable[[str], Any] = os.statvfs,
    ) -> None:
        self.output = Path(output)
        self._tls = tls
        self._reactor = reactor
        self._pool = pool
        self.limits = limits if limits is not None else Limits()
        self._classify_timeout = (
            classify_timeout if classify_timeout is not None else self.limits.handshake_timeout
        )
        self.admission = ConnectionLimiter(
            self.limits.max_connections, self.limits.max_connections_per_peer
        )
        self.free_space = FreeSpace(
            self.output,
            self.limits.min_free_space,
            timeout=self.limits.disk_check_timeout,
            statvfs=statvfs,
            pool=pool,
            reactor=reactor,
        )
        self._open: list[Session] = []
        self.sessions_done: list[tuple[Path, str]] = []
        self._active: set[Deferred[None]] = set()
        self._channels: set[Channel] = set()
        self._filed_waiters: list[Deferred[tuple[Path, str]]] = []
        self._orphan_calls: dict[Session, Any] = {}
        self._rates: dict[Session, RateWatchdog] = {}
        self._disk_call: Any = None
        self._disk_checking: Deferred[None] | None = None
        self._stopping = False
        self._lock_fd: int | None = None

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

    # -- service life -------------------------------------------------------------------

    def start(self) -> Deferred[list[Path]]:
        """Take *output* for this recorder and file what a killed one left there.

        In a worker thread: create *output*, lock it (``flock`` on
        :data:`LOCK_NAME`: a second recorder on the same directory fails here
        with a clear error instead of filing the first one's live sessions),
        then file every ``.incoming-*`` session as ``incomplete``
        (:func:`~qiotwisted.migration.session.recover_incoming`).  Fires with
        the recovered session directories.  Optional: a recorder that is never
        started records all the same.
        """
        d = run_in_worker(self._start_in_thread, pool=self._pool, reactor=self._reactor)

        def started(found: list[Path]) -> list[Path]:
            for path in found:
                self.log.warn(
                    "filed {path} as incomplete: a previous run ended before it did",
                    path=str(path),
                )
            return found

        return d.addCallback(started)

    def _start_in_thread(self) -> list[Path]:
        import fcntl

        self.output.mkdir(parents=True, exist_ok=True)
        lock_path = self.output / LOCK_NAME
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise QIOError(
                f"{self.output} is in use by another recorder (lock {lock_path})"
            ) from None
        self._lock_fd = fd
        return recover_incoming(self.output)

    def stop(self) -> Deferred[None]:
        """Stop every open session and file it (``incomplete`` unless complete by content).

        New connections are refused from now on.  Fires once every session is
        filed.  Used at service shutdown (SIGTERM).
        """
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self._stopping = True
        self._cancel_disk_timer()
        # Closing a channel fails its pending read with ChannelClosedError, so
        # each pump ends, its session is judged and filed; then wait for every
        # handler to finish writing.
        for session in list(self._open):
            session.stop(STOPPED_REASON)
        for channel in list(self._channels):
            channel.close()
        await DeferredList(list(self._active), consumeErrors=True)
        if self._disk_checking is not None:
            await DeferredList([self._disk_checking], consumeErrors=True)
        # Sessions no handler will close: multifd channels whose main never came.
        for session in list(self._open):
            if not session.closing and session.opened:
                await self._file(session)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- connections ----------------------------------------------------------------------

    def client_func(self, listener: object, channel: Channel, data: object = None) -> None:
        """NetListener client func: take ownership of *channel* and record it."""
        peer = _peer(channel)
        key = _host(peer)
        refusal = "the service is stopping" if self._stopping else self.admission.try_admit(key)
        if refusal is not None:
            self._refuse(channel, peer, refusal)
            return
        self._channels.add(channel)
        d = Deferred.fromCoroutine(self._handle(channel, peer))
        self._active.add(d)
        d.addErrback(lambda f: self.log.failure("recording {channel!r} failed", f, channel=channel))

        def forget(_: object) -> None:
            self._active.discard(d)
            self._channels.discard(channel)
            self.admission.release(key)

        d.addBoth(forget)

    def _refuse(self, channel: Channel, peer: str, reason: str) -> None:
        """Close *channel* at once, writing nothing to it, and log why."""
        self.log.warn("refused {peer}: {reason}", peer=peer, reason=reason)
        channel.close().addErrback(lambda _: None)

    async def _handle(self, raw: Channel, peer: str) -> None:
        channel = raw
        if self._tls is not None:
            try:
                channel = await self._tls(raw)
            except Exception as e:
                self.log.warn("refused {peer}: TLS handshake failed: {error}", peer=peer, error=e)
                await raw.close()
                return
            # Closing the socket underneath (stop, idle) ends the TLS channel too.
        try:
            identify = Deferred.fromCoroutine(self._identify(channel))
            if self._classify_timeout:
                identify.addTimeout(self._classify_timeout, self.reactor)
            head, init = await identify
        except Exception as e:
            if _is_timeout(e):
                reason = (
                    f"sent no migration stream header within {self._classify_timeout:g} s "
                    "(handshake-timeout)"
                )
            else:
                reason = f"no migration magic ({e})"
            self._refuse(channel, peer, reason)
            return
        if not head:
            self.log.info("{peer} closed without sending anything", peer=peer)
            await channel.close()
        elif init is not None:
            await self._record_multifd(raw, channel, head, init, peer)
        elif wire.classify(head) is wire.ChannelKind.MAIN:
            await self._record_main(raw, channel, head, peer)
        else:
            self._refuse(channel, peer, wire.classify_reason(head))

    async def _identify(self, channel: Channel) -> tuple[bytes, wire.MultifdInit | None]:
        """The channel's first bytes: the magic, plus the init packet for multifd."""
        head = await channel.read_all_eof(4)
        if len(head) < 4 or wire.classify(head) is not wire.ChannelKind.MULTIFD:
            return head, None
        rest = await channel.read_all(wire.MULTIFD_INIT_SIZE - len(head))
        return head + rest, wire.MultifdInit.parse(head + rest)

    async def _record_main(self, raw: Channel, channel: Channel, head: bytes, peer: str) -> None:
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
        await self._pump(session, raw, channel, sink, "main.bin", head, peer)
        await self._maybe_close(session)

    async def _record_multifd(
        self, raw: Channel, channel: Channel, head: bytes, init: wire.MultifdInit, peer: str
    ) -> None:
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
        await self._pump(session, raw, channel, sink, filename, head, peer)
        await self._maybe_close(session)

    # -- sessions -------------------------------------------------------------------------

    async def _join(
        self, peer: str, *, main: bool, uuid: UUID | None, channel_id: int | None
    ) -> Session | None:
        """Find the open session this channel belongs to, or start one (None: refused).

        QEMU 7.2 connects the main channel first but writes its header only
        after every multifd channel has sent its init packet, so the channels of
        one migration are classified in any order.  A channel joins the newest
        open session from the same host that still lacks a channel of its kind
        (for multifd: same uuid, id not taken); otherwise it starts its own
        session, so two migrations are never mixed in one.  A new session
        needs a free slot (``max_sessions``) and room on the disk.
        """
        host = _host(peer)
        candidates = list(reversed(self._open))
        if main:
            # QEMU numbers its multifd channels from 0: a session holding
            # channel 0 is a likelier home for a main channel than a newer one
            # holding only a stray channel (a foreign uuid, say).  Stable sort:
            # newest first otherwise.
            candidates.sort(key=lambda s: 0 not in s.multifd_ids)
        for session in candidates:
            if _host(session.peer) != host or session.closing or session.stop_reason:
                continue
            if main and session.has_main:
                continue
            if not main:
                if session.uuid is not None and session.uuid != uuid:
                    continue
                if channel_id in session.multifd_ids:
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
            refusal = self._new_session_refusal()
            if refusal is not None:
                self.log.warn("refused {peer}: {reason}", peer=peer, reason=refusal)
                return None
            session = Session(self.output, peer=peer, pool=self._pool, reactor=self.reactor)
            self._open.append(session)
            self._rates[session] = RateWatchdog(
                self.reactor,
                self.limits.rate_window,
                self.limits.min_rate,
                functools.partial(self._too_slow, session),
            ).start()
            self._reserve(session, main, uuid, channel_id)
            reason = await self.free_space.check()
            if reason is None:
                try:
                    await session.open()
                except Exception as e:
                    reason = f"cannot create the session directory: {e}"
            else:
                session.fail_open(reason)
            if reason is not None:
                self._open.remove(session)
                self._rates.pop(session).stop()
                self.log.error("refused {peer}: {reason}", peer=peer, reason=reason)
                return None
            self._ensure_disk_timer()
            return session
        self._reserve(session, main, uuid, channel_id)
        if not session.opened:
            await session.when_open()
            if session.open_error is not None:
                self.log.warn("refused {peer}: {reason}", peer=peer, reason=session.open_error)
                return None
        return session

    def _reserve(self, session: Session, main: bool, uuid: UUID | None, cid: int | None) -> None:
        # Claimed before any wait, so a channel arriving meanwhile looks elsewhere.
        if main:
            session.has_main = True
            call = self._orphan_calls.pop(session, None)
            if call is not None and call.active():
                call.cancel()
        else:
            assert cid is not None
            session.multifd_ids.add(cid)
            if uuid is not None:
                session.uuid = uuid

    def _new_session_refusal(self) -> str | None:
        if self._stopping:
            return "the service is stopping"
        limit = self.limits.max_sessions
        if limit and len(self._open) >= limit:
            return f"{len(self._open)} sessions open, max-sessions is {limit}"
        return None

    async def _maybe_close(self, session: Session) -> None:
        """Close the session once it has a main channel and every channel seen has ended.

        A session whose channels all ended without a main one waits
        ``classify_timeout`` for it, then is filed ``incomplete``.
        """
        if session.closing or not all(c.ended for c in session.channels):
            return
        if not session.has_main and session.stop_reason is None:
            if session not in self._orphan_calls and not self._stopping:
                self._orphan_calls[session] = self.reactor.callLater(
                    self._classify_timeout, self._file_orphan, session
                )
            return
        await self._file(session)

    def _file_orphan(self, session: Session) -> None:
        self._orphan_calls.pop(session, None)
        if not session.closing and not session.has_main:
            d = Deferred.fromCoroutine(self._file(session))
            d.addErrback(lambda f: self.log.failure("filing {name}", f, name=session.name))

    def _too_slow(self, session: Session, rate: float) -> None:
        reason = (
            f"the source sent {rate:.0f} bytes/s over {self.limits.rate_window:g} s, "
            f"below the minimum of {self.limits.min_rate} (min-rate)"
        )
        self.log.warn("session {name}: {reason}; stopping it", name=session.name, reason=reason)
        session.stop(reason)

    async def _file(self, session: Session) -> None:
        session.closing = True
        rate = self._rates.pop(session, None)
        if rate is not None:
            rate.stop()
        call = self._orphan_calls.pop(session, None)
        if call is not None and call.active():
            call.cancel()
        if session in self._open:
            self._open.remove(session)
        if not self._open:
            self._cancel_disk_timer()
        try:
            path = await session.close()
            status = session.status
        except Exception as e:
            path, status = session.tmp_dir, SessionStatus.INCOMPLETE
            self.log.error(
                "session {name}: cannot write its manifest ({error}); left as {path}, "
                "filed as incomplete at the next start",
                name=session.name,
                error=e,
                path=str(path),
            )
        self.sessions_done.append((path, status))
        waiters, self._filed_waiters = self._filed_waiters, []
        for d in waiters:
            d.callback((path, status))
        log = self.log.info if status == SessionStatus.COMPLETE else self.log.warn
        log(
            "session {name}: {status}{reason} ({bytes} bytes) -> {path}",
            name=session.name,
            status=status,
            reason=f" ({session.reason})" if session.reason else "",
            bytes=sum(c.bytes for c in session.channels),
            path=str(path),
        )

    async def _pump(
        self,
        session: Session,
        raw: Channel,
        channel: Channel,
        sink: ChannelSink,
        filename: str,
        first: bytes,
        peer: str,
    ) -> None:
        """Copy the channel into its sink until EOF or error, with backpressure."""
        error: str | None = None
        clean_eof = False
        session.live.add(raw)
        timeout = self.limits.idle_timeout

        def on_idle() -> None:
            nonlocal error
            error = f"no data for {timeout:g} s (idle-timeout)"
            self.log.warn(
                "session {name}: {file} from {peer}: {error}; stopping the session",
                name=session.name,
                file=filename,
                peer=peer,
                error=error,
            )
            session.stop(f"{filename}: {error}")

        def on_sink_error(e: BaseException) -> None:
            nonlocal error
            if error is None:
                error = f"recording failed: {e}"
            session.stop(f"{filename}: {error}")

        sink.on_error = on_sink_error
        watchdog = IdleWatchdog(self.reactor, timeout, on_idle).start()
        sink.write(first)
        try:
            if session.stop_reason is not None:  # stopped while this channel joined
                raw.close()
            in_turn = 0  # bytes taken since the reactor last ran anything else
            while True:
                pending = channel.read(READ_SIZE)
                if not pending.called:
                    in_turn = 0  # this read waits for the reactor anyway
                data = await pending
                if not data:
                    clean_eof = True
                    break
                watchdog.touch()
                rate = self._rates.get(session)
                if rate is not None:
                    rate.add(len(data))
                sink.write(data)
                in_turn += len(data)
                if in_turn >= READ_SIZE:
                    # Yield: with a backlog buffered (say, after the disk
                    # caught up), a TLS channel would otherwise decrypt all
                    # of it in this reactor turn.
                    in_turn = 0
                    await deferLater(self.reactor, 0)
                drained = sink.drained()
                if not drained.called:
                    watchdog.busy = True  # waiting for our disk, not for the source
                    try:
                        await drained
                    finally:
                        watchdog.busy = False
                if sink.error is not None:
                    break  # on_sink_error stopped the session
        except ChannelError as e:
            # A channel we closed (session stopped) has nothing to add: the
            # session's stop reason says why.
            if error is None and session.stop_reason is None:
                error = str(e)
                # A reset channel dooms the migration (QEMU fails it whole), yet
                # a 7.2 source keeps its main channel open after failing: stop
                # the session now rather than wait for the idle timeout.
                others = len(session.live) - 1
                if session.stop(f"{filename}: {error}") and others:
                    self.log.warn(
                        "session {name}: {file} from {peer}: {error}; stopping the session",
                        name=session.name,
                        file=filename,
                        peer=peer,
                        error=error,
                    )
        finally:
            watchdog.stop()
            session.live.discard(raw)
            try:
                await sink.finish(eof=clean_eof)
            except Exception as e:
                error = error or f"cannot close the file: {e}"
            await channel.close()
            if channel is not raw:
                await raw.close()
            session.channel_ended(filename, error)

    # -- free space -----------------------------------------------------------------------

    def _ensure_disk_timer(self) -> None:
        interval = self.limits.disk_check_interval
        if (
            self._disk_call is None
            and self._disk_checking is None
            and self.free_space.minimum
            and interval
            and self._open
            and not self._stopping
        ):
            self._disk_call = self.reactor.callLater(interval, self._disk_tick)

    def _cancel_disk_timer(self) -> None:
        if self._disk_call is not None and self._disk_call.active():
            self._disk_call.cancel()
        self._disk_call = None

    def _disk_tick(self) -> None:
        self._disk_call = None
        if not self._open or self._stopping:
            return
        d = Deferred.fromCoroutine(self._check_disk())
        self._disk_checking = d

        def done(_: object) -> None:
            self._disk_checking = None
            self._ensure_disk_timer()

        d.addErrback(lambda f: self.log.failure("free-space check", f))
        d.addBoth(done)

    async def _check_disk(self) -> None:
        reason = await self.free_space.check()
        if reason is None:
            return
        running = [s for s in self._open if s.stop_reason is None]
        if not reason.startswith(DISK_FULL):
            # The check itself failed (statvfs raised or hung): say so, and go
            # on; the next session's start check refuses it if this persists.
            self.log.warn("{reason}", reason=reason)
            return
        if running:
            self.log.error(
                "{reason}: stopping {n} session(s): {names}",
                reason=reason,
                n=len(running),
                names=", ".join(s.name for s in running),
            )
        for session in running:
            session.stop(reason)


def _is_timeout(e: BaseException) -> bool:
    from twisted.internet.defer import TimeoutError as DeferredTimeout

    return isinstance(e, DeferredTimeout | TimeoutError)


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
