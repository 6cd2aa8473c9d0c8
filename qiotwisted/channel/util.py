"""``channel_new_fd``: QEMU's ``qio_channel_new_fd`` (``io/channel-util.c``)."""

from __future__ import annotations

import os
import stat
from typing import Any

from twisted.internet.interfaces import IReactorTime

from ..errors import ChannelError
from ._base import Channel

__all__ = ["channel_new_fd", "fd_is_socket"]


def fd_is_socket(fd: int) -> bool:
    """True if *fd* is a socket (QEMU asks ``getsockopt(SO_TYPE)``; ``fstat`` says the same)."""
    try:
        return stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError as e:
        raise ChannelError(f"Unable to stat FD {fd}: {e.strerror}") from e


def channel_new_fd(
    fd: int,
    *,
    reactor: IReactorTime | None = None,
    worker: Any = None,
    name: str | None = None,
) -> Channel:
    """Wrap *fd* in the channel type that fits it, taking ownership of *fd*.

    A socket becomes a :class:`~qiotwisted.channel.socket.SocketChannel`
    (``SocketChannel.new_fd``), anything else a
    :class:`~qiotwisted.channel.file.FileChannel`.  *worker* is passed to the
    file channel only (the pool that runs its regular-file I/O).  On error
    :class:`~qiotwisted.errors.ChannelError` is raised and *fd* is left open,
    as QEMU leaves it to the caller on failure.

    Thread contract: reactor thread.
    """
    if fd_is_socket(fd):
        from .socket import SocketChannel

        return SocketChannel.new_fd(fd, reactor=reactor, name=name)
    from .file import FileChannel

    return FileChannel.new_fd(fd, reactor=reactor, worker=worker, name=name)
