"""Channels: QEMU's QIOChannel family on Twisted.  See :mod:`qiotwisted.channel._base`."""

from .._address import (
    FdSocketAddress,
    InetSocketAddress,
    SocketAddress,
    UnixSocketAddress,
    parse_address,
)
from ._base import WOULD_BLOCK, Channel, Condition, Feature, Shutdown, Watch, WouldBlock
from .buffer import BufferChannel
from .socket import MAX_FDS, SocketChannel, SocketProtocol

__all__ = [
    "MAX_FDS",
    "WOULD_BLOCK",
    "BufferChannel",
    "Channel",
    "Condition",
    "FdSocketAddress",
    "Feature",
    "InetSocketAddress",
    "Shutdown",
    "SocketAddress",
    "SocketChannel",
    "SocketProtocol",
    "UnixSocketAddress",
    "Watch",
    "WouldBlock",
    "parse_address",
]
