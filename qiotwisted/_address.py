"""Socket addresses as QEMU writes them (``qapi/sockets.json``'s ``SocketAddress``).

:func:`parse_address` turns the strings QEMU accepts on its command line into
small frozen dataclasses, and ``str()`` turns them back:

=====================  ======================================================
``tcp:HOST:PORT``      :class:`InetSocketAddress` (``tcp:`` is optional)
``HOST:PORT``          same; an empty HOST means every interface
``[::1]:PORT``         same, an IPv6 literal in brackets
``...,ipv4=on``        QEMU's ``ipv4``/``ipv6`` options restrict the family
``unix:PATH``          :class:`UnixSocketAddress`
``fd:N``               :class:`FdSocketAddress`, an already-open socket
=====================  ======================================================

Tuples are accepted too: ``(host, port)`` is an inet address; a
:class:`os.PathLike` is a UNIX path; an ``int`` is an fd.  Pure functions, no
I/O: nothing here resolves names (that happens in a worker thread, see
:meth:`qiotwisted.channel.SocketChannel.connect`).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import TypeAlias

from twisted.internet import address as _taddress

__all__ = [
    "AddressLike",
    "FdSocketAddress",
    "InetSocketAddress",
    "SocketAddress",
    "UnixSocketAddress",
    "from_sockaddr",
    "from_twisted",
    "parse_address",
    "port_of",
]


@dataclass(frozen=True)
class InetSocketAddress:
    """A TCP address: *host* is a name, an IPv4/IPv6 literal, or ``""`` for every interface.

    *ipv4*/*ipv6* are QEMU's options: ``None`` lets both families through,
    ``False`` excludes one, ``True`` asks for it (and, alone, excludes the other).
    """

    host: str
    port: int
    ipv4: bool | None = None
    ipv6: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"Port '{self.port}' out of range")
        if self.ipv4 is False and self.ipv6 is False:
            raise ValueError("Cannot disable IPv4 and IPv6 at the same time")

    @property
    def families(self) -> tuple[socket.AddressFamily, ...]:
        """The address families this address may use, in QEMU's preference order."""
        if self.ipv4 and not self.ipv6:
            return (socket.AF_INET,)
        if self.ipv6 and not self.ipv4:
            return (socket.AF_INET6,)
        fams: list[socket.AddressFamily] = []
        if self.ipv6 is not False:
            fams.append(socket.AF_INET6)
        if self.ipv4 is not False:
            fams.append(socket.AF_INET)
        return tuple(fams)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        opts = ""
        if self.ipv4 is not None:
            opts += ",ipv4=" + ("on" if self.ipv4 else "off")
        if self.ipv6 is not None:
            opts += ",ipv6=" + ("on" if self.ipv6 else "off")
        return f"{host}:{self.port}{opts}"


@dataclass(frozen=True)
class UnixSocketAddress:
    """A UNIX-domain stream socket at *path* (a leading NUL means Linux's abstract namespace)."""

    path: str

    @property
    def in_filesystem(self) -> bool:
        return bool(self.path) and not self.path.startswith("\0")

    def __str__(self) -> str:
        return f"unix:{self.path}"


@dataclass(frozen=True)
class FdSocketAddress:
    """An already-open socket, by file descriptor number."""

    fd: int

    def __post_init__(self) -> None:
        if not isinstance(self.fd, int) or self.fd < 0:
            raise ValueError(f"Invalid file descriptor number '{self.fd}'")

    def __str__(self) -> str:
        return f"fd:{self.fd}"


SocketAddress: TypeAlias = InetSocketAddress | UnixSocketAddress | FdSocketAddress
AddressLike: TypeAlias = "str | tuple[str, int] | int | os.PathLike[str] | SocketAddress"

_BOOL_WORDS = {"on": True, "yes": True, "true": True, "off": False, "no": False, "false": False}


def parse_address(spec: AddressLike) -> SocketAddress:
    """Parse a QEMU-style address (see the module docstring); raise ValueError with QEMU's words."""
    if isinstance(spec, InetSocketAddress | UnixSocketAddress | FdSocketAddress):
        return spec
    if isinstance(spec, tuple):
        if len(spec) < 2 or not isinstance(spec[0], str) or not isinstance(spec[1], int):
            raise ValueError(f"error parsing address {spec!r}: expected (host, port)")
        return InetSocketAddress(spec[0], spec[1])
    if isinstance(spec, bool):
        raise ValueError(f"error parsing address {spec!r}")
    if isinstance(spec, int):
        return FdSocketAddress(spec)
    if isinstance(spec, os.PathLike):
        return UnixSocketAddress(os.fspath(spec))
    if not isinstance(spec, str):
        raise ValueError(f"error parsing address {spec!r}")
    if spec.startswith("unix:"):
        path = spec[len("unix:") :]
        if not path:
            raise ValueError(f"error parsing address '{spec}': empty UNIX socket path")
        return UnixSocketAddress(path)
    if spec.startswith("fd:"):
        text = spec[len("fd:") :]
        if not text.isdigit():
            # QEMU also accepts a monitor fd *name* here; there is no monitor in this process.
            raise ValueError(f"error parsing address '{spec}': fd must be a number")
        return FdSocketAddress(int(text))
    if spec.startswith("tcp:"):
        return _parse_inet(spec[len("tcp:") :], spec)
    if spec.startswith("vsock:"):
        raise ValueError(f"error parsing address '{spec}': vsock is not supported")
    return _parse_inet(spec, spec)


def _parse_inet(text: str, spec: str) -> InetSocketAddress:
    head, *opts = text.split(",")
    if head.startswith("["):
        end = head.find("]")
        if end < 0 or head[end + 1 : end + 2] != ":":
            raise ValueError(f"error parsing IPv6 address '{spec}'")
        host, port_text = head[1:end], head[end + 2 :]
    else:
        host, sep, port_text = head.rpartition(":")
        if not sep:
            raise ValueError(f"error parsing address '{spec}': missing ':PORT'")
        if ":" in host:
            raise ValueError(f"error parsing address '{spec}': put an IPv6 host in [brackets]")
    if not port_text.isdigit():
        raise ValueError(f"error parsing port in address '{spec}'")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"Port '{port}' out of range in address '{spec}'")
    flags: dict[str, bool] = {}
    for opt in opts:
        key, eq, value = opt.partition("=")
        if key not in ("ipv4", "ipv6"):
            raise ValueError(f"error parsing address '{spec}': unsupported option '{key}'")
        if not eq:
            flags[key] = True
        elif value.lower() in _BOOL_WORDS:
            flags[key] = _BOOL_WORDS[value.lower()]
        else:
            raise ValueError(f"error parsing address '{spec}': '{key}' takes on/off")
    return InetSocketAddress(host, port, flags.get("ipv4"), flags.get("ipv6"))


def from_sockaddr(family: int, sockaddr: object) -> SocketAddress:
    """The address of a socket as ``getsockname``/``getpeername`` report it."""
    if family == socket.AF_UNIX:
        name = sockaddr if isinstance(sockaddr, str | bytes) else ""
        return UnixSocketAddress(os.fsdecode(name))
    if family in (socket.AF_INET, socket.AF_INET6) and isinstance(sockaddr, tuple):
        return InetSocketAddress(str(sockaddr[0]), int(sockaddr[1]))
    raise ValueError(f"Unsupported socket family {family} for address {sockaddr!r}")


def from_twisted(addr: object) -> SocketAddress:
    """Convert a Twisted ``IAddress`` (IPv4Address, IPv6Address, UNIXAddress)."""
    if isinstance(addr, _taddress.IPv4Address | _taddress.IPv6Address):
        return InetSocketAddress(addr.host, addr.port)
    if isinstance(addr, _taddress.UNIXAddress):
        return UnixSocketAddress(os.fsdecode(addr.name or b""))
    raise ValueError(f"Unsupported address {addr!r}")


def port_of(address: object) -> int:
    """The TCP port of *address*: a Twisted ``IPv4Address``/``IPv6Address`` (what
    :meth:`NetListener.open <qiotwisted.NetListener.open>` returns) or an
    :class:`InetSocketAddress` (what ``SocketChannel.get_local_address()`` returns).

    Raises :class:`ValueError` for an address without a port (UNIX, fd), so a
    caller learns the port of a ``tcp:0`` listener without casting.
    """
    port = getattr(address, "port", None)
    if not isinstance(port, int):
        raise ValueError(f"{address!r} has no TCP port")
    return port
