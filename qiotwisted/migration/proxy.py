"""The migration proxy behind ``twistd qio proxy``.

Every channel a QEMU source opens is forwarded over its own upstream
connection to a QEMU destination, bytes both ways (QEMU may use a return
path), each direction with backpressure: a read is only followed by the next
once the write it fed has been accepted.  TLS can be terminated on either side
independently, and ``--record`` taps the source's bytes into a recorder.

Order matters to a QEMU 7.2 destination, which does not peek and takes the
first connection (with TLS: the first finished handshake) as its main channel
(``qemu-interop.md`` trap 3).  So upstream connections are opened strictly in
the order the source's connections were accepted, one after another, and the
multifd ones only after main has written its first bytes upstream.

The proxy never writes to the source on its own; the only bytes that go back
are the destination's.  Thread contract: reactor thread only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.logger import Logger

from .._address import AddressLike
from .._pool import WorkerPool
from ..channel import Channel, Shutdown, SocketChannel
from ..channel.pipe import pipe_pair
from .recorder import Recorder

__all__ = ["Proxy"]

READ_SIZE = 1024 * 1024
Upgrade = Callable[[Channel], Deferred[Channel]]


class _Group:
    """The connections of one migration, as accepted: index 0 is main."""

    def __init__(self) -> None:
        self.count = 0
        self.live = 0
        self.last_ready: Deferred[None] = succeed(None)
        self.main_started: Deferred[None] = Deferred()


class Proxy:
    """Forwards migrations to *to*; plug :meth:`client_func` into a NetListener.

    :param server_tls: turns an accepted channel into a handshaken TLS channel
        (TLS from the source), or None for plain.
    :param client_tls: the same for upstream channels (TLS to the destination).
    :param recorder: also files each migration as a session while it passes.
    """

    log = Logger()

    def __init__(
        self,
        to: AddressLike,
        *,
        server_tls: Upgrade | None = None,
        client_tls: Upgrade | None = None,
        recorder: Recorder | None = None,
        reactor: Any = None,
        pool: WorkerPool | None = None,
    ) -> None:
        self.to = to
        self._server_tls = server_tls
        self._client_tls = client_tls
        self.recorder = recorder
        self._reactor = reactor
        self._pool = pool
        self._group = _Group()
        self._channels: set[Channel] = set()
        self._active: set[Deferred[None]] = set()
        self.forwarded: list[tuple[str, int, str | None]] = []  # (peer, bytes, error)

    @property
    def reactor(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    def client_func(self, listener: object, channel: Channel, data: object = None) -> None:
        group = self._group
        index = group.count
        group.count += 1
        group.live += 1
        previous = group.last_ready
        ready: Deferred[None] = Deferred()
        group.last_ready = ready
        self._channels.add(channel)
        d = Deferred.fromCoroutine(self._handle(group, index, channel, previous, ready))
        self._active.add(d)
        d.addErrback(lambda f: self.log.failure("proxying {channel!r} failed", f, channel=channel))

        def done(_: object) -> None:
            self._active.discard(d)
            self._channels.discard(channel)
            group.live -= 1
            if group.live == 0 and self._group is group:
                self._group = _Group()  # the next connection starts a new migration

        d.addBoth(done)

    async def _handle(
        self,
        group: _Group,
        index: int,
        incoming: Channel,
        previous: Deferred[None],
        ready: Deferred[None],
    ) -> None:
        peer = _peer(incoming)
        what = "main" if index == 0 else f"channel {index}"
        upstream: Channel | None = None
        try:
            if self._server_tls is not None:
                try:
                    incoming = await self._server_tls(incoming)
                except Exception as e:
                    self.log.warn(
                        "{peer} ({what}): TLS from the source failed: {error}",
                        peer=peer,
                        what=what,
                        error=e,
                    )
                    await incoming.close()
                    return
                self._channels.add(incoming)
            await _settled(previous)
            if index > 0:
                await _settled(group.main_started)
            try:
                upstream = await self._connect()
            except Exception as e:
                self.log.warn(
                    "{peer} ({what}): cannot reach the destination {to}: {error}; "
                    "closing the source side",
                    peer=peer,
                    what=what,
                    to=str(self.to),
                    error=e,
                )
                _abort(incoming)
                return
            finally:
                ready.callback(None)
            self._channels.add(upstream)
            self.log.info("{peer} ({what}) -> {to}", peer=peer, what=what, to=str(self.to))
            tap = self._tap(incoming) if self.recorder is not None else None
            on_first = group.main_started if index == 0 else None
            await self._run_pair(peer, what, incoming, upstream, tap, on_first)
        finally:
            if index == 0 and not group.main_started.called:
                group.main_started.callback(None)

    def _connect(self) -> Deferred[Channel]:
        d: Deferred[Any] = SocketChannel.connect(
            self.to, reactor=self.reactor, pool=self._pool
        ).deferred
        if self._client_tls is not None:
            d.addCallback(self._client_tls)
        return d

    def _tap(self, incoming: Channel) -> Channel:
        assert self.recorder is not None
        ours, theirs = pipe_pair(reactor=self.reactor, names=("proxy-tap", "recorder-tap"))
        theirs.remote_address = getattr(incoming, "remote_address", None)
        self.recorder.client_func(None, theirs)
        return ours

    async def _run_pair(
        self,
        peer: str,
        what: str,
        incoming: Channel,
        upstream: Channel,
        tap: Channel | None,
        on_first: Deferred[None] | None,
    ) -> None:
        errors: list[str] = []
        forward = Deferred.fromCoroutine(
            self._copy(incoming, upstream, tap, on_first, errors, "source", "destination")
        )
        back = Deferred.fromCoroutine(
            self._copy(upstream, incoming, None, None, errors, "destination", "source")
        )

        def stop_other(result: object) -> object:
            # When either direction fails, both sides are closed.
            if errors:
                _abort(upstream)
                _abort(incoming)
            return result

        forward.addBoth(stop_other)
        back.addBoth(stop_other)
        sent = await forward
        if errors:
            await back
        else:
            await _finish(upstream)
            await back
        await incoming.close()
        await upstream.close()
        if tap is not None:
            await tap.close()
        self.forwarded.append((peer, sent, errors[0] if errors else None))
        if errors:
            self.log.warn("{peer} ({what}): {error}", peer=peer, what=what, error=errors[0])
        else:
            self.log.info("{peer} ({what}): done", peer=peer, what=what)

    async def _copy(
        self,
        src: Channel,
        dst: Channel,
        tap: Channel | None,
        on_first: Deferred[None] | None,
        errors: list[str],
        src_name: str,
        dst_name: str,
    ) -> int:
        total = 0
        while True:
            try:
                data = await src.read(READ_SIZE)
            except Exception as e:
                if not errors and not src.closed:
                    errors.append(f"{src_name} failed: {e}")
                return total
            if not data:
                return total
            try:
                await dst.write_all(data)
            except Exception as e:
                if not errors:
                    errors.append(f"{dst_name} failed: {e}")
                return total
            total += len(data)
            if on_first is not None and not on_first.called:
                on_first.callback(None)
            if tap is not None:
                try:
                    await tap.write_all(data)
                except Exception as e:
                    self.log.warn("recording tap failed, forwarding goes on: {error}", error=e)
                    tap = None

    def stop(self) -> Deferred[None]:
        """Abort every proxied connection (service shutdown)."""
        for channel in list(self._channels):
            _abort(channel)
        return DeferredList(list(self._active), consumeErrors=True).addCallback(lambda _: None)


async def _settled(d: Deferred[None]) -> None:
    """Wait for *d* to fire without consuming its result (several waiters share it)."""
    if d.called:
        return
    waiter: Deferred[None] = Deferred()

    def relay(result: object) -> object:
        waiter.callback(None)
        return result

    d.addBoth(relay)
    await waiter


async def _finish(channel: Channel) -> None:
    """End the stream toward *channel*: close_notify for TLS, then half-close.

    Errors are logged, not raised: the peer may already be gone, and the
    caller closes the channel either way.
    """
    bye = getattr(channel, "bye", None)
    try:
        if bye is not None:
            await bye()
        channel.shutdown(Shutdown.WRITE)
    except Exception as e:
        Proxy.log.debug("ending the stream to {channel!r}: {error}", channel=channel, error=e)


def _abort(channel: Channel) -> None:
    abort = getattr(channel, "abort", None)
    if abort is not None:
        abort()
    else:
        channel.close()


def _peer(channel: Channel) -> str:
    addr: Any = getattr(channel, "remote_address", None)
    host = getattr(addr, "host", None)
    return f"{host}:{addr.port}" if host is not None else repr(addr)
