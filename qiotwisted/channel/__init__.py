"""Channels: QEMU's QIOChannel family on Twisted.  See :mod:`qiotwisted.channel._base`."""

from ._base import WOULD_BLOCK, Channel, Condition, Feature, Shutdown, Watch, WouldBlock
from .socket import SocketChannel, SocketProtocol

__all__ = [
    "WOULD_BLOCK",
    "Channel",
    "Condition",
    "Feature",
    "Shutdown",
    "SocketChannel",
    "SocketProtocol",
    "Watch",
    "WouldBlock",
]
