"""TLSChannel: QEMU's tests/unit/test-io-channel-tls.c, rejections, EOF rules, readiness.

Everything runs real pyOpenSSL handshakes.  Transports are UNIX socketpairs
adopted with ``SocketChannel.new_fd`` (as QEMU's test does), an in-memory
channel pair (:class:`PipeEnd`, below: ``qiotwisted.testing`` has no channel
pair yet), and a TLS channel (TLS over TLS).  The sans-IO pump is also tested
on its own, with two pumps joined by moving bytes by hand.
"""

from __future__ import annotations

import datetime
import socket
import ssl
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from twisted.internet import task, threads
from twisted.internet.defer import CancelledError, Deferred, DeferredList, gatherResults
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from zope.interface import provider

from qiotwisted.channel import (
    WOULD_BLOCK,
    Channel,
    Condition,
    Feature,
    Shutdown,
    SocketChannel,
    port_of,
)
from qiotwisted.channel import tls as tls_mod
from qiotwisted.channel._base import Buffer, WouldBlock
from qiotwisted.channel._tlspump import EOFKind, TLSError, TLSPump
from qiotwisted.channel.tls import MAX_WRITE, TLSChannel, TLSHandshakeError
from qiotwisted.crypto import (
    PRIORITY_QEMU_RECEIVER,
    AuthzList,
    AuthzRule,
    Format,
    Policy,
    TLSCreds,
)
from qiotwisted.crypto import pki as _pki
from qiotwisted.crypto._dn import parse_dn
from qiotwisted.errors import ChannelError
from qiotwisted.task import Task, set_trace_enabled, trace_enabled
from tests.channel_helpers import TOTAL, ChannelTest, TurnCounter
from tests.pki import CLIENT_DN, TestPKI, pki_fixture  # noqa: F401

# ---- an in-memory channel pair ------------------------------------------------------------------


class PipeEnd(Channel):
    """One end of an in-memory byte pipe with a bounded buffer per direction.

    A write lands in the peer's buffer (at most *capacity* bytes; beyond that
    OUT is false and writes return WOULD_BLOCK) and the peer learns of it on
    the next reactor turn, as it would from a real transport.
    """

    def __init__(self, capacity: int, reactor: Any, max_read: int = 1 << 30) -> None:
        super().__init__(reactor=reactor)
        self.features = Feature.SHUTDOWN
        self.peer: PipeEnd | None = None
        self.capacity = capacity
        self.max_read = max_read
        self.inbox: deque[bytes] = deque()
        self.buffered = 0
        self.eof = False
        self.write_shut = False
        self._notify_call: Any = None

    @classmethod
    def pair(
        cls, reactor: Any, capacity: int = 1 << 20, max_read: int = 1 << 30
    ) -> tuple[PipeEnd, PipeEnd]:
        a, b = cls(capacity, reactor, max_read), cls(capacity, reactor, max_read)
        a.peer, b.peer = b, a
        return a, b

    def _notify(self) -> None:
        if self._notify_call is None and not self.closed:
            self._notify_call = self.reactor.callLater(0, self._do_notify)

    def _do_notify(self) -> None:
        self._notify_call = None
        self._ready_changed()

    def _io_read(self, nbytes: int, *, peek: bool = False) -> bytes | WouldBlock:
        if not self.buffered:
            return b"" if self.eof else WOULD_BLOCK
        parts: list[bytes] = []
        got = 0
        nbytes = min(nbytes, self.max_read)
        while self.inbox and got < nbytes:
            chunk = self.inbox.popleft()
            if got + len(chunk) > nbytes:
                self.inbox.appendleft(chunk[nbytes - got :])
                chunk = chunk[: nbytes - got]
            parts.append(chunk)
            got += len(chunk)
        self.buffered -= got
        if self.peer is not None:
            self.peer._notify()  # room for the writer
        return b"".join(parts)

    def _io_write(self, chunks: Sequence[Buffer], fds: Sequence[int]) -> int | WouldBlock:
        peer = self.peer
        if peer is None or peer.closed or self.write_shut:
            raise ChannelError("Unable to write to pipe: Broken pipe")
        room = self.capacity - peer.buffered
        if room <= 0:
            return WOULD_BLOCK
        data = b"".join(bytes(c) for c in chunks)[:room]
        peer.inbox.append(data)
        peer.buffered += len(data)
        peer._notify()
        return len(data)

    def _io_condition(self) -> Condition:
        bits = Condition(0)
        if self.buffered or self.eof:
            bits |= Condition.IN
        peer = self.peer
        if peer is not None and not peer.closed and peer.buffered < self.capacity:
            bits |= Condition.OUT
        return bits

    def _io_shutdown(self, how: Shutdown) -> None:
        if how & Shutdown.WRITE and self.peer is not None:
            self.write_shut = True
            self.peer.eof = True
            self.peer._notify()

    def _io_close(self) -> None:
        if self._notify_call is not None and self._notify_call.active():
            self._notify_call.cancel()
        self._notify_call = None
        if self.peer is not None:
            self.peer.eof = True
            self.peer._notify()


# ---- PKI ----------------------------------------------------------------------------------------


def _qemu_test_pki(root: Path) -> tuple[Path, Path]:
    """QEMU's test-io-channel-tls.c certificates: one key, CA + server + client, now..+24 h."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=1)
    later = now + datetime.timedelta(hours=24)

    def usage(*, cert_sign: bool) -> x509.KeyUsage:
        return x509.KeyUsage(
            digital_signature=not cert_sign,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=cert_sign,
            crl_sign=False,
            encipher_only=False,
            decipher_only=False,
        )

    ca_name = parse_dn("C=UK,CN=qemu CA")
    ca = _pki.build_certificate(
        ca_name,
        key.public_key(),
        issuer_name=ca_name,
        issuer_key=key,
        not_before=now,
        not_after=later,
        extensions=[
            (x509.BasicConstraints(ca=True, path_length=None), True),
            (usage(cert_sign=True), True),
        ],
    )

    def leaf(dn: str, purpose: x509.ObjectIdentifier) -> x509.Certificate:
        return _pki.build_certificate(
            parse_dn(dn),
            key.public_key(),
            issuer_name=ca_name,
            issuer_key=key,
            not_before=now,
            not_after=later,
            extensions=[
                (x509.BasicConstraints(ca=False, path_length=None), True),
                (usage(cert_sign=False), True),
                (x509.ExtendedKeyUsage([purpose]), True),
            ],
        )

    server = leaf("C=UK,CN=qemu.org", ExtendedKeyUsageOID.SERVER_AUTH)
    client = leaf("C=UK,CN=qemu", ExtendedKeyUsageOID.CLIENT_AUTH)
    key_pem = _pki.key_pem(key)
    sdir, cdir = root / "test-io-channel-tls-server", root / "test-io-channel-tls-client"
    _pki.write_pem_files(
        sdir,
        {
            _pki.CA_CERT: (_pki.cert_pem(ca), 0o644),
            _pki.SERVER_CERT: (_pki.cert_pem(server), 0o644),
            _pki.SERVER_KEY: (key_pem, 0o600),
        },
    )
    _pki.write_pem_files(
        cdir,
        {
            _pki.CA_CERT: (_pki.cert_pem(ca), 0o644),
            _pki.CLIENT_CERT: (_pki.cert_pem(client), 0o644),
            _pki.CLIENT_KEY: (key_pem, 0o600),
        },
    )
    return sdir, cdir


@pytest.fixture(scope="module")
def qemu_pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _qemu_test_pki(tmp_path_factory.mktemp("qemu-tls"))


@pytest.fixture(scope="module")
def server_creds(pki: TestPKI) -> TLSCreds:
    return TLSCreds.load_sync(pki.server_dir, "server")


@pytest.fixture(scope="module")
def client_creds(pki: TestPKI) -> TLSCreds:
    return TLSCreds.load_sync(pki.client_dir, "client")


def _socketpair() -> tuple[SocketChannel, SocketChannel]:
    a, b = socket.socketpair()
    return SocketChannel.new_fd(a.detach()), SocketChannel.new_fd(b.detach())


async def _handshake_both(client: TLSChannel, server: TLSChannel) -> None:
    await gatherResults([client.handshake().deferred, server.handshake().deferred])


async def _close_all(*chans: Channel) -> None:
    await DeferredList([c.close() for c in chans], consumeErrors=True)


async def _outcome(d: Deferred[Any]) -> BaseException | None:
    try:
        await d
    except Exception as e:
        return e
    return None


# ---- QEMU's /qio/channel/tls/basic --------------------------------------------------------------


async def test_qemu_basic_over_socketpair(
    reactor: Any, qemu_pki: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """/qio/channel/tls/basic: QEMU's PKI, authz-list glob, socketpair, both ways, both modes.

    Also makes the thread path visible: credentials load in a worker thread
    (the crypto module's Task), handshake completions run in the reactor thread.
    """
    sdir, cdir = qemu_pki
    load_threads: list[int] = []
    original = TLSCreds.load_sync

    def spy(*args: Any, **kwargs: Any) -> TLSCreds:
        load_threads.append(threading.get_ident())
        return original(*args, **kwargs)

    monkeypatch.setattr(TLSCreds, "load_sync", spy)
    server_creds, client_creds = await gatherResults(
        [
            TLSCreds.load(sdir, "server", True, "NORMAL", sanity_check=False).deferred,
            TLSCreds.load(cdir, "client", True, "NORMAL", sanity_check=False).deferred,
        ]
    )
    reactor_thread = threading.get_ident()
    assert len(load_threads) == 2
    assert all(t != reactor_thread for t in load_threads)

    authz = AuthzList([AuthzRule("C=UK,CN=qemu*", Policy.ALLOW, Format.GLOB)], Policy.DENY)
    sock0, sock1 = _socketpair()
    client = TLSChannel.new_client(sock0, client_creds, "qemu.org")
    server = TLSChannel.new_server(sock1, server_creds, authz)
    assert client.has_feature(Feature.SHUTDOWN) and server.has_feature(Feature.SHUTDOWN)
    assert not client.has_feature(Feature.READ_MSG_PEEK | Feature.FD_PASS)

    seen: dict[str, Any] = {}

    def done(t: Task[Any], who: str) -> None:
        seen[who] = (t.source, t.propagate_error(), threading.get_ident())

    ct = client.handshake(done, "client")
    st = server.handshake(done, "server")
    for _ in range(500):  # QEMU's loop of g_main_context_iteration
        if len(seen) == 2:
            break
        await task.deferLater(reactor, 0.01)
    assert seen["client"] == (client, None, reactor_thread)
    assert seen["server"] == (server, None, reactor_thread)
    assert ct.completed and st.completed
    assert client.handshake_complete and server.handshake_complete
    assert server.get_peer_dn() == "C=UK,CN=qemu"
    assert client.get_peer_dn() == "C=UK,CN=qemu.org"

    for blocking in (False, True):
        forward, backward = ChannelTest(), ChannelTest()
        await DeferredList(
            [
                Deferred.fromCoroutine(forward.run(client, server, blocking=blocking)),
                Deferred.fromCoroutine(backward.run(server, client, blocking=blocking)),
            ]
        )
        forward.validate()
        backward.validate()
        assert len(forward.output) == TOTAL
    await _close_all(client, server)
    assert sock0.closed and sock1.closed


async def test_await_handshake_gives_the_channel(
    reactor: Any, server_creds: TLSCreds, client_creds: TLSCreds
) -> None:
    a, b = _socketpair()
    client = TLSChannel.new_client(a, client_creds, "localhost")
    server = TLSChannel.new_server(b, server_creds)
    got = await gatherResults([client.handshake().deferred, server.handshake().deferred])
    assert got == [client, server]
    assert client.protocol_version == "TLSv1.3" and client.cipher
    await _close_all(client, server)


# ---- other transports ---------------------------------------------------------------------------


async def test_tls_over_memory_pair(
    reactor: Any, server_creds: TLSCreds, client_creds: TLSCreds
) -> None:
    a, b = PipeEnd.pair(reactor, capacity=64 * 1024)
    client = TLSChannel.new_client(a, client_creds, "127.0.0.1")
    server = TLSChannel.new_server(b, server_creds)
    await _handshake_both(client, server)
    forward, backward = ChannelTest(), ChannelTest()
    await DeferredList(
        [
            Deferred.fromCoroutine(forward.run(client, server, blocking=True)),
            Deferred.fromCoroutine(backward.run(server, client, blocking=False)),
        ]
    )
    forward.validate()
    backward.validate()
    await _close_all(client, server)


async def test_tls_over_a_trickling_master(
    reactor: Any, server_creds: TLSCreds, client_creds: TLSCreds
) -> None:
    """A master that hands out 7 bytes per read: records arrive in hundreds of pieces."""
    a, b = PipeEnd.pair(reactor, capacity=64 * 1024, max_read=7)
    client = TLSChannel.new_client(a, client_creds, "localhost")
    server = TLSChannel.new_server(b, server_creds)
    await _handshake_both(client, server)
    payload = bytes(range(256)) * 160  # 40 KiB: three records
    received = server.read_all(len(payload))
    await client.write_all(payload)
    assert await received == payload
    await _close_all(client, server)


async def test_tls_over_tls(reactor: Any, server_creds: TLSCreds, client_creds: TLSCreds) -> None:
    a, b = _socketpair()
    inner_c = TLSChannel.new_client(a, client_creds, "localhost")
    inner_s = TLSChannel.new_server(b, server_creds)
    # The outer handshake starts while the inner one is still running: its
    # I/O waits for the inner handshake.
    outer_c = TLSChannel.new_client(inner_c, client_creds, "::1")
    outer_s = TLSChannel.new_server(inner_s, server_creds)
    await gatherResults(
        [
            inner_c.handshake().deferred,
            inner_s.handshake().deferred,
            outer_c.handshake().deferred,
            outer_s.handshake().deferred,
        ]
    )
    t = ChannelTest()
    await t.run(outer_c, outer_s, blocking=True)
    t.validate()
    back = ChannelTest()
    await back.run(outer_s, outer_c, blocking=False)
    back.validate()
    await _close_all(outer_c, outer_s)
    assert inner_c.closed and a.closed


# ---- rejections ---------------------------------------------------------------------------------

VERSIONS = {"TLS1.3": None, "TLS1.2": PRIORITY_QEMU_RECEIVER}


async def _reject(
    reactor: Any,
    server_creds: TLSCreds,
    client_creds: TLSCreds,
    *,
    hostname: str = "localhost",
    authz: AuthzList | None = None,
    alert: bool = True,
) -> tuple[BaseException | None, BaseException | None, bytes | None]:
    """Handshake both ends; return (client error, server error, what the other side read).

    A TLS 1.3 client finishes its handshake before the server has checked its
    certificate, so the client's error may only show on its first read (the
    server's alert, when *alert*: a certificate failure).  The side whose
    handshake failed then closes its channel, as QEMU's callers do; a refused
    server must deliver none of the bytes the client sent.
    """
    a, b = _socketpair()
    client = TLSChannel.new_client(a, client_creds, hostname)
    server = TLSChannel.new_server(b, server_creds, authz)
    cerr, serr = await gatherResults(
        [_outcome_d(client.handshake().deferred), _outcome_d(server.handshake().deferred)]
    )
    got: bytes | None = None
    if cerr is None:
        # The client thinks it is in: it sends a secret.
        try:
            await client.write_all(b"secret bytes that must never be delivered")
        except ChannelError as e:
            cerr = e
    if serr is not None:
        with pytest.raises(ChannelError, match="Cannot read from TLS channel"):
            await server.read(100)
        with pytest.raises(ChannelError, match="Cannot write to TLS channel"):
            await server.write(b"x")
        if cerr is None and alert:
            try:
                got = await client.read(100).addTimeout(5, reactor)
            except ChannelError as e:
                cerr = e
        await server.close()
        if cerr is None and not alert:
            try:
                got = await client.read(100).addTimeout(5, reactor)
            except ChannelError as e:
                cerr = e
    elif cerr is not None:
        await client.close()
        got = await server.read(100).addTimeout(5, reactor)
    await _close_all(client, server)
    return cerr, serr, got


def _outcome_d(d: Deferred[Any]) -> Deferred[BaseException | None]:
    return Deferred.fromCoroutine(_outcome(d))


@pytest.mark.parametrize("version", VERSIONS)
async def test_server_requires_a_client_certificate(
    reactor: Any, pki: TestPKI, server_creds: TLSCreds, version: str
) -> None:
    no_cert = pki.make_dir(None, {_pki.CA_CERT: pki.ca_cert})
    creds = TLSCreds.load_sync(no_cert, "client")
    assert creds.cert is None
    srv = TLSCreds.load_sync(pki.server_dir, "server", priority=VERSIONS[version])
    cerr, serr, _ = await _reject(reactor, srv, creds)
    assert isinstance(serr, TLSHandshakeError)
    assert str(serr).startswith("No certificate peers")
    assert isinstance(cerr, ChannelError)
    assert "certificate required" in str(cerr) or "handshake failure" in str(cerr)


@pytest.mark.parametrize("version", VERSIONS)
async def test_client_certificate_from_another_ca(reactor: Any, pki: TestPKI, version: str) -> None:
    other_cert, other_key = pki.issue("client", issuer="other", subject="C=UK,CN=intruder")
    d = pki.make_dir(
        None,
        {_pki.CA_CERT: pki.ca_cert, _pki.CLIENT_CERT: other_cert, _pki.CLIENT_KEY: other_key},
    )
    creds = TLSCreds.load_sync(d, "client", sanity_check=False)
    srv = TLSCreds.load_sync(pki.server_dir, "server", priority=VERSIONS[version])
    cerr, serr, _ = await _reject(reactor, srv, creds)
    assert isinstance(serr, TLSHandshakeError)
    assert str(serr).startswith("The certificate hasn't got a known issuer")
    assert isinstance(cerr, ChannelError) and "unknown ca" in str(cerr)


async def test_server_certificate_from_another_ca(reactor: Any, pki: TestPKI) -> None:
    srv = TLSCreds.load_sync(pki.other_dir, "server", sanity_check=False)
    cli = TLSCreds.load_sync(pki.client_dir, "client")
    cerr, serr, _ = await _reject(reactor, srv, cli)
    assert isinstance(cerr, TLSHandshakeError)
    assert str(cerr).startswith("The certificate hasn't got a known issuer")
    assert isinstance(serr, TLSHandshakeError) and "unknown ca" in str(serr)


@pytest.mark.parametrize(
    ("which", "message"),
    [
        ("expired", "The certificate has expired"),
        ("not-yet", "The certificate is not yet activated"),
    ],
)
@pytest.mark.parametrize("side", ["client", "server"])
async def test_certificate_validity(
    reactor: Any, pki: TestPKI, which: str, message: str, side: str
) -> None:
    bad_dir = pki.expired_dir if which == "expired" else pki.not_yet_valid_dir
    if side == "client":
        cli = TLSCreds.load_sync(bad_dir, "client", sanity_check=False)
        srv = TLSCreds.load_sync(pki.server_dir, "server")
    else:
        cli = TLSCreds.load_sync(pki.client_dir, "client")
        srv = TLSCreds.load_sync(bad_dir, "server", sanity_check=False)
    cerr, serr, _ = await _reject(reactor, srv, cli)
    checker, other = (serr, cerr) if side == "client" else (cerr, serr)
    assert isinstance(checker, TLSHandshakeError)
    assert str(checker).startswith(message)
    assert isinstance(other, ChannelError)  # told by an alert


async def test_hostname_mismatch(reactor: Any, pki: TestPKI, client_creds: TLSCreds) -> None:
    # A TLS 1.2 (receiver policy) server: a TLS 1.3 one would have sent
    # session tickets, which the failed client never reads, so its close
    # would reset the connection (trap 1) instead of ending it.
    receiver = TLSCreds.load_sync(pki.server_dir, "server", priority=PRIORITY_QEMU_RECEIVER)
    cerr, serr, got = await _reject(reactor, receiver, client_creds, hostname="qemu.example.org")
    assert isinstance(cerr, TLSHandshakeError)
    assert str(cerr) == "Certificate does not match the hostname qemu.example.org"
    # As with QEMU (trap 10): the server saw a complete handshake, then EOF.
    assert serr is None and got == b""


async def test_client_without_hostname_fails_like_qemu(
    reactor: Any, server_creds: TLSCreds, client_creds: TLSCreds
) -> None:
    a, b = _socketpair()
    client = TLSChannel.new_client(a, client_creds, None)
    server = TLSChannel.new_server(b, server_creds)
    server.handshake()
    err = await _outcome(client.handshake().deferred)
    assert isinstance(err, TLSHandshakeError)
    assert str(err) == "No hostname for certificate validation"
    await _close_all(client, server)


@pytest.mark.parametrize("version", VERSIONS)
async def test_authz_denies_the_client_dn(reactor: Any, pki: TestPKI, version: str) -> None:
    srv = TLSCreds.load_sync(pki.server_dir, "server", priority=VERSIONS[version])
    cli = TLSCreds.load_sync(pki.client_dir, "client")
    authz = AuthzList([AuthzRule("C=UK,O=other,*", Policy.ALLOW, Format.GLOB)], Policy.DENY)
    cerr, serr, got = await _reject(reactor, srv, cli, authz=authz, alert=False)
    assert isinstance(serr, TLSHandshakeError)
    assert str(serr) == f"TLS x509 authz check for {CLIENT_DN} is denied"
    # The TLS handshake itself succeeded on both ends, so no alert: the client
    # sees the refusing server go away (a reset, as its secret went unread,
    # or an EOF).
    assert got == b"" or (isinstance(cerr, ChannelError) and "Connection lost" in str(cerr))


@pytest.mark.parametrize(
    "plaintext",
    [b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", b"QEVM\x00\x00\x00\x03" + b"\x00" * 64],
    ids=["http", "migration-stream"],
)
async def test_plaintext_into_a_tls_server(
    reactor: Any, server_creds: TLSCreds, plaintext: bytes
) -> None:
    a, b = socket.socketpair()
    server = TLSChannel.new_server(SocketChannel.new_fd(b.detach()), server_creds)
    peer = SocketChannel.new_fd(a.detach())
    await peer.write_all(plaintext)
    err = await _outcome(server.handshake().deferred)
    assert isinstance(err, TLSHandshakeError)
    assert str(err).startswith("TLS handshake failed: ")
    with pytest.raises(ChannelError, match="Cannot read from TLS channel: TLS handshake failed"):
        await server.read(10)
    await server.close()
    # The plaintext peer gets at most an alert record (type 21), then EOF.
    reply = await peer.read_all_eof(5)
    assert reply == b"" or reply[:1] == b"\x15"
    await _close_all(peer)


@pytest.mark.parametrize("stalled", ["client", "server"])
async def test_stalled_peer_times_out(
    reactor: Any, server_creds: TLSCreds, client_creds: TLSCreds, stalled: str
) -> None:
    a, b = _socketpair()
    if stalled == "client":
        tls = TLSChannel.new_server(b, server_creds, handshake_timeout=0.5)
        hs = tls.handshake()
    else:
        tls = TLSChannel.new_client(b, client_creds, "localhost")
        hs = tls.handshake(timeout=0.5)
    started = reactor.seconds()
    err = await _outcome(hs.deferred)
    assert isinstance(err, TLSHandshakeError)
    assert str(err) == "TLS handshake timed out after 0.5 s"
    assert reactor.seconds() - started >= 0.45
    with pytest.raises(ChannelError, match="timed out"):
        await tls.read(1)
    if stalled == "server":
        # The silent peer got the ClientHello and nothing else.
        hello = await a.read(5)
        assert hello[:2] == b"\x16\x03"
    await _close_all(tls, a)


async def test_handshake_cancel_and_no_io_before_start(
    reactor: Any, server_creds: TLSCreds
) -> None:
    a, b = _socketpair()
    tls = TLSChannel.new_server(b, server_creds)
    with pytest.raises(ChannelError, match="handshake has not been started"):
        tls.read_nowait(1)
    hs = tls.handshake()
    with pytest.raises(ChannelError, match="already started"):
        tls.handshake()
    assert tls.read_nowait(1) is WOULD_BLOCK  # waits for the handshake
    pending_read = tls.read(1)
    seen: list[BaseException | None] = []
    hs.deferred.addErrback(lambda f: seen.append(f.value))
    hs.deferred.cancel()
    assert hs.completed and isinstance(seen[0], CancelledError)
    assert isinstance(await _outcome(pending_read), ChannelError)
    with pytest.raises(ChannelError, match="cancelled"):
        tls.write_nowait(b"x")
    await _close_all(tls, a)


async def test_endpoint_mismatch(server_creds: TLSCreds, client_creds: TLSCreds) -> None:
    a, b = PipeEnd.pair(None)
    with pytest.raises(ChannelError, match="Expected TLS credentials for a server endpoint"):
        TLSChannel.new_server(a, client_creds)
    with pytest.raises(ChannelError, match="Expected TLS credentials for a client endpoint"):
        TLSChannel.new_client(b, server_creds, "localhost")


# ---- EOF, bye, shutdown -------------------------------------------------------------------------


async def _pair(
    server_creds: TLSCreds, client_creds: TLSCreds, **kw: Any
) -> tuple[TLSChannel, TLSChannel, SocketChannel, SocketChannel]:
    a, b = _socketpair()
    client = TLSChannel.new_client(a, client_creds, "localhost", **kw)
    server = TLSChannel.new_server(b, server_creds, **kw)
    await _handshake_both(client, server)
    return client, server, a, b


@pytest.mark.parametrize("relaxed", [True, False])
async def test_premature_close_follows_relaxed_eof(
    reactor: Any, pki: TestPKI, client_creds: TLSCreds, relaxed: bool
) -> None:
    # The receiver policy (TLS 1.2) server, as for a QEMU 7.2 source: with
    # TLS 1.3 the unread session tickets would make the client's close a reset.
    receiver = TLSCreds.load_sync(pki.server_dir, "server", priority=PRIORITY_QEMU_RECEIVER)
    client, server, a, _ = await _pair(receiver, client_creds, relaxed_eof=relaxed)
    await client.write_all(b"last words")
    await a.close()  # TCP FIN, no close_notify: what QEMU 7.2 does (trap 2)
    assert await server.read_all(10) == b"last words"
    if relaxed:
        assert await server.read(10) == b""
    else:
        with pytest.raises(
            ChannelError,
            match=r"^Cannot read from TLS channel: The TLS connection was non-properly terminated",
        ):
            await server.read(10)
        # A read-side shutdown makes it an ordinary EOF, as in QEMU.
        server.shutdown(Shutdown.READ)
        assert await server.read(10) == b""
    await _close_all(client, server)


async def test_bye_sends_close_notify(
    reactor: Any, server_creds: TLSCreds, client_creds: TLSCreds
) -> None:
    client, server, _, _ = await _pair(server_creds, client_creds, relaxed_eof=False)
    server.relaxed_eof = False
    await client.write_all(b"x" * 100_000)
    bye = client.bye()
    await bye.deferred
    assert bye.completed
    with pytest.raises(ChannelError, match="bye"):
        await client.write(b"more")
    assert await server.read_all(100_000) == b"x" * 100_000
    assert await server.read(1) == b""  # close_notify: a clean EOF even without relaxed_eof
    # Half-close: the server can still answer.
    await server.write_all(b"reply")
    assert await client.read_all(5) == b"reply"
    second = client.bye()
    assert isinstance(await _outcome(second.deferred), ChannelError)
    await _close_all(client, server)


async def test_bye_before_handshake_fails(reactor: Any, server_creds: TLSCreds) -> None:
    a, b = PipeEnd.pair(reactor)
    tls = TLSChannel.new_server(a, server_creds)
    err = await _outcome(tls.bye().deferred)
    assert isinstance(err, ChannelError) and "handshake" in str(err)
    await _close_all(tls, b)


async def test_shutdown_write_reaches_the_peer_as_eof(
    reactor: Any, server_creds: TLSCreds, client_creds: TLSCreds
) -> None:
    client, server, _, _ = await _pair(server_creds, client_creds)
    await client.write_all(b"abc")
    client.shutdown(Shutdown.WRITE)
    with pytest.raises(ChannelError):
        await client.write(b"d")
    assert await server.read_all(3) == b"abc"
    assert await server.read(1) == b""
    await _close_all(client, server)


async def test_close_flushes_buffered_ciphertext(
    reactor: Any, server_creds: TLSCreds, client_creds: TLSCreds
) -> None:
    a, b = PipeEnd.pair(reactor, capacity=16 * 1024)
    client = TLSChannel.new_client(a, client_creds, "localhost")
    server = TLSChannel.new_server(b, server_creds)
    await _handshake_both(client, server)
    n = client.write_nowait(b"z" * 100_000)
    assert n == 100_000  # accepted: the ciphertext waits in the one buffer
    assert client.buffered_output > 0
    closing = client.close()
    assert await server.read_all(100_000) == b"z" * 100_000
    await closing
    await _close_all(server)


# ---- readiness and backpressure -----------------------------------------------------------------


async def test_wait_and_watches_see_buffered_plaintext(
    reactor: Any, server_creds: TLSCreds, client_creds: TLSCreds
) -> None:
    a, b = PipeEnd.pair(reactor)
    client = TLSChannel.new_client(a, client_creds, "localhost")
    server = TLSChannel.new_server(b, server_creds)
    await _handshake_both(client, server)
    # Three records in one transport chunk.
    for k in range(3):
        await client.write_all(bytes([65 + k]) * 1000)
    await server.wait(Condition.IN)
    assert await server.read(500) == b"A" * 500
    # Half a record decrypted and buffered in OpenSSL, the transport is empty.
    assert server.ssl_connection.pending() == 500
    assert b.buffered == 0
    assert server.condition() & Condition.IN
    fired: list[Condition] = []

    def watch(ch: Channel, cond: Condition, data: Any) -> bool:
        fired.append(cond)
        return False

    server.add_watch(Condition.IN, watch)
    ready = server.wait(Condition.IN)
    assert ready.called  # no waiting: the bytes are already here
    await task.deferLater(reactor, 0)
    assert fired == [Condition.IN]
    assert server.read_nowait(500) == b"A" * 500
    # Nothing decrypted is pending now, but two whole records sit in the BIO.
    assert server.ssl_connection.pending() == 0
    assert server.condition() & Condition.IN
    assert server.read_nowait(2000) == b"B" * 1000 + b"C" * 1000
    assert server.read_nowait(10) is WOULD_BLOCK
    assert not server.condition() & Condition.IN
    later = server.wait(Condition.IN)
    assert not later.called
    await client.write_all(b"D")
    assert await later & Condition.IN
    assert server.read_nowait(10) == b"D"
    await _close_all(client, server)


async def test_writes_stop_when_the_master_is_full(
    reactor: Any, server_creds: TLSCreds, client_creds: TLSCreds
) -> None:
    capacity = 64 * 1024
    a, b = PipeEnd.pair(reactor, capacity=capacity)
    client = TLSChannel.new_client(a, client_creds, "localhost")
    server = TLSChannel.new_server(b, server_creds)
    await _handshake_both(client, server)
    payload = bytes(range(256)) * (16 * 1024)  # 4 MiB
    writing = client.write_all(payload)
    for _ in range(20):
        await task.deferLater(reactor, 0)
    # Nobody reads: the writer is parked, memory is bounded by the pipe and one buffer.
    assert not writing.called
    assert b.buffered <= capacity
    assert client.buffered_output <= MAX_WRITE + 16 * 1024
    assert not client.condition() & Condition.OUT
    received = await server.read_all(len(payload))
    await writing
    assert received == payload
    await _close_all(client, server)


# ---- session tickets (qemu-interop.md trap 1) ---------------------------------------------------


def _count_tickets(port: int, ca_pem: bytes, cert: Path, key: Path) -> tuple[int, str, bytes]:
    """A stdlib client (a thread): count NewSessionTicket messages until the first app byte."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=ca_pem.decode())
    ctx.load_cert_chain(cert, key)
    tickets = 0

    def on_msg(conn: Any, direction: str, version: Any, ctype: Any, mtype: Any, data: Any) -> None:
        nonlocal tickets
        if direction == "read" and ctype == 22 and mtype == 4:  # handshake / new_session_ticket
            tickets += 1

    ctx._msg_callback = on_msg  # type: ignore[attr-defined]  # pyOpenSSL's private hook: the only way to count tickets
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            first = s.recv(1)  # tickets, if any, come before the server's first byte
            return tickets, str(s.version()), first


@pytest.mark.parametrize(
    ("priority", "version", "expect_tickets"),
    [(None, "TLSv1.3", True), (PRIORITY_QEMU_RECEIVER, "TLSv1.2", False)],
)
async def test_receiver_policy_sends_no_session_tickets(
    reactor: Any, pki: TestPKI, priority: str | None, version: str, expect_tickets: bool
) -> None:
    """A server that receives from QEMU 7.2 must write nothing after its handshake.

    The default (TLS 1.3) server sends NewSessionTicket messages even with
    OP_NO_TICKET (the positive control, proving the counter works); the
    receiver policy (TLS 1.2) sends none.
    """
    creds = TLSCreds.load_sync(pki.server_dir, "server", priority=priority)
    lis = SocketChannel.listen("127.0.0.1:0")
    port = port_of(lis.get_local_address())
    counting = threads.deferToThread(
        _count_tickets,
        port,
        pki.ca_pem(),
        pki.client_dir / _pki.CLIENT_CERT,
        pki.client_dir / _pki.CLIENT_KEY,
    )
    sock = await lis.accept()
    server = TLSChannel.new_server(sock, creds)
    await server.handshake()
    assert server.protocol_version == version
    await server.write_all(b"!")
    tickets, negotiated, first = await counting
    assert negotiated == version and first == b"!"
    if expect_tickets:
        assert tickets >= 1
    else:
        assert tickets == 0
    await _close_all(server, lis)


# ---- trace events -------------------------------------------------------------------------------


@pytest.fixture
def trace_events() -> Iterator[list[LogEvent]]:
    events: list[LogEvent] = []

    @provider(ILogObserver)
    def observe(event: LogEvent) -> None:
        if str(event.get("event", "")).startswith("qio_channel_tls_"):
            events.append(event)

    was = trace_enabled()
    set_trace_enabled(True)
    globalLogPublisher.addObserver(observe)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observe)
        set_trace_enabled(was)


async def test_trace_events_carry_qemu_names(
    reactor: Any, server_creds: TLSCreds, client_creds: TLSCreds, trace_events: list[LogEvent]
) -> None:
    client, server, _, _ = await _pair(server_creds, client_creds)
    names = [e["event"] for e in trace_events if e["ioc"] is server]
    assert names[0] == "qio_channel_tls_new_server"
    assert names[1] == "qio_channel_tls_handshake_start"
    assert "qio_channel_tls_handshake_pending" in names
    assert names[-2:] == ["qio_channel_tls_handshake_complete", "qio_channel_tls_credentials_allow"]
    assert next(e["event"] for e in trace_events if e["ioc"] is client) == (
        "qio_channel_tls_new_client"
    )
    assert all(e["thread_id"] == threading.get_ident() for e in trace_events)
    await client.bye()
    assert trace_events[-1]["event"] == "qio_channel_tls_bye_complete"
    await _close_all(client, server)

    trace_events.clear()
    a, b = _socketpair()
    denied = TLSChannel.new_server(b, server_creds, AuthzList([], Policy.DENY))
    other = TLSChannel.new_client(a, client_creds, "localhost")
    await DeferredList([denied.handshake().deferred, other.handshake().deferred])
    names = [e["event"] for e in trace_events if e["ioc"] is denied]
    assert names[-2:] == ["qio_channel_tls_handshake_complete", "qio_channel_tls_credentials_deny"]
    await _close_all(denied, other)


async def test_no_trace_events_when_disabled(
    reactor: Any, server_creds: TLSCreds, client_creds: TLSCreds
) -> None:
    events: list[LogEvent] = []

    @provider(ILogObserver)
    def observe(event: LogEvent) -> None:
        if str(event.get("event", "")).startswith("qio_channel_tls_"):
            events.append(event)

    was = trace_enabled()
    set_trace_enabled(False)
    globalLogPublisher.addObserver(observe)
    try:
        client, server, _, _ = await _pair(server_creds, client_creds)
        await _close_all(client, server)
    finally:
        globalLogPublisher.removeObserver(observe)
        set_trace_enabled(was)
    assert events == []


# ---- the sans-IO pump ---------------------------------------------------------------------------


def _move(src: TLSPump, dst: TLSPump) -> int:
    data = src.take_output()
    if data:
        dst.feed(data)
    return len(data)


def _pump_pair(server_creds: TLSCreds, client_creds: TLSCreds) -> tuple[TLSPump, TLSPump]:
    c = TLSPump(client_creds.context, server=False, server_name="localhost")
    s = TLSPump(server_creds.context, server=True)
    done = [False, False]
    for _ in range(10):
        for i, p in enumerate((c, s)):
            if not done[i]:
                done[i] = p.handshake()
        moved = _move(c, s) + _move(s, c)
        if all(done) and not moved:
            break
    assert done == [True, True]
    return c, s


def test_pump_handshake_and_records(server_creds: TLSCreds, client_creds: TLSCreds) -> None:
    c, s = _pump_pair(server_creds, client_creds)
    assert c.protocol_version == "TLSv1.3"
    assert s.peer_certificate() is not None
    assert c.encrypt_chunks([b"ab", memoryview(b"cdef"), bytearray(b"g")], 1000) == 7
    assert c.encrypt_chunks([b"x" * 100], 10) == 10
    _move(c, s)
    out: list[bytes] = []
    assert s.decrypt(out, 3) == 3
    assert s.pending() == 4
    assert s.decrypt(out, 100) == 14
    assert b"".join(out) == b"abcdefg" + b"x" * 10
    assert s.needs_input and s.eof is None
    c.close_notify()
    _move(c, s)
    assert s.decrypt(out, 100) == 0 and s.eof is EOFKind.CLEAN


def test_pump_premature_eof_and_garbage(server_creds: TLSCreds, client_creds: TLSCreds) -> None:
    c, s = _pump_pair(server_creds, client_creds)
    c.encrypt(b"partial")
    data = c.take_output()
    s.feed(data[:-3])  # the stream ends inside a record
    s.feed(b"")
    out: list[bytes] = []
    assert s.decrypt(out, 100) == 0 and s.eof is EOFKind.PREMATURE
    assert s.decrypt(out, 100) == 0 and s.eof is EOFKind.PREMATURE  # stays ended
    with pytest.raises(TLSError):
        s.feed(b"more")

    c2, s2 = _pump_pair(server_creds, client_creds)
    s2.feed(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)  # an app record that fails to decrypt
    with pytest.raises(TLSError, match=r"bad record mac|decryption failed"):
        s2.decrypt(out, 100)
    del c2


def test_pump_handshake_eof_is_an_error(server_creds: TLSCreds) -> None:
    s = TLSPump(server_creds.context, server=True)
    assert s.handshake() is False
    s.feed(b"")
    with pytest.raises(TLSError, match="non-properly terminated"):
        s.handshake()


# ---- how much one reactor turn does -------------------------------------------------------------


async def test_tls_caps_a_socket_masters_read_burst(
    reactor: Any, server_creds: TLSCreds, client_creds: TLSCreds
) -> None:
    a, b = _socketpair()
    assert a.read_burst > tls_mod.TURN_BYTES  # the plain default reads more per turn
    b.read_burst = 64 * 1024
    with pytest.raises(ValueError, match="negative"):
        b.read_burst = -1
    client = TLSChannel.new_client(a, client_creds, "localhost")
    server = TLSChannel.new_server(b, server_creds)
    assert a.read_burst == tls_mod.TURN_BYTES  # decryption per turn is bounded
    assert b.read_burst == 64 * 1024  # a smaller one is kept
    await _handshake_both(client, server)
    await client.write_all(b"x" * 300_000)
    got = b""
    for _ in range(100):  # bounded: 300 kB arrive in a few reads
        got += await server.read(1 << 20)
        if len(got) == 300_000:
            break
    assert got == b"x" * 300_000
    await _close_all(client, server)


async def test_handshake_steps_past_the_turn_budget_wait_for_later_turns(
    reactor: Any, monkeypatch: pytest.MonkeyPatch, server_creds: TLSCreds, client_creds: TLSCreds
) -> None:
    """With no budget, each reactor turn runs one handshake step; all still complete."""
    monkeypatch.setattr(tls_mod, "HANDSHAKE_TURN_BUDGET", 0.0)
    turns = TurnCounter(reactor)
    steps_at: list[int] = []
    step = TLSChannel._handshake_step

    def counted_step(self: TLSChannel) -> None:
        steps_at.append(turns.tick)
        step(self)

    monkeypatch.setattr(TLSChannel, "_handshake_step", counted_step)
    turns.start()
    pairs = []
    for _ in range(6):
        a, b = _socketpair()
        pairs.append(
            (
                TLSChannel.new_client(a, client_creds, "localhost"),
                TLSChannel.new_server(b, server_creds),
            )
        )
    tasks = [c.handshake() for c, _ in pairs]  # all queued: none may run in this turn
    assert steps_at == []
    assert len(tls_mod._handshake_turns(reactor)._queue) == 6
    # A channel closed while it waits is skipped; the others go on.
    doomed_client, doomed_server = pairs.pop(0)
    await doomed_client.close()
    await doomed_server.close()
    tasks.pop(0)
    tasks += [s.handshake() for _, s in pairs]
    await gatherResults([t.deferred for t in tasks])
    turns.stop()
    assert all(c.handshake_complete and s.handshake_complete for c, s in pairs)
    assert len(steps_at) >= 2 * len(pairs)
    assert len(set(steps_at)) == len(steps_at), "two handshake steps ran in one reactor turn"
    for c, s in pairs:
        await _close_all(c, s)
