"""PipeChannel: two channels connected back to back in memory, with backpressure.

``a, b = pipe_pair()`` gives a full-duplex pair: bytes written to ``a`` are read
from ``b`` and the other way round.  Each direction holds at most *capacity*
bytes; a write that finds its direction full accepts a prefix or returns
WOULD_BLOCK, so a slow reader slows the writer down exactly as a socket would.
``close()`` or ``shutdown(Shutdown.WRITE)`` on one end is EOF for the other.

Used by the proxy to tap a stream into the recorder, and by tests that want a
connected pair without sockets.  Thread contract: reactor thread only.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from ..errors import ChannelError
from ._base import WOULD_BLOCK, Buffer, Channel, Condition, Feature, Shutdown, WouldBlock

__all__ = ["DEFAULT_CAPACITY", "PipeChannel", "pipe_pair"]

DEFAULT_CAPACITY = 4 * 1024 * 1024


class _Direction:
    """One way of the pipe: a bounded queue of chunks and an end-of-stream flag."""

    __slots__ = ("capacity", "chunks", "eof", "size")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.chunks: deque[bytes] = deque()
        self.size = 0
        self.eof = False


class PipeChannel(Channel):
    """One end of a :func:`pipe_pair`."""

    def __init__(
        self,
        incoming: _Direction,
        outgoing: _Direction,
        *,
        reactor: IReactorTime | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(reactor=reactor, name=name)
        self.features = Feature.SHUTDOWN
        self._in = incoming
        self._out = outgoing
        self.peer: PipeChannel | None = None
        #: What the other side of the pipe stands for (e.g. the socket a proxy taps).
        self.remote_address: Any = None
        self.local_address: Any = None

    def _io_condition(self) -> Condition:
        cond = Condition(0)
        if self._in.size or self._in.eof:
            cond |= Condition.IN
        peer_gone = self.peer is None or self.peer.closed
        if peer_gone:
            cond |= Condition.HUP
        elif not self._out.eof and self._out.size < self._out.capacity:
            cond |= Condition.OUT
        return cond

    def _io_read(self, nbytes: int, *, peek: bool = False) -> bytes | WouldBlock:
        d = self._in
        if not d.size:
            return b"" if d.eof else WOULD_BLOCK
        parts: list[bytes] = []
        want = nbytes
        for chunk in d.chunks:
            if len(chunk) >= want:
                parts.append(chunk[:want])
                want = 0
                break
            parts.append(chunk)
            want -= len(chunk)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        if not peek:
            left = len(data)
            while left:
                head = d.chunks[0]
                if len(head) <= left:
                    d.chunks.popleft()
                    left -= len(head)
                else:
                    d.chunks[0] = head[left:]
                    left = 0
            d.size -= len(data)
            if self.peer is not None:
                self.peer._ready_changed()  # room for the writer
        return data

    def _io_write(self, chunks: Sequence[Buffer], fds: Sequence[int]) -> int | WouldBlock:
        d = self._out
        if d.eof:
            raise ChannelError("Unable to write to pipe: Broken pipe")
        if self.peer is None or self.peer.closed:
            raise ChannelError("Unable to write to pipe: the other end is closed")
        room = d.capacity - d.size
        if room <= 0:
            return WOULD_BLOCK
        taken = 0
        for c in chunks:
            if taken >= room:
                break
            b = bytes(c[: room - taken]) if len(c) > room - taken else bytes(c)
            if b:
                d.chunks.append(b)
                taken += len(b)
        d.size += taken
        self.peer._ready_changed()
        return taken

    def _io_shutdown(self, how: Shutdown) -> None:
        if how & Shutdown.WRITE and not self._out.eof:
            self._out.eof = True
            if self.peer is not None:
                self.peer._ready_changed()
        if how & Shutdown.READ:
            self._in.eof = True
            self._in.chunks.clear()
            self._in.size = 0

    def _io_close(self) -> Deferred[None] | None:
        self._out.eof = True
        if self.peer is not None and not self.peer.closed:
            self.peer._ready_changed()
        return None


def pipe_pair(
    *,
    capacity: int = DEFAULT_CAPACITY,
    reactor: IReactorTime | None = None,
    names: tuple[str | None, str | None] = (None, None),
) -> tuple[PipeChannel, PipeChannel]:
    """Two connected :class:`PipeChannel` ends, each direction bounded by *capacity* bytes."""
    if capacity <= 0:
        raise ValueError("capacity must be positive")
    a_to_b, b_to_a = _Direction(capacity), _Direction(capacity)
    a = PipeChannel(b_to_a, a_to_b, reactor=reactor, name=names[0])
    b = PipeChannel(a_to_b, b_to_a, reactor=reactor, name=names[1])
    a.peer, b.peer = b, a
    return a, b
