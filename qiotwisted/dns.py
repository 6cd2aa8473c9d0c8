"""``Resolver``: QEMU's QIODNSResolver — ``getaddrinfo`` without blocking the reactor.

``lookup_sync`` blocks (call it in a worker thread, or where blocking is fine);
``lookup`` runs the same resolution in a worker thread as a :class:`~qiotwisted.task.Task`
whose completion, like every task's, runs in the reactor thread::

    addrs = await Resolver().lookup(("localhost", 5900))
    # [ResolvedAddress(family=AF_INET, host='127.0.0.1', port=5900),
    #  ResolvedAddress(family=AF_INET6, host='::1', port=5900)]

Addresses: a ``(host, port)`` tuple, resolved as QEMU's ``inet`` addresses are
(``AI_PASSIVE``, ``SOCK_STREAM``; an empty host means the wildcard addresses, an
empty port means 0; ``numeric=True`` adds ``AI_NUMERICHOST | AI_NUMERICSERV``),
optionally restricted to one family; or a ``str`` UNIX socket path, returned
as is (QEMU clones non-inet addresses).  Results are numeric ``(family, host,
port)`` tuples, duplicates removed, in ``getaddrinfo`` order.

One deliberate difference from QEMU: ``localhost`` (and ``*.localhost``)
always resolves to the loopback address of every requested family the host
supports, as RFC 6761 §6.3 asks, even when ``/etc/hosts`` lists only
``127.0.0.1``.  A listener on ``localhost`` thus listens on 127.0.0.1 *and* ::1.
"""

from __future__ import annotations

import socket
import threading
from typing import Any, NamedTuple, TypeAlias

from twisted.logger import Logger

from ._pool import WorkerPool
from .errors import QIOError
from .task import DestroyNotify, Task, TaskFunc

__all__ = ["Address", "ResolvedAddress", "Resolver", "ResolverError", "get_instance"]


class ResolvedAddress(NamedTuple):
    """One numeric result of a lookup."""

    family: socket.AddressFamily
    host: str
    port: int


Address: TypeAlias = tuple[str | None, int | str | None] | str
"""``(host, port)`` for an inet address, or a UNIX socket path."""


class ResolverError(QIOError):
    """The address could not be resolved; the message is QEMU's."""


_INET_FAMILIES = (socket.AF_INET, socket.AF_INET6)
_LOOPBACK = {socket.AF_INET: "127.0.0.1", socket.AF_INET6: "::1"}

_ipv6_lock = threading.Lock()
_ipv6_loopback: bool | None = None


def _has_ipv6_loopback() -> bool:
    """Whether ``::1`` can be bound here (checked once; blocking, so workers only)."""
    global _ipv6_loopback
    with _ipv6_lock:
        if _ipv6_loopback is None:
            try:
                with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
                    s.bind(("::1", 0))
                _ipv6_loopback = True
            except OSError:
                _ipv6_loopback = False
        return _ipv6_loopback


def _is_localhost(host: str) -> bool:
    name = host.rstrip(".").lower()
    return name == "localhost" or name.endswith(".localhost")


class Resolver:
    """Resolves addresses with ``getaddrinfo`` (QEMU's ``QIODNSResolver``).

    :param reactor: reactor whose default worker pool runs :meth:`lookup`.
    :param pool: a worker pool to use instead (e.g. ``qiotwisted.testing.MemoryWorkerPool``).

    Thread contract: :meth:`lookup_sync` may be called in any thread and
    blocks; :meth:`lookup` is called in the reactor thread and never blocks.
    """

    log = Logger()

    def __init__(self, *, reactor: Any = None, pool: WorkerPool | None = None) -> None:
        self._reactor = reactor
        self._pool = pool

    def lookup_sync(
        self,
        address: Address,
        family: socket.AddressFamily | int = socket.AF_UNSPEC,
        *,
        numeric: bool = False,
    ) -> list[ResolvedAddress]:
        """Resolve *address* now, blocking (``qio_dns_resolver_lookup_sync``).

        Raises :class:`ResolverError` ("host not specified", or "address
        resolution failed for HOST:PORT: REASON") and ``ValueError`` for an
        address of the wrong shape.  Never returns an empty list.
        """
        if isinstance(address, str):
            return [ResolvedAddress(socket.AF_UNIX, address, 0)]
        if not isinstance(address, tuple) or len(address) != 2:
            raise ValueError(f"expected (host, port) or a UNIX path, not {address!r}")
        family = socket.AddressFamily(family)
        if family not in (socket.AF_UNSPEC, *_INET_FAMILIES):
            raise ValueError(f"family must be AF_UNSPEC, AF_INET or AF_INET6, not {family!r}")
        host, port = address
        if host is None:
            raise ResolverError("host not specified")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]  # "[::1]" as written in URIs and QEMU's command line
        service: str | None = None if port in (None, "") else str(port)
        flags = socket.AI_PASSIVE
        if numeric:
            flags |= socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
        localhost = not numeric and _is_localhost(host)
        where = f"{host}:{'' if port is None else port}"
        try:
            infos = socket.getaddrinfo(host or None, service, family, socket.SOCK_STREAM, 0, flags)
        except socket.gaierror as exc:
            if not localhost:
                raise ResolverError(
                    f"address resolution failed for {where}: {exc.strerror}"
                ) from exc
            infos = []  # e.g. localhost with AF_INET6 and no "::1 localhost" line
        results: list[ResolvedAddress] = []
        for fam, _type, _proto, _canon, sockaddr in infos:
            if fam not in _INET_FAMILIES:
                continue
            num_host, num_port = socket.getnameinfo(
                sockaddr, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV
            )
            entry = ResolvedAddress(socket.AddressFamily(fam), num_host, int(num_port))
            if entry not in results:
                results.append(entry)
        if localhost:
            results = self._add_loopbacks(results, family, service)
        if not results:
            raise ResolverError(f"address resolution failed for {where}: no usable address")
        return results

    def _add_loopbacks(
        self, results: list[ResolvedAddress], family: socket.AddressFamily, service: str | None
    ) -> list[ResolvedAddress]:
        wanted = _INET_FAMILIES if family == socket.AF_UNSPEC else (family,)
        have = {r.family for r in results}
        for fam in wanted:
            if fam in have or (fam == socket.AF_INET6 and not _has_ipv6_loopback()):
                continue
            info = socket.getaddrinfo(
                _LOOPBACK[fam], service, fam, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST
            )
            results.append(ResolvedAddress(fam, _LOOPBACK[fam], int(info[0][4][1])))
        return results

    def lookup(
        self,
        address: Address,
        family: socket.AddressFamily | int = socket.AF_UNSPEC,
        *,
        numeric: bool = False,
        func: TaskFunc | None = None,
        opaque: Any = None,
        destroy: DestroyNotify | None = None,
    ) -> Task[list[ResolvedAddress]]:
        """Resolve *address* in a worker thread (``qio_dns_resolver_lookup_async``).

        Returns the :class:`~qiotwisted.task.Task` (source: this resolver).
        ``func(task, opaque)``, if given, runs in the reactor thread when the
        lookup ends; the result is ``task.get_result()`` (a list of
        :class:`ResolvedAddress`), a failure is ``task.propagate_error()``.
        Or just ``await`` the task.  Cancelling it drops the result (the
        ``getaddrinfo`` call itself cannot be interrupted and runs to its end).
        """
        task: Task[list[ResolvedAddress]] = Task(
            self, func, opaque, destroy, reactor=self._reactor, pool=self._pool
        )

        def worker(task: Task[Any], _opaque: Any) -> None:
            task.set_result(self.lookup_sync(address, family, numeric=numeric))

        task.run_in_thread(worker)
        return task

    @staticmethod
    def lookup_result(task: Task[list[ResolvedAddress]]) -> list[ResolvedAddress]:
        """The addresses of a finished lookup, or ``[]`` (``qio_dns_resolver_lookup_result``)."""
        return list(task.get_result() or [])

    def __repr__(self) -> str:
        return f"<Resolver {id(self):#x}>"


_instance: Resolver | None = None


def get_instance() -> Resolver:
    """The shared resolver on the global reactor (``qio_dns_resolver_get_instance``)."""
    global _instance
    if _instance is None:
        _instance = Resolver()
    return _instance
