"""NetListener (QEMU's QIONetListener) over real sockets: TCP 127.0.0.1, TCP6 ::1, UNIX.

Every test closes what it opened; the conftest hygiene fixture fails a test
that leaves a listening port, a connection or a delayed call behind.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.application.service import MultiService
from twisted.internet import address as tw_address
from twisted.internet import task
from twisted.internet.defer import CancelledError, DeferredQueue
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    UNIXClientEndpoint,
    connectProtocol,
)
from twisted.internet.error import ConnectError, ConnectionRefusedError
from twisted.logger import LogLevel, capturedLogs
from twisted.python import threadable

from qiotwisted.channel import SocketChannel
from qiotwisted.dns import ResolvedAddress, Resolver, ResolverError
from qiotwisted.errors import QIOError
from qiotwisted.listener import (
    ListenError,
    NetListener,
    NetListenerService,
    _build,
    _named,
    _tokenize,
)
from qiotwisted.task import set_trace_enabled, trace_enabled
from qiotwisted.testing import MemoryWorkerPool

# ---- helpers -----------------------------------------------------------------------


async def connect(reactor: Any, addr: Any) -> SocketChannel:
    """A client SocketChannel connected to a listening address."""
    if isinstance(addr, tw_address.UNIXAddress):
        path = addr.name.decode() if isinstance(addr.name, bytes) else addr.name
        ep: Any = UNIXClientEndpoint(reactor, path, timeout=5)
    elif isinstance(addr, tw_address.IPv6Address):
        ep = TCP6ClientEndpoint(reactor, addr.host, addr.port, timeout=5)
    else:
        ep = TCP4ClientEndpoint(reactor, addr.host, addr.port, timeout=5)
    ch = SocketChannel(reactor=reactor)
    await connectProtocol(ep, ch.protocol)
    return ch


class Collector:
    """A client func that queues ``(channel, data, thread)`` for the test to take."""

    def __init__(self) -> None:
        self.queue: DeferredQueue[tuple[SocketChannel, Any, int]] = DeferredQueue()
        self.count = 0

    def __call__(self, listener: NetListener, channel: SocketChannel, data: Any) -> None:
        self.count += 1
        self.queue.put((channel, data, threading.get_ident()))

    async def next(self) -> tuple[SocketChannel, Any, int]:
        return await self.queue.get()


async def settle(reactor: Any, seconds: float = 0.1) -> None:
    await task.deferLater(reactor, seconds)


async def close_all(*channels: SocketChannel) -> None:
    for ch in channels:
        await ch.close()


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # UNIX socket paths are limited to ~107 bytes; pytest's tmp_path can be longer.
    import tempfile

    with tempfile.TemporaryDirectory(prefix="qio-l-") as d:
        yield Path(d)


@pytest.fixture
def tracing() -> Iterator[None]:
    before = trace_enabled()
    set_trace_enabled(True)
    yield
    set_trace_enabled(before)


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A TCP port on 127.0.0.1 held by a plain listening socket (not the reactor)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    yield s.getsockname()[1]
    s.close()


def hosts(addresses: list[Any]) -> set[str]:
    return {a.host for a in addresses}


# ---- description handling (reactor-free) ------------------------------------------------


async def test_tokenize_follows_twisted_grammar() -> None:
    kind, pos, kw = _tokenize(r"tcp6:0:interface=\:\:1:backlog=5")
    assert (kind, pos, kw) == ("tcp6", ["0"], [("interface", "::1"), ("backlog", "5")])
    assert _named("tcp", ("port", "interface", "backlog"), "tcp:80:127.0.0.1") == {
        "port": "80",
        "interface": "127.0.0.1",
    }
    built = _build("tcp6", {"port": "0", "interface": "fe80::1%lo"})
    assert _tokenize(built) == ("tcp6", [], [("port", "0"), ("interface", "fe80::1%lo")])
    with pytest.raises(ValueError, match="given twice"):
        _named("tcp", ("port", "interface", "backlog"), "tcp:80:port=81")


# ---- open ------------------------------------------------------------------------------


async def test_open_several_endpoints_each_client_reaches_func(
    reactor: Any, sock_dir: Path
) -> None:
    listener = NetListener(name="mig-in")
    func = Collector()
    listener.set_client_func(func, "the-data")
    assert not listener.connected
    got4 = await listener.open("tcp:0:interface=127.0.0.1")
    got6 = await listener.open(r"tcp6:0:interface=\:\:1")
    path = sock_dir / "l.sock"
    gotu = await listener.open(f"unix:{path}")
    assert listener.connected
    assert [type(a) for a in listener.addresses] == [
        tw_address.IPv4Address,
        tw_address.IPv6Address,
        tw_address.UNIXAddress,
    ]
    assert listener.addresses == got4 + got6 + gotu
    assert all(a.port != 0 for a in got4 + got6)  # port=0: the chosen ports are reported
    assert path.exists()

    clients: list[SocketChannel] = []
    servers: list[SocketChannel] = []
    for i, addr in enumerate(listener.addresses):
        client = await connect(reactor, addr)
        clients.append(client)
        await client.write_all(b"hello %d" % i)
        server, data, _thread = await func.next()
        servers.append(server)
        assert data == "the-data"
        assert server.name == "mig-in"
        assert server.connected
        assert await server.read_all(7) == b"hello %d" % i
        # The server channel is the other end of this client's connection.
        assert type(server.local_address) is type(addr)
    assert func.count == 3
    await close_all(*clients, *servers)
    await listener.disconnect()
    assert not path.exists()


async def test_default_interface_is_loopback_only(reactor: Any) -> None:
    listener = NetListener()
    assert hosts(await listener.open("tcp:0")) == {"127.0.0.1"}
    assert hosts(await listener.open("tcp6:0")) == {"::1"}
    # Positional interface (Twisted's tcp:PORT:INTERFACE) is understood too.
    assert hosts(await listener.open("tcp:0:127.0.0.1")) == {"127.0.0.1"}
    await listener.disconnect()


async def test_backlog_reaches_the_socket(reactor: Any, sock_dir: Path) -> None:
    listener = NetListener()
    await listener.open("tcp:0:interface=127.0.0.1", backlog=3)
    await listener.open(f"unix:{sock_dir / 'b.sock'}", backlog=4)
    assert [p.backlog for p in listener.ports] == [3, 4]  # type: ignore[attr-defined]  # Twisted Port attribute, untyped
    with pytest.raises(ValueError, match="backlog is not supported by systemd"):
        await listener.open("systemd:domain=INET:index=0", backlog=5)
    await listener.disconnect()


class SpyResolver(Resolver):
    """The real resolver, remembering what it was asked and in which thread."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.asked: list[tuple[Any, int, int]] = []

    def lookup_sync(self, address: Any, family: Any = 0, **kw: Any) -> list[ResolvedAddress]:
        self.asked.append((address, int(family), threading.get_ident()))
        return super().lookup_sync(address, family, **kw)


async def test_host_name_resolving_to_two_addresses_listens_on_both(reactor: Any) -> None:
    # qiotwisted.dns resolves localhost to the loopback of both families (RFC 6761).
    resolver = SpyResolver()
    listener = NetListener(resolver=resolver)
    func = Collector()
    listener.set_client_func(func)
    got: list[Any] = await listener.open("tcp:0:interface=localhost")
    assert [a.host for a in got] == ["127.0.0.1", "::1"]
    assert len(listener.ports) == 2 and listener.addresses == got
    for addr in got:
        client = await connect(reactor, addr)
        server, _, _ = await func.next()
        assert server.remote_address.host == addr.host
        await close_all(client, server)
    # The name was resolved in a worker thread, in both families for tcp:.
    ((address, family, thread),) = resolver.asked
    assert address == ("localhost", None) and family == socket.AF_UNSPEC
    assert thread != threading.get_ident()
    # tcp6: resolves in IPv6 only.
    assert hosts(await listener.open("tcp6:0:interface=localhost")) == {"::1"}
    assert resolver.asked[-1][1] == socket.AF_INET6
    await listener.disconnect()


async def test_unresolvable_name_fails_with_qemu_message(reactor: Any) -> None:
    listener = NetListener()
    with pytest.raises(ResolverError, match=r"address resolution failed for no-such-host\.invalid"):
        await listener.open("tcp:0:interface=no-such-host.invalid")
    assert not listener.connected and listener.ports == ()


async def test_partial_failure_still_opens_the_other(reactor: Any, busy_port: int) -> None:
    listener = NetListener()
    got: list[Any] = await listener.open(f"tcp:{busy_port}:interface=localhost")
    # 127.0.0.1:busy_port is taken; ::1 with the same port number is free.
    assert [(a.host, a.port) for a in got] == [("::1", busy_port)]
    assert listener.connected and len(listener.ports) == 1
    await listener.disconnect()


async def test_all_endpoints_failing_gives_a_clear_error(reactor: Any, busy_port: int) -> None:
    listener = NetListener()
    with pytest.raises(ListenError) as info:
        await listener.open(f"tcp:{busy_port}:interface=127.0.0.1")
    text = str(info.value)
    assert text.startswith(f"Failed to listen on tcp:{busy_port}:interface=127.0.0.1")
    assert "Address already in use" in text
    assert info.value.__cause__ is not None
    assert not listener.connected and listener.ports == ()
    # A bad description fails too, and nothing is left open.
    with pytest.raises(ListenError, match="nosuchkind:1: Unknown endpoint type"):
        await listener.open("nosuchkind:1")
    await listener.disconnect()


async def test_open_cancelled_or_disconnected_during_resolution_opens_nothing(
    reactor: Any,
) -> None:
    pool = MemoryWorkerPool()  # lookups wait until the test performs them
    listener = NetListener(resolver=Resolver(pool=pool))
    d = listener.open("tcp:0:interface=localhost")
    assert pool.queued == 1
    d.cancel()
    with pytest.raises(CancelledError):
        await d
    assert pool.queued == 0  # the lookup never runs
    d = listener.open("tcp:0:interface=localhost")
    await listener.disconnect()
    assert pool.run_until_idle() == 1
    with pytest.raises(ListenError, match="disconnected while opening"):
        await d
    assert listener.ports == () and not listener.connected


# ---- client func -------------------------------------------------------------------------


async def test_set_client_func_replacement_calls_old_notify_once(reactor: Any) -> None:
    notified: list[str] = []
    listener = NetListener()
    first, second = Collector(), Collector()
    listener.set_client_func(first, "one", notified.append)
    listener.set_client_func(second, "two", notified.append)
    assert notified == ["one"]
    (addr,) = await listener.open("tcp:0:interface=127.0.0.1")
    client = await connect(reactor, addr)
    server, data, _ = await second.next()
    assert data == "two" and first.count == 0
    listener.set_client_func(None)  # replaced by None: notify runs
    assert notified == ["one", "two"]
    listener.set_client_func(None)  # nothing left to notify
    assert notified == ["one", "two"]
    listener.set_client_func(second, "three", notified.append)
    await listener.disconnect()  # disconnect releases the func: notify once
    assert notified == ["one", "two", "three"]
    await listener.disconnect()
    assert notified == ["one", "two", "three"]
    await close_all(client, server)


async def test_none_stops_accepting_but_keeps_the_sockets(reactor: Any) -> None:
    listener = NetListener()
    (addr,) = await listener.open("tcp:0:interface=127.0.0.1")
    (port,) = listener.ports
    assert port not in reactor.getReaders()  # no func: not watching
    func = Collector()
    listener.set_client_func(func)
    assert port in reactor.getReaders()
    listener.set_client_func(None)
    assert port not in reactor.getReaders()

    # The socket still listens: the kernel completes the connection (backlog).
    client = await connect(reactor, addr)
    await client.write_all(b"early")
    await settle(reactor)
    assert func.count == 0
    listener.set_client_func(func, "back")
    server, data, _ = await func.next()
    assert data == "back"
    assert await server.read_all(5) == b"early"
    await close_all(client, server)
    await listener.disconnect()


async def test_raising_client_func_is_logged_and_listener_survives(reactor: Any) -> None:
    listener = NetListener(name="boom")
    good = Collector()
    calls: list[SocketChannel] = []

    def func(lst: NetListener, channel: SocketChannel, data: Any) -> None:
        calls.append(channel)
        if len(calls) == 1:
            raise RuntimeError("client func failed")
        good(lst, channel, data)

    listener.set_client_func(func)
    (addr,) = await listener.open("tcp:0:interface=127.0.0.1")
    with capturedLogs() as events:
        first = await connect(reactor, addr)
        # The listener closed the channel the func failed on: the client sees EOF.
        assert await first.read(10) == b""
    failures = [e for e in events if e.get("log_failure") is not None]
    assert len(failures) == 1
    assert failures[0]["log_failure"].check(RuntimeError)
    assert failures[0]["channel"] is calls[0]
    assert failures[0]["log_level"] == LogLevel.critical
    assert calls[0].closed

    second = await connect(reactor, addr)
    server, _, _ = await good.next()
    await second.write_all(b"ok")
    assert await server.read_all(2) == b"ok"
    await close_all(first, second, server)
    await listener.disconnect()


async def test_client_func_runs_in_the_reactor_thread(reactor: Any) -> None:
    listener = NetListener()
    in_io: list[bool] = []

    def func(lst: NetListener, channel: SocketChannel, data: Any) -> None:
        in_io.append(threadable.isInIOThread())
        data.put((channel, threading.get_ident()))

    q: DeferredQueue[tuple[SocketChannel, int]] = DeferredQueue()
    listener.set_client_func(func, q)
    (addr,) = await listener.open("tcp:0:interface=127.0.0.1")
    client = await connect(reactor, addr)
    server, ident = await q.get()
    assert in_io == [True]
    assert ident == threadable.ioThread == threading.get_ident()
    await close_all(client, server)
    await listener.disconnect()


# ---- wait_client -------------------------------------------------------------------------


async def test_wait_client_takes_the_next_client_before_the_func(reactor: Any) -> None:
    listener = NetListener()
    func = Collector()
    listener.set_client_func(func, "f")
    (addr,) = await listener.open("tcp:0:interface=127.0.0.1")
    waited = listener.wait_client()
    c1 = await connect(reactor, addr)
    s1 = await waited
    await c1.write_all(b"1")
    assert await s1.read_all(1) == b"1"
    assert func.count == 0
    c2 = await connect(reactor, addr)
    s2, data, _ = await func.next()
    assert data == "f"
    await close_all(c1, s1, c2, s2)
    await listener.disconnect()


async def test_wait_client_without_func_accepts_only_while_waiting(reactor: Any) -> None:
    listener = NetListener()
    (addr,) = await listener.open("tcp:0:interface=127.0.0.1")
    (port,) = listener.ports
    w1, w2 = listener.wait_client(), listener.wait_client()
    assert port in reactor.getReaders()
    c1 = await connect(reactor, addr)
    c2 = await connect(reactor, addr)
    await c1.write_all(b"a")
    await c2.write_all(b"b")
    s1, s2 = await w1, await w2  # served in call order, one client each
    assert {await s1.read_all(1), await s2.read_all(1)} == {b"a", b"b"}
    assert port not in reactor.getReaders()  # no waiter, no func: unwatched again

    # Two clients, one waiter: the second is not lost; the next wait gets it.
    w3 = listener.wait_client()
    c3 = await connect(reactor, addr)
    c4 = await connect(reactor, addr)
    s3 = await w3
    s4 = await listener.wait_client()
    assert s3 is not s4
    await close_all(c1, c2, c3, c4, s1, s2, s3, s4)
    await listener.disconnect()


async def test_wait_client_cancel_and_disconnect(reactor: Any) -> None:
    listener = NetListener()
    await listener.open("tcp:0:interface=127.0.0.1")
    (port,) = listener.ports
    w = listener.wait_client()
    w.cancel()
    with pytest.raises(CancelledError):
        await w
    assert port not in reactor.getReaders()
    w = listener.wait_client()
    await listener.disconnect()
    with pytest.raises(QIOError, match="disconnected while waiting"):
        await w


# ---- disconnect --------------------------------------------------------------------------


async def test_disconnect_closes_every_socket(reactor: Any, sock_dir: Path) -> None:
    listener = NetListener()
    listener.set_client_func(Collector())
    await listener.open("tcp:0:interface=127.0.0.1")
    await listener.open(r"tcp6:0:interface=\:\:1")
    path = sock_dir / "d.sock"
    await listener.open(f"unix:{path}:lockfile=1")
    addrs = listener.addresses
    ports = listener.ports
    assert listener.connected and path.exists() and Path(f"{path}.lock").is_symlink()
    d = listener.disconnect()
    assert not listener.connected  # at once
    assert listener.disconnect() is not d  # idempotent, same close
    await d
    assert listener.addresses == [] and listener.ports == ()
    assert not path.exists() and not os.path.lexists(f"{path}.lock")
    assert not any(p in reactor.getReaders() for p in ports)
    for addr in addrs:
        with pytest.raises((ConnectionRefusedError, ConnectError)):
            await connect(reactor, addr)
    await listener.disconnect()
    # A later open listens again (QEMU's add sets connected back).
    await listener.open("tcp:0:interface=127.0.0.1")
    assert listener.connected
    await listener.disconnect()


# ---- trace events ------------------------------------------------------------------------


async def test_trace_named_log_events(reactor: Any, tracing: None) -> None:
    listener = NetListener(name="traced")
    func = Collector()
    with capturedLogs() as events:
        await listener.open("tcp:0:interface=127.0.0.1")
        listener.set_client_func(func)
        (addr,) = listener.addresses
        c1 = await connect(reactor, addr)
        s1, _, _ = await func.next()
        w = listener.wait_client()
        c2 = await connect(reactor, addr)
        s2 = await w
        await listener.disconnect()
    trace = [
        (e["event"], e["extra"])
        for e in events
        if str(e.get("event", "")).startswith("qio_net_listener_")
    ]
    assert trace == [
        ("qio_net_listener_watch", "add"),
        ("qio_net_listener_unwatch", "set_client_func"),
        ("qio_net_listener_watch", "set_client_func"),
        ("qio_net_listener_callback", None),
        ("qio_net_listener_unwatch", "wait_client"),
        ("qio_net_listener_watch", "wait_client"),
        ("qio_net_listener_unwatch", "disconnect"),
    ]
    ours = [e for e in events if str(e.get("event", "")).startswith("qio_net_listener_")]
    assert all(e["log_level"] == LogLevel.debug for e in ours)
    assert all(e["listener"] is listener and e["thread_id"] == threading.get_ident() for e in ours)
    callback = next(e for e in ours if e["event"] == "qio_net_listener_callback")
    assert callback["func"] is func
    await close_all(c1, s1, c2, s2)


async def test_no_trace_events_while_tracing_is_off(reactor: Any) -> None:
    before = trace_enabled()
    set_trace_enabled(False)  # the default, unless QIOTWISTED_TRACE=1
    try:
        listener = NetListener()
        with capturedLogs() as events:
            await listener.open("tcp:0:interface=127.0.0.1")
            listener.set_client_func(Collector())
            await listener.disconnect()
    finally:
        set_trace_enabled(before)
    assert not [e for e in events if "event" in e]


# ---- NetListenerService ------------------------------------------------------------------


async def test_service_opens_all_and_stops(reactor: Any, sock_dir: Path, busy_port: int) -> None:
    listener = NetListener()
    func = Collector()
    listener.set_client_func(func)
    path = sock_dir / "svc.sock"
    svc = NetListenerService(
        listener, [f"tcp:{busy_port}:interface=127.0.0.1", f"unix:{path}", "tcp:0"]
    )
    top = MultiService()
    svc.setServiceParent(top)
    with capturedLogs() as events:
        top.privilegedStartService()
        top.startService()
    warnings = [e for e in events if e.get("log_level") == LogLevel.warn]
    assert len(warnings) == 1 and "Address already in use" in warnings[0]["error"]
    got = await svc.when_listening()
    assert len(got) == 2 and listener.connected and path.exists()
    client = await connect(reactor, got[0])
    server, _, _ = await func.next()
    await close_all(client, server)
    await top.stopService()
    assert not listener.connected and not path.exists()


async def test_service_fails_startup_loudly_if_none_listens(reactor: Any, busy_port: int) -> None:
    svc = NetListenerService(NetListener(), [f"tcp:{busy_port}:interface=127.0.0.1"])
    with pytest.raises(ListenError, match="Could not listen on any address"):
        svc.startService()
    with pytest.raises(ListenError):
        await svc.when_listening()
    await svc.stopService()


async def test_service_late_failure_is_critical(reactor: Any) -> None:
    pool = MemoryWorkerPool()
    svc = NetListenerService(
        NetListener(resolver=Resolver(pool=pool)),
        ["tcp:0:interface=no-such-host.invalid"],
        fatal=False,  # fatal=True would stop the reactor: the test's own
    )
    svc.startService()  # the outcome is not known yet: no exception
    outcome = svc.when_listening()
    with capturedLogs() as events:
        assert pool.run_until_idle() == 1  # the real lookup fails
    with pytest.raises(ListenError, match=r"no-such-host\.invalid"):
        await outcome
    critical = [e for e in events if e.get("log_level") == LogLevel.critical]
    assert len(critical) == 1 and "no-such-host.invalid" in critical[0]["error"]
    await svc.stopService()


async def test_service_stopped_during_lookup_is_quiet(reactor: Any) -> None:
    pool = MemoryWorkerPool()
    svc = NetListenerService(
        NetListener(resolver=Resolver(pool=pool)),
        ["tcp:0:interface=localhost"],
        fatal=False,  # the critical log below is the same gate as the reactor stop
    )
    svc.startService()
    outcome = svc.when_listening()
    await svc.stopService()
    with capturedLogs() as events:
        pool.run_until_idle()  # the lookup ends after the stop: nothing opens
    with pytest.raises(ListenError, match="disconnected while opening"):
        await outcome
    assert not [e for e in events if e.get("log_level") == LogLevel.critical]
    assert svc.listener.ports == ()
