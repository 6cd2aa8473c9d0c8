"""NetListener: QEMU's QIONetListener as a Twisted :class:`ServerFactory`.

One listener owns any number of listening sockets (one Twisted ``IListeningPort``
per address) and hands every accepted connection, as a connected
:class:`~qiotwisted.channel.SocketChannel`, to one swappable *client func*::

    listener = NetListener(name="migration-incoming")
    listener.set_client_func(on_client, data)
    await listener.open("tcp:4444:interface=localhost")   # 127.0.0.1 and ::1 if both resolve
    await listener.open("unix:/run/qemu-mig.sock")
    ...
    await listener.disconnect()

Mapping from QEMU (``io/net-listener.c``):

=====================================  =============================================
``qio_net_listener_open_sync``         :meth:`NetListener.open` (a Deferred; name
                                       resolution runs in a worker thread)
``qio_net_listener_add``               :meth:`NetListener.add` (an ``IListeningPort``)
``qio_net_listener_set_client_func``   :meth:`NetListener.set_client_func`
``qio_net_listener_wait_client``       :meth:`NetListener.wait_client` (a Deferred)
``qio_net_listener_disconnect``        :meth:`NetListener.disconnect` (a Deferred)
``qio_net_listener_is_connected``      :attr:`NetListener.connected`
G_IO_IN watch on / off                 ``port.startReading()`` / ``port.stopReading()``
=====================================  =============================================

Thread contract: every method is called in the reactor thread, and every
callback (client func, notify, Deferred callbacks) runs in the reactor thread.

QEMU's trace events ``qio_net_listener_watch``, ``qio_net_listener_unwatch``
(with ``extra`` = add / set_client_func / wait_client / disconnect) and
``qio_net_listener_callback`` are debug-level ``twisted.logger`` events whose
format starts with the event name and which carry ``event`` (the name),
``listener``, ``func``, ``extra`` and ``thread_id`` fields.  Like the
``qio_task_*`` events they are off unless tracing is on
(:func:`qiotwisted.task.set_trace_enabled` or ``QIOTWISTED_TRACE=1``).
Failures (a raising client func or notify) are always logged.
"""

from __future__ import annotations

import collections
import socket
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeAlias

from twisted.application.service import Service
from twisted.internet import abstract
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    fail,
    maybeDeferred,
    succeed,
)
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import IAddress, IListeningPort
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from .channel.socket import SocketChannel
from .dns import Resolver, get_instance
from .errors import QIOError
from .task import trace_enabled

__all__ = [
    "ClientFunc",
    "ListenError",
    "NetListener",
    "NetListenerService",
    "NotifyFunc",
]

#: ``func(listener, channel, data)``: QEMU's ``QIONetListenerClientFunc``.
ClientFunc: TypeAlias = Callable[["NetListener", SocketChannel, Any], object]
#: ``notify(data)``: QEMU's ``GDestroyNotify`` for the client func's data.
NotifyFunc: TypeAlias = Callable[[Any], object]


class ListenError(QIOError):
    """No address of an :meth:`NetListener.open` call could be listened on.

    The message carries the first error, as QEMU keeps only the first one;
    ``__cause__`` is that original exception.
    """


# Endpoint kinds whose listening address we understand, with the names of their
# positional parameters (after the kind) as Twisted's parsers define them, the
# loopback address used when no ``interface=`` is given, and the address family
# a host name is resolved in.  ``tcp:``/``ssl:`` endpoints call listenTCP, which
# takes IPv6 literals too, so a name is resolved in both families (QEMU's inet
# address without ipv4=/ipv6=); ``tcp6:``/``tls:`` mean IPv6.
_TCP_KINDS: dict[str, tuple[tuple[str, ...], str, int]] = {
    "tcp": (("port", "interface", "backlog"), "127.0.0.1", socket.AF_UNSPEC),
    "ssl": (
        (
            "port",
            "privateKey",
            "certKey",
            "sslmethod",
            "interface",
            "backlog",
            "extraCertChain",
            "dhParameters",
        ),
        "127.0.0.1",
        socket.AF_UNSPEC,
    ),
    "tcp6": (("port", "backlog", "interface"), "::1", socket.AF_INET6),
    "tls": (("path", "port", "backlog", "interface"), "::1", socket.AF_INET6),
}
_UNIX_PARAMS = ("address", "mode", "backlog", "lockfile")


def _tokenize(description: str) -> tuple[str, list[str], list[tuple[str, str]]]:
    """Split an endpoint description as Twisted's strports grammar does.

    ``:`` separates parameters, the first ``=`` of a parameter splits key from
    value, and a backslash escapes the next character.  Returns the kind, the
    positional parameters and the keyword parameters (in order).
    """
    parts: list[list[str]] = [[""]]
    chars = iter(description)
    for c in chars:
        if c == "\\":
            parts[-1][-1] += next(chars, "")
        elif c == ":":
            parts.append([""])
        elif c == "=" and len(parts[-1]) == 1:
            parts[-1].append("")
        else:
            parts[-1][-1] += c
    kind = parts[0][0] if len(parts[0]) == 1 else ""
    positional = [p[0] for p in parts[1:] if len(p) == 1]
    keywords = [(p[0], p[1]) for p in parts[1:] if len(p) == 2]
    return kind, positional, keywords


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def _build(kind: str, keywords: dict[str, str]) -> str:
    return ":".join([kind, *(f"{_escape(k)}={_escape(v)}" for k, v in keywords.items())])


def _named(kind: str, names: Sequence[str], description: str) -> dict[str, str]:
    """The parameters of *description* as one keyword dict (positional ones named)."""
    _, positional, keywords = _tokenize(description)
    if len(positional) > len(names):
        raise ValueError(f"Too many parameters in endpoint description {description!r}")
    named = dict(zip(names, positional, strict=False))
    for key, value in keywords:
        if key in named:
            raise ValueError(
                f"Parameter {key!r} given twice in endpoint description {description!r}"
            )
        named[key] = value
    return named


def _is_numeric_host(host: str) -> bool:
    return abstract.isIPAddress(host) or abstract.isIPv6Address(host)


class NetListener(ServerFactory):
    """Listen on several sockets and hand each client to one function.

    :param reactor: the reactor to listen with (default: the global one, resolved late).
    :param name: copied onto every accepted channel's :attr:`~Channel.name`.
    :param resolver: the :class:`~qiotwisted.dns.Resolver` that turns an
        ``interface=`` host name into addresses in a worker thread (default: the
        shared one, or one on *reactor* when a reactor is given).

    Lifetime of the client func's *data* (QEMU §2.3, made explicit): ``notify(data)``
    runs exactly once, in the reactor thread, when the func is replaced by
    :meth:`set_client_func` (also by ``None``) or released by :meth:`disconnect`.
    ``disconnect()`` is this class's finalisation: it releases the func, so a
    listener re-opened after it accepts nothing until ``set_client_func`` is
    called again.  A listener dropped without ``disconnect()`` never notifies
    (Python has no deterministic finaliser to hang it on).

    Delivery order: pending :meth:`wait_client` Deferreds are served first, one
    client each, in call order; then the client func.  A client accepted while
    neither exists (possible only inside one accept batch, e.g. right after the
    func was set to ``None``) is held, connected and unread, and goes to the next
    waiter or func; ``disconnect()`` closes such held clients.  QEMU drops them.
    """

    log = Logger()
    noisy = False  # Factory would log "Starting factory" for every port

    def __init__(
        self,
        *,
        reactor: Any = None,
        name: str | None = None,
        resolver: Resolver | None = None,
    ) -> None:
        self._reactor_arg = reactor
        self.name = name
        if resolver is None:
            resolver = get_instance() if reactor is None else Resolver(reactor=reactor)
        self.resolver = resolver
        self._ports: list[IListeningPort] = []
        self.connected = False
        self._func: ClientFunc | None = None
        self._data: Any = None
        self._notify: NotifyFunc | None = None
        self._waiters: collections.deque[Deferred[SocketChannel]] = collections.deque()
        self._held: collections.deque[SocketChannel] = collections.deque()
        self._drain_call: Any = None
        self._generation = 0
        self._closing: Deferred[None] | None = None

    # ---- collaborators ------------------------------------------------------------

    @property
    def reactor(self) -> Any:
        if self._reactor_arg is None:
            from twisted.internet import reactor

            self._reactor_arg = reactor
        return self._reactor_arg

    async def _resolve(self, host: str, family: int) -> list[str]:
        # QEMU resolves in open_sync, blocking; here the lookup is a Task in a
        # worker thread.  Cancelling open() cancels the task.
        found = await self.resolver.lookup((host, None), family).deferred
        return [r.host for r in found]

    # ---- state ---------------------------------------------------------------------

    def set_name(self, name: str | None) -> None:
        """QEMU's ``qio_net_listener_set_name``: the name given to accepted channels."""
        self.name = name

    @property
    def ports(self) -> tuple[IListeningPort, ...]:
        """The listening ports, in the order they were added."""
        return tuple(self._ports)

    @property
    def addresses(self) -> list[IAddress]:
        """The listening addresses (with the real port numbers where ``port=0`` was asked)."""
        return [p.getHost() for p in self._ports]

    def __repr__(self) -> str:
        return f"<NetListener {self.name or hex(id(self))} ports={len(self._ports)}>"

    def _trace(self, event: str, extra: str | None = None) -> None:
        # Off by default, like QEMU's -trace: a log event costs several
        # microseconds, a sizeable share of an accept.  One switch for the whole
        # library: qiotwisted.task.set_trace_enabled() / QIOTWISTED_TRACE=1.
        if trace_enabled():
            self.log.debug(
                "{event} listener={listener!r} func={func!r} extra={extra}",
                event=event,
                listener=self,
                func=self._func,
                extra=extra,
                thread_id=threading.get_ident(),
            )

    # ---- opening -------------------------------------------------------------------

    def open(
        self, endpoint_description: str, backlog: int | None = None
    ) -> Deferred[list[IAddress]]:
        """Listen on every address *endpoint_description* stands for (``open_sync``).

        Any Twisted server endpoint string works (``tcp:``, ``tcp6:``, ``unix:``,
        ``ssl:``, ``tls:``, ``systemd:``...).  For ``tcp:``/``tcp6:``/``ssl:``/``tls:``:

        - no ``interface=`` means loopback only (``127.0.0.1``, or ``::1`` for
          ``tcp6:``/``tls:``), not Twisted's all-interfaces default; ask for
          ``interface=0.0.0.0`` (or ``\\:\\:``, or an empty value) explicitly;
        - an ``interface=`` host name is resolved by :attr:`resolver` in a worker
          thread and each address it yields gets its own socket (``tcp:``/``ssl:``
          resolve in both families, ``tcp6:``/``tls:`` in IPv6 only; ``localhost``
          gives 127.0.0.1 and ::1, see :mod:`qiotwisted.dns`).  With ``port=0`` each socket
          gets its own port; see the result or :attr:`addresses`.

        *backlog* (QEMU's ``num``) overrides the endpoint's ``listen()`` backlog; it
        is refused for endpoint kinds that have none.

        May be called any number of times.  Fires with the addresses this call
        listened on, in the reactor thread, if at least one address listened;
        fails with :class:`ListenError` carrying the first error if none did,
        or with the resolver's :class:`~qiotwisted.dns.ResolverError`.
        Cancelling it cancels the lookup task and closes whatever this call had
        opened.  If :meth:`disconnect` is called
        while a name is being resolved, the call fails and opens nothing.
        """
        return Deferred.fromCoroutine(self._open(endpoint_description, backlog))

    async def _open(self, description: str, backlog: int | None) -> list[IAddress]:
        generation = self._generation
        descriptions = await self._expand(description, backlog)
        if generation != self._generation:
            raise ListenError(f"Listener was disconnected while opening {description!r}")
        opened: list[IListeningPort] = []
        first_error: BaseException | None = None
        try:
            for one in descriptions:
                try:
                    endpoint = serverFromString(self.reactor, one)
                    port = await endpoint.listen(self)
                except CancelledError:
                    raise
                except Exception as e:
                    if first_error is None:
                        first_error = e
                    self.log.debug(
                        "cannot listen on {description}: {error}", description=one, error=str(e)
                    )
                    continue
                opened.append(port)
                self.add(port)
        except BaseException:
            for port in opened:
                self._forget(port)
                self._stop_port(port)
            raise
        if not opened:
            assert first_error is not None
            raise ListenError(f"Failed to listen on {description}: {first_error}") from first_error
        return [p.getHost() for p in opened]

    async def _expand(self, description: str, backlog: int | None) -> list[str]:
        """The concrete descriptions to listen on: one per resolved address."""
        kind = _tokenize(description)[0]
        spec = _TCP_KINDS.get(kind.lower())
        if spec is None:
            if kind.lower() == "unix":
                params = _named(kind, _UNIX_PARAMS, description)
                if backlog is not None:
                    params["backlog"] = str(int(backlog))
                return [_build(kind, params)]
            if backlog is not None:
                raise ValueError(f"backlog is not supported by {kind}: endpoints")
            return [description]
        names, loopback, family = spec
        params = _named(kind, names, description)
        if backlog is not None:
            params["backlog"] = str(int(backlog))
        host = params.get("interface")
        if host is None:
            params["interface"] = loopback
            return [_build(kind, params)]
        if host == "" or _is_numeric_host(host):
            return [_build(kind, params)]
        hosts = await self._resolve(host, family)
        return [_build(kind, {**params, "interface": h}) for h in hosts]

    def add(self, port: IListeningPort) -> None:
        """Adopt a port that already listens with this factory (``qio_net_listener_add``).

        Sets :attr:`connected`.  The port accepts only while a client func is set
        or a :meth:`wait_client` is pending; otherwise it stays open but unread.
        """
        self._ports.append(port)
        self.connected = True
        self._trace("qio_net_listener_watch", extra="add")
        self._set_reading(port, self._accepting())

    def _forget(self, port: IListeningPort) -> None:
        if port in self._ports:
            self._ports.remove(port)
        if not self._ports:
            self.connected = False

    # ---- watching: which ports read --------------------------------------------------

    def _accepting(self) -> bool:
        return self._func is not None or bool(self._waiters)

    @staticmethod
    def _set_reading(port: IListeningPort, on: bool) -> None:
        # Twisted's tcp/unix Port is a FileDescriptor: stopReading() leaves the
        # socket listening, and connections wait in the kernel backlog.
        method = getattr(port, "startReading" if on else "stopReading", None)
        if method is not None and not getattr(port, "disconnecting", False):
            method()

    def _update_reading(self) -> None:
        on = self._accepting()
        for port in self._ports:
            self._set_reading(port, on)

    # ---- the client func -------------------------------------------------------------

    def set_client_func(
        self, func: ClientFunc | None, data: Any = None, notify: NotifyFunc | None = None
    ) -> None:
        """Set the function each client goes to: ``func(listener, channel, data)``.

        The previous func's ``notify(old_data)`` runs first (once, in this call),
        also when the new func is ``None``.  ``func=None`` stops accepting but keeps
        the sockets: new connections wait in the kernel backlog until a func is set
        again (or a :meth:`wait_client` is pending).

        *func* runs in the reactor thread with a connected :class:`SocketChannel`
        that it now owns: keep it, or close it.  If *func* raises, the error is
        logged with the channel, the channel is closed, and the listener goes on.
        """
        self._trace("qio_net_listener_unwatch", extra="set_client_func")
        old_notify, old_data = self._notify, self._data
        self._func, self._data, self._notify = func, data, notify
        self._update_reading()
        if old_notify is not None:
            self._call_notify(old_notify, old_data)
        self._trace("qio_net_listener_watch", extra="set_client_func")
        if func is not None and self._held:
            self._schedule_drain()

    def _call_notify(self, notify: NotifyFunc, data: Any) -> None:
        try:
            notify(data)
        except Exception:
            self.log.failure(
                "notify {notify!r} of {listener!r} raised", notify=notify, listener=self
            )

    # ---- accepting ---------------------------------------------------------------------

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        """Twisted's hook: one unconnected :class:`SocketChannel` per accepted socket."""
        channel = SocketChannel(
            reactor=self._reactor_arg, name=self.name, on_connect=self._accepted
        )
        return channel.protocol

    def _accepted(self, channel: SocketChannel) -> None:
        """A connection is made (reactor thread, inside the port's accept loop)."""
        if self._waiters:
            waiter = self._waiters.popleft()
            self._update_reading()
            self._trace("qio_net_listener_watch", extra="wait_client")
            waiter.callback(channel)
            return
        if self._func is None:
            self._held.append(channel)
            return
        self._deliver(channel)

    def _deliver(self, channel: SocketChannel) -> None:
        func, data = self._func, self._data
        assert func is not None
        self._trace("qio_net_listener_callback")
        try:
            func(self, channel, data)
        except Exception:
            self.log.failure(
                "client func {func!r} of {listener!r} raised for {channel!r}; closing it",
                func=func,
                listener=self,
                channel=channel,
            )
            self._close_channel(channel)

    def _close_channel(self, channel: SocketChannel) -> None:
        def logged(f: Failure) -> None:
            self.log.failure("closing {channel!r}", f, channel=channel)

        channel.close().addErrback(logged)

    def _schedule_drain(self) -> None:
        if self._drain_call is None or not self._drain_call.active():
            # Not inline: set_client_func() should not re-enter the new func.
            self._drain_call = self.reactor.callLater(0, self._drain_held)

    def _drain_held(self) -> None:
        self._drain_call = None
        while self._held and self._func is not None:
            self._deliver(self._held.popleft())

    def wait_client(self) -> Deferred[SocketChannel]:
        """The next client, as a Deferred (QEMU's blocking ``wait_client``).

        While a wait is pending, the next connection goes to it instead of the
        client func; several waits are served in call order, one client each.
        The sockets accept during the wait even if no func is set.  A client the
        listener holds already (see the class docstring) is returned at once.
        Fails with :class:`QIOError` if :meth:`disconnect` is called first;
        cancelling it withdraws the wait.
        """
        if self._held:
            return succeed(self._held.popleft())
        d: Deferred[SocketChannel] = Deferred(self._cancel_wait)
        self._trace("qio_net_listener_unwatch", extra="wait_client")
        self._waiters.append(d)
        self._update_reading()
        return d

    def _cancel_wait(self, d: Deferred[SocketChannel]) -> None:
        if d in self._waiters:
            self._waiters.remove(d)
            self._update_reading()
            self._trace("qio_net_listener_watch", extra="wait_client")

    # ---- closing -----------------------------------------------------------------------

    def disconnect(self) -> Deferred[None]:
        """Stop listening on every socket; fires when all are closed.

        UNIX socket paths are removed (as QEMU's LISTEN close does).  Pending
        :meth:`wait_client` calls fail, held clients are closed, and then the
        client func is released: its ``notify(data)`` runs once.  Sets
        :attr:`connected` to False at once.  Idempotent: a second call returns
        a Deferred for the same close.  Errors closing a socket are logged, not
        raised (QEMU ignores them).  A later :meth:`open` listens again.
        """
        self._generation += 1
        ports, self._ports = self._ports, []
        was_connected, self.connected = self.connected, False
        if was_connected:
            self._trace("qio_net_listener_unwatch", extra="disconnect")
        stopping = [self._stop_port(p) for p in ports]
        while self._waiters:
            self._waiters.popleft().errback(
                QIOError("Listener disconnected while waiting for a client")
            )
        if self._drain_call is not None and self._drain_call.active():
            self._drain_call.cancel()
        self._drain_call = None
        while self._held:
            self._close_channel(self._held.popleft())
        if self._func is not None or self._notify is not None:
            notify, data = self._notify, self._data
            self._func, self._data, self._notify = None, None, None
            if notify is not None:
                self._call_notify(notify, data)
        if stopping:
            closing: Deferred[None] = DeferredList(stopping).addCallback(lambda _: None)
            self._closing = closing
            closing.addCallback(self._closed, closing)
        return self._chain_closing()

    def _closed(self, result: None, closing: Deferred[None]) -> None:
        if self._closing is closing:
            self._closing = None

    def _chain_closing(self) -> Deferred[None]:
        if self._closing is None:
            return succeed(None)
        d: Deferred[None] = Deferred()

        def relay(result: object) -> object:
            d.callback(None)
            return result

        self._closing.addBoth(relay)
        return d

    def _stop_port(self, port: IListeningPort) -> Deferred[None]:
        def logged(f: Failure) -> None:
            self.log.failure("closing {port!r} of {listener!r}", f, port=port, listener=self)

        return maybeDeferred(port.stopListening).addCallbacks(lambda _: None, logged)


class NetListenerService(Service):
    """A :class:`NetListener` as a ``twistd`` service (``IService``).

    Starting opens every description (in ``privilegedStartService``, so
    privileged ports work before twistd drops privileges).  Descriptions that
    fail are logged as warnings; if **none** listens, startup fails loudly:

    - when that is known at once (numeric addresses, UNIX paths: the usual case),
      ``startService`` raises :class:`ListenError`, which aborts ``twistd``;
    - when it is known only after a name resolution, the error is logged at
      critical level and, if *fatal* (the default), the reactor is stopped.

    :meth:`when_listening` gives a Deferred for the outcome.  Stopping
    disconnects the listener (and so releases its client func, see
    :class:`NetListener`); the returned Deferred fires when every socket is closed.
    """

    log = Logger()

    def __init__(
        self,
        listener: NetListener,
        descriptions: Iterable[str],
        *,
        backlog: int | None = None,
        fatal: bool = True,
    ) -> None:
        self.listener = listener
        self.descriptions = list(descriptions)
        self.backlog = backlog
        self.fatal = fatal
        self._outcome: list[IAddress] | Failure | None = None
        self._opening = False
        self._outcome_waiters: list[Deferred[list[IAddress]]] = []
        self._starting = False

    def when_listening(self) -> Deferred[list[IAddress]]:
        """Fires with every listening address once all descriptions were tried,
        or fails with :class:`ListenError` if none listened."""
        if isinstance(self._outcome, Failure):
            return fail(self._outcome)
        if self._outcome is not None:
            return succeed(list(self._outcome))
        d: Deferred[list[IAddress]] = Deferred()
        self._outcome_waiters.append(d)
        return d

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._open_all()

    def startService(self) -> None:
        super().startService()
        self._open_all()

    def _open_all(self) -> None:
        if self._opening:
            return
        self._opening = True
        self._outcome = None
        self._starting = True
        try:
            if not self.descriptions:
                self._finish(Failure(ListenError("No endpoint description to listen on")))
            else:
                opens = [self.listener.open(d, self.backlog) for d in self.descriptions]
                DeferredList(opens, consumeErrors=True).addCallback(self._opened)
        finally:
            self._starting = False
        if isinstance(self._outcome, Failure):
            # Known before returning: raise, so that twistd refuses to start.
            self._outcome.raiseException()

    def _opened(self, results: list[tuple[bool, Any]]) -> None:
        addresses: list[IAddress] = []
        errors: list[str] = []
        for description, (ok, value) in zip(self.descriptions, results, strict=True):
            if ok:
                addresses.extend(value)
            else:
                message = value.getErrorMessage()
                errors.append(message if description in message else f"{description}: {message}")
                self.log.warn(
                    "cannot listen on {description}: {error}",
                    description=description,
                    error=value.getErrorMessage(),
                )
        if addresses:
            self.log.info(
                "{name} listening on {addresses}",
                name=self.listener.name or "NetListener",
                addresses=", ".join(_describe(a) for a in addresses),
            )
            self._finish(addresses)
        else:
            self._finish(
                Failure(ListenError("Could not listen on any address: " + "; ".join(errors)))
            )

    def _finish(self, outcome: list[IAddress] | Failure) -> None:
        self._outcome = outcome
        waiters, self._outcome_waiters = self._outcome_waiters, []
        for d in waiters:
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(list(outcome))
        # Raised by _open_all when known synchronously; moot once stopped (a
        # stopService during a lookup fails the pending opens on purpose).
        if isinstance(outcome, Failure) and not self._starting and self.running:
            self.log.critical("{error}", error=outcome.getErrorMessage())
            if self.fatal:
                try:
                    self.listener.reactor.stop()
                except ReactorNotRunning:
                    pass  # already stopping: nothing left to abort

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._opening = False
        return self.listener.disconnect()


def _describe(address: IAddress) -> str:
    """``127.0.0.1:4444``, ``[::1]:4444`` or ``unix:/path`` for log lines."""
    host = getattr(address, "host", None)
    if host is not None:
        port = getattr(address, "port", "")
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    name = getattr(address, "name", None)
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    return f"unix:{name}" if name is not None else str(address)
