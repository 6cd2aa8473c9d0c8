"""Channels: QEMU's QIOChannel family on Twisted.  See :mod:`qiotwisted.channel._base`."""

from .._address import (
    FdSocketAddress,
    InetSocketAddress,
    SocketAddress,
    UnixSocketAddress,
    parse_address,
    port_of,
)
from ._base import WOULD_BLOCK, Channel, Condition, Feature, Shutdown, Watch, WouldBlock
from .buffer import BufferChannel
from .command import CommandChannel, CommandExit
from .file import FileChannel, FileMode
from .null import NullChannel
from .pipe import PipeChannel, pipe_pair
from .socket import MAX_FDS, SocketChannel, SocketProtocol
from .tls import DEFAULT_HANDSHAKE_TIMEOUT, TLSChannel, TLSHandshakeError
from .util import channel_new_fd
from .websock import HandshakeError, WebsockChannel, WebsockProtocolError

__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "MAX_FDS",
    "WOULD_BLOCK",
    "BufferChannel",
    "Channel",
    "CommandChannel",
    "CommandExit",
    "Condition",
    "FdSocketAddress",
    "Feature",
    "FileChannel",
    "FileMode",
    "HandshakeError",
    "InetSocketAddress",
    "NullChannel",
    "PipeChannel",
    "Shutdown",
    "SocketAddress",
    "SocketChannel",
    "SocketProtocol",
    "TLSChannel",
    "TLSHandshakeError",
    "UnixSocketAddress",
    "Watch",
    "WebsockChannel",
    "WebsockProtocolError",
    "WouldBlock",
    "channel_new_fd",
    "parse_address",
    "pipe_pair",
    "port_of",
]
