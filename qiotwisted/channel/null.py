"""NullChannel: QEMU's QIOChannelNull, a sink that swallows writes and reads EOF.

Useful where an API wants a channel but the data should go nowhere (QEMU uses
it to discard a migration stream).

Thread contract: reactor thread only, like every channel.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from ._base import Buffer, Channel, Condition, WouldBlock

__all__ = ["NullChannel"]


class NullChannel(Channel):
    """Writes are discarded and report their full length; reads return ``b""`` (EOF).

    The channel is always ready: a watch fires on the next reactor turn with
    ``(IN | OUT) & condition``.  (QEMU's null watch hands the callback the
    whole requested condition, HUP/ERR bits included; here a watch asking only
    for HUP or ERR never fires, since neither ever holds.)  ``seek`` succeeds
    and returns 0, as in QEMU.  After :meth:`close`, reads and writes raise
    :class:`~qiotwisted.errors.ChannelClosedError` ("Channel is closed").
    """

    def __init__(self, *, reactor: IReactorTime | None = None, name: str | None = None) -> None:
        super().__init__(reactor=reactor, name=name)
        self.log.debug(
            "qio_channel_null_new ioc={ioc!r} thread={thread}",
            ioc=self,
            thread=threading.get_ident(),
        )

    @classmethod
    def new(cls, *, reactor: IReactorTime | None = None, name: str | None = None) -> NullChannel:
        """``qio_channel_null_new``: the same as calling the class."""
        return cls(reactor=reactor, name=name)

    def _io_read(self, nbytes: int, *, peek: bool = False) -> bytes | WouldBlock:
        return b""

    def _io_write(self, chunks: Sequence[Buffer], fds: Sequence[int]) -> int | WouldBlock:
        return sum(len(c) for c in chunks)

    def _io_condition(self) -> Condition:
        return Condition.IN | Condition.OUT

    def _io_seek(self, offset: int, whence: int) -> int:
        return 0

    def _io_close(self) -> Deferred[None] | None:
        return None
