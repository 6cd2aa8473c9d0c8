"""BufferChannel: QEMU's QIOChannelBuffer, a growable in-memory byte buffer.

Reads copy from :attr:`~BufferChannel.offset` up to :attr:`~BufferChannel.usage`
(``b""`` at the end: EOF); writes store at ``offset``, zero-filling any gap past
``usage``, and advance both.  The channel is always ready, so its watches fire
on every reactor turn with ``(IN | OUT) & condition``.  It has ``SEEKABLE``;
no fd passing, no shutdown.

Differences from QEMU, on purpose:

* QEMU's ``writev`` appends at ``usage`` whatever ``offset`` says and
  zero-fills from the start of the buffer instead of from ``usage`` when
  ``offset > usage``; the two agree whenever ``offset == usage`` (how QEMU
  uses it).  Here a write goes at ``offset`` and the gap ``usage..offset``
  is zero-filled, which is what the header comment describes.
* QEMU's ``seek`` ignores *whence*; here SEEK_SET, SEEK_CUR and SEEK_END work.

Thread contract: reactor thread only, like every channel.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from ..errors import ChannelError
from ._base import Buffer, Channel, Condition, Feature, WouldBlock

__all__ = ["BufferChannel"]


class BufferChannel(Channel):
    """An in-memory channel over a growable buffer (``qio_channel_buffer_new``).

    :param capacity: bytes to reserve up front (QEMU allocates them; Python's
        ``bytearray`` grows by itself, so this only sets :attr:`capacity`'s floor).
    """

    def __init__(
        self,
        capacity: int = 0,
        *,
        reactor: IReactorTime | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(reactor=reactor, name=name)
        if capacity < 0:
            raise ValueError("capacity must not be negative")
        self.features = Feature.SEEKABLE
        self._data = bytearray()
        self._capacity = capacity
        self._offset = 0

    # ---- QEMU's public fields ---------------------------------------------------------

    @property
    def data(self) -> bytearray:
        """The stored bytes (``usage`` of them).  Mutating it in place is allowed."""
        return self._data

    @property
    def usage(self) -> int:
        """Bytes of data stored."""
        return len(self._data)

    @property
    def capacity(self) -> int:
        """Bytes the buffer can hold without growing (never less than :attr:`usage`)."""
        return max(self._capacity, len(self._data))

    @property
    def offset(self) -> int:
        """Position of the next read or write; may be set directly, as QEMU's tests do."""
        return self._offset

    @offset.setter
    def offset(self, value: int) -> None:
        if value < 0:
            raise ValueError("offset must not be negative")
        self._offset = value

    def getvalue(self) -> bytes:
        """A copy of the stored bytes."""
        return bytes(self._data)

    # ---- the Channel contract ---------------------------------------------------------

    def _io_read(self, nbytes: int, *, peek: bool = False) -> bytes | WouldBlock:
        start = self._offset
        end = min(start + nbytes, len(self._data))
        if start >= end:
            return b""
        with memoryview(self._data) as view:
            data = bytes(view[start:end])  # one copy; the view is released before any resize
        self._offset = end
        return data

    def _io_write(self, chunks: Sequence[Buffer], fds: Sequence[int]) -> int | WouldBlock:
        start = self._offset
        total = 0
        for c in chunks:
            total += memoryview(c).nbytes
        end = start + total
        if start > len(self._data):
            self._data.extend(bytes(start - len(self._data)))
        pos = start
        for c in chunks:
            n = memoryview(c).nbytes
            if n:
                self._data[pos : pos + n] = c
                pos += n
        self._offset = end
        self._capacity = max(self._capacity, end)
        return total

    def _io_condition(self) -> Condition:
        return Condition.IN | Condition.OUT

    def _io_seek(self, offset: int, whence: int) -> int:
        if whence == os.SEEK_SET:
            new = offset
        elif whence == os.SEEK_CUR:
            new = self._offset + offset
        elif whence == os.SEEK_END:
            new = len(self._data) + offset
        else:
            raise ChannelError(f"Invalid seek whence {whence}")
        if new < 0:
            raise ChannelError(f"Invalid seek offset {new}")
        self._offset = new
        return new

    def _io_close(self) -> Deferred[None] | None:
        # QEMU frees the data and zeroes the counters.
        self._data = bytearray()
        self._capacity = 0
        self._offset = 0
        return None
