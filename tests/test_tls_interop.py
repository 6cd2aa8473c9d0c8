"""TLSChannel against TLS peers nobody here wrote: stdlib ``ssl``, OpenSSL and GnuTLS tools.

Each test moves a few hundred KB each way and compares, with certificates
checked on both ends (client certificates required).  A missing tool fails
the test.  Every subprocess wait is bounded, and only the processes a test
started are ended (by PID).

``gnutls-serv`` has no option to choose its listening address and binds every
interface, so it runs in a private network namespace (``unshare -rn``: only a
loopback device) next to a ``socat`` that bridges a UNIX socket in the
shared filesystem to it; the TLS channel connects to that UNIX socket.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from twisted.internet import task, threads
from twisted.internet.defer import Deferred

from qiotwisted.channel import SocketChannel, port_of
from qiotwisted.channel.tls import TLSChannel
from qiotwisted.crypto import TLSCreds
from qiotwisted.crypto import pki as _pki
from qiotwisted.errors import ChannelError
from tests.pki import CLIENT_DN, SERVER_DN, TestPKI, pki_fixture  # noqa: F401

UP = bytes((i * 7 + 3) % 256 for i in range(300_000))  # client -> server
DOWN = bytes((i * 13 + 5) % 256 for i in range(200_000))  # server -> client
# gnutls-serv's echo mode is line-based C strings: text lines, no NUL, no CR.
TEXT = b"".join(
    b"line %06d: the quick brown fox jumps over the lazy dog\n" % i for i in range(6000)
)
WAIT = 20.0  # bound on any one subprocess or thread wait (seconds)

pytestmark = pytest.mark.timeout_s(60)


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path is not None, f"{name} is not installed (the interop tests need it)"
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _process(cmd: list[str], **kw: Any) -> Iterator[subprocess.Popen[bytes]]:
    """Run *cmd*; on exit end it (SIGTERM, then SIGKILL) by PID if it still runs."""
    proc = subprocess.Popen(cmd, **kw)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def _read_all(stream: IO[bytes]) -> Deferred[bytes]:
    """Read *stream* to EOF in a thread (ends when the process exits or is ended)."""
    return threads.deferToThread(stream.read)


def _feed(stream: IO[bytes], data: bytes, *, close: bool) -> Deferred[None]:
    def run() -> None:
        try:
            stream.write(data)
            stream.flush()
            if close:
                stream.close()
        except (BrokenPipeError, ValueError):
            pass  # the process went away first; the test's comparison reports it

    return threads.deferToThread(run)


async def _connect(reactor: Any, address: str) -> SocketChannel:
    """Connect, retrying while the freshly started server is not listening yet."""
    last: Exception | None = None
    for _ in range(200):
        try:
            return await SocketChannel.connect(address, reactor=reactor).deferred
        except ChannelError as e:
            last = e
            await task.deferLater(reactor, 0.05)
    raise AssertionError(f"could not connect to {address}: {last}")


async def _client(
    reactor: Any, address: str, creds: TLSCreds, hostname: str
) -> tuple[TLSChannel, SocketChannel]:
    sock = await _connect(reactor, address)
    tls = TLSChannel.new_client(sock, creds, hostname)
    await tls.handshake()
    return tls, sock


async def _read_to_eof(ch: TLSChannel, limit: int) -> bytes:
    parts: list[bytes] = []
    total = 0
    while total <= limit:
        data = await ch.read(1 << 20)
        if not data:
            break
        parts.append(data)
        total += len(data)
    return b"".join(parts)


@pytest.fixture(scope="module")
def creds(pki: TestPKI) -> tuple[TLSCreds, TLSCreds]:
    return (
        TLSCreds.load_sync(pki.server_dir, "server"),
        TLSCreds.load_sync(pki.client_dir, "client"),
    )


# ---- Python's ssl module ------------------------------------------------------------------------


def _stdlib_echo_server(
    lsock: socket.socket, pki: TestPKI, version: ssl.TLSVersion
) -> tuple[int, str, str]:
    """Accept one client, echo until its close_notify, answer with ours (a thread)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.maximum_version = version
    ctx.load_cert_chain(pki.server_dir / _pki.SERVER_CERT, pki.server_dir / _pki.SERVER_KEY)
    ctx.load_verify_locations(pki.server_dir / _pki.CA_CERT)
    ctx.verify_mode = ssl.CERT_REQUIRED
    lsock.settimeout(WAIT)
    conn, _ = lsock.accept()
    conn.settimeout(WAIT)
    with ctx.wrap_socket(conn, server_side=True) as s:
        total = 0
        while data := s.recv(65536):
            s.sendall(data)
            total += len(data)
        cert: Any = s.getpeercert()
        peer = dict(x[0] for x in cert["subject"])
        negotiated = str(s.version())
        s.unwrap()  # our close_notify
    return total, peer["commonName"], negotiated


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2], ids=["TLSv1.3", "TLSv1.2"]
)
async def test_stdlib_ssl_server_with_our_client(
    reactor: Any, pki: TestPKI, creds: tuple[TLSCreds, TLSCreds], version: ssl.TLSVersion
) -> None:
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    port = lsock.getsockname()[1]
    try:
        serving = threads.deferToThread(_stdlib_echo_server, lsock, pki, version)
        tls, _ = await _client(reactor, f"127.0.0.1:{port}", creds[1], "127.0.0.1")
        assert tls.get_peer_dn() == SERVER_DN
        echoed = tls.read_all(len(UP))
        await tls.write_all(UP)
        assert await echoed == UP
        await tls.bye()
        tls.relaxed_eof = False
        assert await tls.read(10) == b""  # the server's close_notify
        total, peer_cn, negotiated = await serving
        await tls.close()
    finally:
        lsock.close()
    assert total == len(UP)
    assert peer_cn == "qemu-client"
    assert negotiated == tls.protocol_version == version.name.replace("_", ".")


def _stdlib_client(port: int, pki: TestPKI, version: ssl.TLSVersion) -> tuple[bytes, str]:
    """Send UP, read everything back until the server's close_notify (a thread)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.maximum_version = version
    ctx.load_verify_locations(pki.client_dir / _pki.CA_CERT)
    ctx.load_cert_chain(pki.client_dir / _pki.CLIENT_CERT, pki.client_dir / _pki.CLIENT_KEY)
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(UP)
            got = bytearray()
            while data := s.recv(65536):
                got += data
            return bytes(got), str(s.version())


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2], ids=["TLSv1.3", "TLSv1.2"]
)
async def test_stdlib_ssl_client_with_our_server(
    reactor: Any, pki: TestPKI, creds: tuple[TLSCreds, TLSCreds], version: ssl.TLSVersion
) -> None:
    lis = SocketChannel.listen("127.0.0.1:0")
    port = port_of(lis.get_local_address())
    client = threads.deferToThread(_stdlib_client, port, pki, version)
    sock = await lis.accept()
    await lis.close()
    tls = TLSChannel.new_server(sock, creds[0])
    await tls.handshake()
    assert tls.get_peer_dn() == CLIENT_DN
    assert await tls.read_all(len(UP)) == UP
    await tls.write_all(DOWN)
    await tls.bye()
    got, negotiated = await client
    await tls.close()
    assert got == DOWN
    assert negotiated == tls.protocol_version


# ---- OpenSSL's s_server / s_client --------------------------------------------------------------


async def test_openssl_s_server_with_our_client(
    reactor: Any, pki: TestPKI, creds: tuple[TLSCreds, TLSCreds]
) -> None:
    openssl = _tool("openssl")
    port = _free_port()
    d = pki.full_dir
    cmd = [
        openssl, "s_server", "-accept", f"127.0.0.1:{port}", "-naccept", "1", "-quiet",
        "-cert", str(d / _pki.SERVER_CERT), "-key", str(d / _pki.SERVER_KEY),
        "-CAfile", str(d / _pki.CA_CERT), "-Verify", "1", "-verify_return_error",
    ]  # fmt: skip
    with _process(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        errors = _read_all(proc.stderr)
        tls, _ = await _client(reactor, f"127.0.0.1:{port}", creds[1], "localhost")
        # Client first: once s_server has printed our bytes its handshake is
        # over.  (Its loop, handed stdin data and the ClientHello in one
        # select(), completes the handshake inside SSL_write and then blocks
        # in SSL_read on the stale readable flag: data must not wait on its
        # stdin before that.)
        printed = threads.deferToThread(_read_exactly, proc.stdout, len(UP))
        await tls.write_all(UP)
        assert await printed.addTimeout(WAIT, reactor) == UP
        # s_server sends what it reads on stdin; keep stdin open (EOF would end it).
        feeding = _feed(proc.stdin, DOWN, close=False)
        assert await tls.read_all(len(DOWN)).addTimeout(WAIT, reactor) == DOWN
        await feeding
        await tls.bye()
        await tls.close()
        rest = await _read_all(proc.stdout).addTimeout(WAIT, reactor)
        rc = await threads.deferToThread(proc.wait, WAIT)
        err = (await errors).decode(errors="replace")
    assert rest == b"", err
    assert rc == 0, err
    assert "qemu-client" in err  # s_server verified our client certificate


def _read_exactly(stream: IO[bytes], n: int) -> bytes:
    """Read *n* bytes (fewer at EOF) from a pipe (a thread)."""
    parts: list[bytes] = []
    got = 0
    while got < n:
        data = stream.read1(n - got)  # type: ignore[attr-defined]  # a buffered pipe: read1 exists
        if not data:
            break
        parts.append(data)
        got += len(data)
    return b"".join(parts)


async def test_openssl_s_client_with_our_server(
    reactor: Any, pki: TestPKI, creds: tuple[TLSCreds, TLSCreds]
) -> None:
    openssl = _tool("openssl")
    lis = SocketChannel.listen("127.0.0.1:0")
    port = port_of(lis.get_local_address())
    d = pki.full_dir
    cmd = [
        openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
        "-verify_hostname", "localhost", "-verify_return_error", "-quiet",
        "-CAfile", str(d / _pki.CA_CERT),
        "-cert", str(d / _pki.CLIENT_CERT), "-key", str(d / _pki.CLIENT_KEY),
    ]  # fmt: skip
    with _process(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        output = _read_all(proc.stdout)
        errors = _read_all(proc.stderr)
        sock = await lis.accept().addTimeout(WAIT, reactor)
        await lis.close()
        tls = TLSChannel.new_server(sock, creds[0])
        await tls.handshake()
        assert tls.get_peer_dn() == CLIENT_DN
        await _feed(proc.stdin, UP, close=True)  # -quiet: stdin EOF does not end s_client
        assert await tls.read_all(len(UP)) == UP
        await tls.write_all(DOWN)
        await tls.bye()
        await tls.close()
        got = await output.addTimeout(WAIT, reactor)
        rc = await threads.deferToThread(proc.wait, WAIT)
        err = (await errors).decode(errors="replace")
    assert got == DOWN, err
    assert rc == 0, err


# ---- GnuTLS's gnutls-serv / gnutls-cli ----------------------------------------------------------


def _kill_if(pid: int, name: str) -> None:
    """End *pid* if it is still the *name* process we started."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return
    if name.encode() in cmdline:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def test_gnutls_serv_with_our_client(
    reactor: Any, pki: TestPKI, creds: tuple[TLSCreds, TLSCreds], tmp_path: Path
) -> None:
    gnutls_serv = _tool("gnutls-serv")
    _tool("socat")
    _tool("unshare")
    d = pki.full_dir
    path = tmp_path / "gnutls.sock"
    script = (
        "ip link set lo up || exit 1\n"
        f"socat UNIX-LISTEN:{path} TCP:127.0.0.1:5556 &\n"
        'echo "socat $!"\n'
        f"exec {gnutls_serv} --echo --crlf -p 5556 --require-client-cert --verify-client-cert"
        f" --x509certfile {d / _pki.SERVER_CERT} --x509keyfile {d / _pki.SERVER_KEY}"
        f" --x509cafile {d / _pki.CA_CERT}\n"
    )
    socat_pid = 0
    with _process(
        ["unshare", "-rn", "sh", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    ) as proc:
        assert proc.stdout is not None
        try:
            first = await threads.deferToThread(proc.stdout.readline)
            assert first.startswith(b"socat "), first
            socat_pid = int(first.split()[1])
            for _ in range(50):  # bounded: a few lines of start-up chatter
                line = await threads.deferToThread(proc.stdout.readline)
                assert line, "gnutls-serv exited during start-up"
                if b"listening on IPv4" in line:
                    break
            log = _read_all(proc.stdout)
            tls, _ = await _client(reactor, f"unix:{path}", creds[1], "localhost")
            assert tls.get_peer_dn() == SERVER_DN
            echoed = tls.read_all(len(TEXT))
            await tls.write_all(TEXT)
            assert await echoed.addTimeout(WAIT, reactor) == TEXT
            await tls.bye()
            await tls.close()
            proc.terminate()
            text = (await log.addTimeout(WAIT, reactor)).decode(errors="replace")
        finally:
            if socat_pid:
                _kill_if(socat_pid, "socat")
    assert "qemu-client" in text  # gnutls-serv verified our client certificate


async def test_gnutls_cli_with_our_server(
    reactor: Any, pki: TestPKI, creds: tuple[TLSCreds, TLSCreds], tmp_path: Path
) -> None:
    gnutls_cli = _tool("gnutls-cli")
    lis = SocketChannel.listen("127.0.0.1:0")
    port = port_of(lis.get_local_address())
    d = pki.full_dir
    logfile = tmp_path / "gnutls-cli.log"
    cmd = [
        gnutls_cli, "-p", str(port), "127.0.0.1", f"--logfile={logfile}",
        f"--x509cafile={d / _pki.CA_CERT}",
        f"--x509certfile={d / _pki.CLIENT_CERT}", f"--x509keyfile={d / _pki.CLIENT_KEY}",
    ]  # fmt: skip
    with _process(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        output = _read_all(proc.stdout)
        errors = _read_all(proc.stderr)
        sock = await lis.accept().addTimeout(WAIT, reactor)
        await lis.close()
        tls = TLSChannel.new_server(sock, creds[0], relaxed_eof=False)
        await tls.handshake()
        assert tls.get_peer_dn() == CLIENT_DN
        # gnutls-cli sends stdin, then close_notify at its EOF, and reads on.
        feeding = _feed(proc.stdin, UP, close=True)
        got_up = await _read_to_eof(tls, len(UP))
        await feeding
        assert got_up == UP
        await tls.write_all(DOWN)
        await tls.bye()
        await tls.close()
        got = await output.addTimeout(WAIT, reactor)
        rc = await threads.deferToThread(proc.wait, WAIT)
        err = (await errors).decode(errors="replace")
    assert got == DOWN, err + logfile.read_text(errors="replace")
    assert rc == 0, err
