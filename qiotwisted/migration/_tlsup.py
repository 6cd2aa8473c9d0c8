"""Channel upgrades to TLS for the migration services, with credentials loaded off the reactor.

:class:`TLSUpgrade` is a callable ``channel -> Deferred[TLSChannel]`` (handshaken).
Its credentials are loaded as a Task in a worker thread when :meth:`start` is
called (at service start); upgrades requested before the load finished wait for
it.  A load failure fails every upgrade with the loader's message.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from ..channel import Channel

__all__ = ["TLSUpgrade"]


class TLSUpgrade:
    log = Logger()

    def __init__(
        self,
        directory: Path,
        *,
        endpoint: str,
        verify_peer: bool = True,
        priority: str | None = None,
        hostname: str | None = None,
        authz_globs: Sequence[str] = (),
        handshake_timeout: float | None = 10.0,
        reactor: Any = None,
    ) -> None:
        self.directory = Path(directory)
        self.endpoint = endpoint
        self.verify_peer = verify_peer
        self.priority = priority
        self.hostname = hostname
        self.handshake_timeout = handshake_timeout
        self._reactor = reactor
        self._creds: Any = None
        self._error: BaseException | None = None
        self._waiters: list[Deferred[None]] = []
        self._started = False
        self.authz: Any = None
        if authz_globs:
            from ..crypto import AuthzList, AuthzRule, Format, Policy

            self.authz = AuthzList(
                [AuthzRule(g, Policy.ALLOW, Format.GLOB) for g in authz_globs], policy=Policy.DENY
            )

    def start(self) -> Deferred[Any]:
        """Load the credentials (a Task in a worker thread); fires with them."""
        from ..crypto import TLSCreds

        self._started = True
        d: Deferred[Any] = TLSCreds.load(
            self.directory,
            endpoint=self.endpoint,
            verify_peer=self.verify_peer,
            priority=self.priority,
            reactor=self._reactor,
        ).deferred

        def loaded(creds: Any) -> Any:
            self._creds = creds
            self._wake()
            return creds

        def failed(f: Any) -> Any:
            self._error = f.value
            self._wake()
            return f

        return d.addCallbacks(loaded, failed)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.callback(None)

    async def _ready(self) -> Any:
        if not self._started:
            self.start().addErrback(lambda _: None)
        if self._creds is None and self._error is None:
            waiter: Deferred[None] = Deferred()
            self._waiters.append(waiter)
            await waiter
        if self._error is not None:
            raise self._error
        return self._creds

    def __call__(self, channel: Channel) -> Deferred[Channel]:
        return Deferred.fromCoroutine(self._upgrade(channel))

    async def _upgrade(self, channel: Channel) -> Channel:
        from ..channel.tls import TLSChannel

        creds = await self._ready()
        tls: TLSChannel
        if self.endpoint == "server":
            tls = TLSChannel.new_server(
                channel, creds, self.authz, handshake_timeout=self.handshake_timeout
            )
        else:
            assert self.hostname is not None
            tls = TLSChannel.new_client(
                channel, creds, self.hostname, handshake_timeout=self.handshake_timeout
            )
        await tls.handshake().deferred
        return tls
