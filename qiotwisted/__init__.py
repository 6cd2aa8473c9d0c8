"""qiotwisted: QEMU's I/O layer on Twisted, and QEMU live-migration endpoints."""

from .channel import Channel, Condition, Feature, Shutdown, SocketChannel
from .errors import ChannelEOFError, ChannelError, QIOError, TaskCancelledError

__all__ = [
    "Channel",
    "ChannelEOFError",
    "ChannelError",
    "Condition",
    "Feature",
    "QIOError",
    "Shutdown",
    "SocketChannel",
    "TaskCancelledError",
]
