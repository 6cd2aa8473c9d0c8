"""Load held: small, fast versions of ``benchmarks/load_*.py`` that check correctness only.

* connections held open, then closed, leave no file descriptor, delayed call,
  selectable, thread or admission slot behind;
* concurrent TLS handshakes against a NetListener + ``TLSChannel.new_server``
  all succeed;
* a TLS recording of several synthetic channels plus concurrent handshakes
  completes while a 10 ms timer keeps firing (its lateness is collected, and
  judged only by the benchmark);
* slowloris against the real ``twistd qio record`` (plain and ``--tls-creds``):
  every dribbling or stalled connection is closed by the service's timeouts
  while a real QEMU migration is recorded complete next to them.

No wall-clock thresholds here: timeouts only bound the waits.  The helpers at
the top (``fd_count``, ``LatenessProbe``, ``slowloris``, ``run_slowloris``...)
are shared with the benchmarks, which import them from this module.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import select
import shutil
import socket
import ssl
import statistics
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import endpoints
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater

from qiotwisted.migration.wire import MultifdInit
from tests.pki import TestPKI, get_test_pki

# -- helpers shared with benchmarks/load_*.py ------------------------------------------------


def fd_count(pid: int | str = "self") -> int:
    """Open file descriptors of a process (``/proc/<pid>/fd``)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def thread_count(pid: int | str = "self") -> int:
    """Threads of a process (``/proc/<pid>/task``)."""
    return len(os.listdir(f"/proc/{pid}/task"))


def source_address(k: int, per_source: int = 50) -> str:
    """Loopback source address for client *k*: 127.0.0.2, .3, ... *per_source* each.

    Load clients come from addresses other than 127.0.0.1 (where QEMU
    connects from), at most *per_source* per address, below the service's
    per-peer limit.  Every 127/8 address is loopback on Linux.
    """
    return f"127.0.0.{2 + k // per_source}"


def percentile(samples: Sequence[float], q: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def stdlib_client_context(pki_dir: Path) -> ssl.SSLContext:
    """A stdlib TLS client with the client certificate of *pki_dir* (QEMU's layout)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki_dir / "ca-cert.pem")
    ctx.load_cert_chain(pki_dir / "client-cert.pem", pki_dir / "client-key.pem")
    return ctx


def client_hello(ctx: ssl.SSLContext) -> bytes:
    """The first flight (a ClientHello) *ctx* sends, from a memory BIO."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


class LatenessProbe:
    """A 10 ms timer in the reactor thread; records how late each firing is (seconds).

    Each firing schedules the next one ``interval`` later, so a sample is the
    delay between when the timer was due and when the reactor ran it: the
    time the reactor was busy elsewhere.
    """

    def __init__(self, reactor: Any, interval: float = 0.010) -> None:
        self.reactor = reactor
        self.interval = interval
        self.samples: list[float] = []
        self.at: list[float] = []  # perf_counter() of each sample
        self._call: Any = None
        self._due = 0.0

    def start(self) -> None:
        self._due = time.perf_counter() + self.interval
        self._call = self.reactor.callLater(self.interval, self._tick)

    def _tick(self) -> None:
        now = time.perf_counter()
        self.samples.append(max(0.0, now - self._due))
        self.at.append(now)
        self._due = now + self.interval
        self._call = self.reactor.callLater(self.interval, self._tick)

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def spikes(self, since: float, n: int = 5) -> list[tuple[float, float]]:
        """The *n* latest firings as (seconds after *since*, lateness ms), worst first."""
        worst = sorted(zip(self.samples, self.at, strict=True), reverse=True)[:n]
        return [(round(t - since, 2), round(s * 1000, 1)) for s, t in worst]

    def figures(self) -> dict[str, float]:
        ms = [s * 1000 for s in self.samples]
        return {
            "samples": len(ms),
            "p50_ms": round(percentile(ms, 50), 2),
            "p99_ms": round(percentile(ms, 99), 2),
            "max_ms": round(max(ms), 2) if ms else float("nan"),
            "mean_ms": round(statistics.fmean(ms), 2) if ms else float("nan"),
        }


@dataclass
class Straggler:
    """One slowloris connection and how it ended."""

    kind: str
    source: str
    opened: float = 0.0
    closed_after: float | None = None  # seconds from connect until the server closed it
    how: str = "still open"


def _wait_closed(sock: socket.socket, until: float) -> str | None:
    """Wait (bounded) for the peer to close *sock*; return how, or None if still open."""
    while time.monotonic() < until:
        r, _, _ = select.select([sock], [], [], min(0.2, max(0.0, until - time.monotonic())))
        if not r:
            continue
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError, OSError) as e:
            return f"reset ({type(e).__name__})"
        if not data:
            return "closed"
    return None


def _dribbler(
    s: Straggler, port: int, payload: bytes, period: float, deadline: float, go: threading.Event
) -> None:
    """Send *payload* one byte per *period* until the server closes the connection."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((s.source, 0))
        sock.connect(("127.0.0.1", port))
        s.opened = time.monotonic()
        go.wait(timeout=max(0.0, deadline - time.monotonic()))
        k = 0
        while time.monotonic() < deadline:
            try:
                sock.send(payload[k % len(payload) : k % len(payload) + 1])
            except OSError as e:
                s.closed_after, s.how = time.monotonic() - s.opened, f"send failed ({e.strerror})"
                return
            k += 1
            how = _wait_closed(sock, min(deadline, time.monotonic() + period))
            if how is not None:
                s.closed_after, s.how = time.monotonic() - s.opened, how
                return


def _tls_staller(
    s: Straggler, port: int, ctx: ssl.SSLContext | None, hello: bytes, deadline: float
) -> None:
    """Open TLS and stall: with *ctx*, finish the handshake and send nothing; else
    send only a ClientHello and wait."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as raw:
        raw.bind((s.source, 0))
        raw.connect(("127.0.0.1", port))
        s.opened = time.monotonic()
        if ctx is None:
            raw.sendall(hello)
            how = _wait_closed(raw, deadline)
        else:
            raw.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                tls = ctx.wrap_socket(raw, server_hostname="localhost")
            except (ssl.SSLError, OSError) as e:
                s.closed_after = time.monotonic() - s.opened
                s.how = f"handshake refused ({type(e).__name__})"
                return
            tls.settimeout(None)
            s.kind += "+handshaken"
            how = _wait_closed(tls, deadline)
            with contextlib.suppress(OSError):
                tls.close()
        if how is not None:
            s.closed_after, s.how = time.monotonic() - s.opened, how


def slowloris(
    port: int,
    *,
    dribblers: int,
    stallers: int,
    dribble: bytes,
    tls_ctx: ssl.SSLContext | None,
    hello: bytes,
    seconds: float,
    period: float = 1.0,
    per_source: int = 50,
    start_index: int = 0,
) -> tuple[list[Straggler], list[threading.Thread]]:
    """Start *dribblers* (one byte per *period*) and *stallers* (TLS, then silence).

    Every connection comes from a 127.0.0.x source (see :func:`source_address`),
    and gives up after *seconds* (still open: ``how == "still open"``).  Returns
    once every connection is open; join the threads for the outcome.
    """
    deadline = time.monotonic() + seconds
    go = threading.Event()
    out: list[Straggler] = []
    threads: list[threading.Thread] = []
    for k in range(dribblers + stallers):
        src = source_address(start_index + k, per_source)
        if k < dribblers:
            s = Straggler("dribbler", src)
            t = threading.Thread(
                target=_dribbler, args=(s, port, dribble, period, deadline, go), daemon=True
            )
        else:
            s = Straggler("tls-staller", src)
            t = threading.Thread(
                target=_tls_staller, args=(s, port, tls_ctx, hello, deadline), daemon=True
            )
        out.append(s)
        threads.append(t)
        t.start()
    # Bounded: every dribbler connected (or failed to) before the first bytes go.
    until = time.monotonic() + min(seconds, 30.0)
    while time.monotonic() < until and any(
        s.opened == 0 and t.is_alive() for s, t in zip(out, threads, strict=True)
    ):
        time.sleep(0.01)  # bounded wait for the client threads to connect (deadline above)
    go.set()
    return out, threads


def summarize(stragglers: Sequence[Straggler]) -> dict[str, Any]:
    """Counts by kind and outcome, and the close times (seconds)."""
    kinds: dict[str, dict[str, Any]] = {}
    for s in stragglers:
        k = kinds.setdefault(s.kind, {"n": 0, "closed": 0, "how": {}, "times": []})
        k["n"] += 1
        k["how"][s.how] = k["how"].get(s.how, 0) + 1
        if s.closed_after is not None:
            k["closed"] += 1
            k["times"].append(s.closed_after)
    for k in kinds.values():
        times = k.pop("times")
        k["close_s_min"] = round(min(times), 2) if times else None
        k["close_s_max"] = round(max(times), 2) if times else None
    return kinds


def run_slowloris(
    workdir: Path,
    pki: TestPKI,
    *,
    tls: bool,
    dribblers: int,
    stallers: int,
    timeout: float,
    ram_mib: int = 64,
    extra_args: Sequence[str] = (),
) -> dict[str, Any]:
    """Slowloris against ``twistd qio record`` while a real QEMU migrates into it.

    The service gets ``--handshake-timeout``/``--classify-timeout`` *timeout*
    and room for every connection (``--max-connections``); the clients come
    from 127.0.0.2+ (50 per address, under the per-peer limit), QEMU from
    127.0.0.1.  Returns the figures: the migration's outcome, the session's
    status, how each kind of straggler ended, refusal counts from the log,
    and the service's fd and thread counts before, during and after.
    """
    from tests.qemu import qemu_source
    from tests.twistd_proc import twistd_qio

    args = [
        "record",
        "--handshake-timeout",
        f"{timeout:g}",
        "--classify-timeout",
        f"{timeout:g}",
        "--max-connections",
        str(dribblers + stallers + 64),
        *extra_args,
    ]
    if tls:
        args += ["--tls-creds", str(pki.full_dir)]
    ctx = stdlib_client_context(pki.client_dir)
    hello = client_hello(ctx)
    # Plain service: the multifd init packet, one byte a second (classified as
    # multifd after 4 bytes, then the rest never comes in time).  TLS service:
    # a real ClientHello, one byte a second (the handshake never finishes).
    dribble = hello if tls else MultifdInit.build(bytes(16), 0)
    bound = timeout * 3 + 20  # how long a straggler waits for the service at most
    result: dict[str, Any] = {"tls": tls, "dribblers": dribblers, "stallers": stallers}
    with twistd_qio(workdir / ("svc-tls" if tls else "svc-plain"), args) as svc:
        pid = svc.proc.pid
        time.sleep(0.2)  # bounded: let the service settle (TLS creds load in a worker)
        result["fds_before"], result["threads_before"] = fd_count(pid), thread_count(pid)
        stragglers, threads = slowloris(
            svc.port,
            dribblers=dribblers,
            stallers=stallers,
            dribble=dribble,
            tls_ctx=ctx if tls else None,
            hello=hello,
            seconds=bound,
        )
        until = time.monotonic() + 3
        while fd_count(pid) < result["fds_before"] + dribblers and time.monotonic() < until:
            time.sleep(0.02)  # bounded: the service accepts them asynchronously
        result["fds_with_stragglers"] = fd_count(pid)
        t0 = time.monotonic()
        with qemu_source(workdir, ram_mib=ram_mib, tls_dir=pki.client_dir if tls else None) as src:
            src.set_capabilities()
            if tls:
                src.set_parameters(tls_creds="tls0", tls_hostname="localhost")
            else:
                src.set_parameters()
            src.migrate(f"tcp:127.0.0.1:{svc.port}")
            result["migration"] = src.wait_migration(timeout=120)["status"]
            result["migration_s"] = round(time.monotonic() - t0, 2)
            (manifest,) = svc.wait_sessions(1, timeout=60)
        result["session"] = manifest["status"]
        result["session_reason"] = manifest["reason"]
        result["session_bytes"] = sum(c["bytes"] for c in manifest["channels"])
        for t in threads:
            t.join(timeout=bound + 5)
        result["stragglers"] = summarize(stragglers)
        result["straggler_threads_alive"] = sum(t.is_alive() for t in threads)
        until = time.monotonic() + 10
        while fd_count(pid) > result["fds_before"] and time.monotonic() < until:
            time.sleep(0.05)  # bounded: closes finish asynchronously in the service
        result["fds_after"], result["threads_after"] = fd_count(pid), thread_count(pid)
        log = svc.log()
        result["log_refusals"] = log.count("refused 127.0.0.")
        result["log_timeouts"] = sum(
            log.count(needle) for needle in ("handshake-timeout", "timed out after")
        )
        result["log_tls_failed"] = log.count("TLS handshake failed")
        result["alive"] = svc.proc.poll() is None
    return result


# -- connections held, then closed ---------------------------------------------------------


@dataclass
class RecorderRig:
    reactor: Any
    output: Path
    tls: Any = None
    recorder: Any = None
    listener: Any = None
    port: int = 0
    channels: list[Any] = field(default_factory=list)

    async def open(self, **limits: Any) -> None:
        from qiotwisted.listener import NetListener
        from qiotwisted.migration.limits import Limits
        from qiotwisted.migration.recorder import Recorder

        self.recorder = Recorder(
            self.output,
            reactor=self.reactor,
            tls=self.tls,
            limits=Limits(**limits),
        )
        self.listener = NetListener(reactor=self.reactor, name="test-load")
        self.listener.set_client_func(self.recorder.client_func)
        (address,) = await self.listener.open("tcp:0:interface=127.0.0.1", backlog=1024)
        assert isinstance(address, IPv4Address)
        self.port = address.port

    async def close(self) -> None:
        for ch in self.channels:
            await ch.close()
        await self.listener.disconnect()
        await self.recorder.stop()

    async def connect(self, source: str = "127.0.0.1") -> Any:
        from qiotwisted.channel import SocketChannel

        ch = SocketChannel(reactor=self.reactor)
        ep = endpoints.TCP4ClientEndpoint(
            self.reactor, "127.0.0.1", self.port, bindAddress=(source, 0)
        )
        await endpoints.connectProtocol(ep, ch.protocol)
        return ch


def _pki() -> TestPKI:
    return get_test_pki(_PKI_ROOT)


_PKI_ROOT = Path(tempfile.mkdtemp(prefix="qiot-load-pki-"))
atexit.register(shutil.rmtree, _PKI_ROOT, True)


@pytest_twisted.async_yield_fixture
async def rig(reactor: Any, tmp_path: Path) -> AsyncIterator[RecorderRig]:
    r = RecorderRig(reactor, tmp_path / "rec")
    yield r
    if r.listener is not None:
        await r.close()


async def _until(reactor: Any, predicate: Any, what: str, seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if predicate():
            return
        await deferLater(reactor, 0.02)
    raise AssertionError(f"not reached in {seconds} s: {what}")


@pytest.mark.timeout_s(60)
async def test_connections_held_then_closed_leave_nothing_behind(rig: RecorderRig) -> None:
    n = 200
    await rig.open(
        max_connections=0, max_connections_per_peer=0, handshake_timeout=60, min_free_space=0
    )
    # One turn first: the test's own timeout (conftest) is set up after the
    # coroutine's first suspension.
    await deferLater(rig.reactor, 0)
    threads0 = threading.active_count()
    fds0 = fd_count()
    calls0 = set(rig.reactor.getDelayedCalls())

    def new_calls() -> list[Any]:
        return [c for c in rig.reactor.getDelayedCalls() if c not in calls0 and c.active()]

    clients = await gatherResults(
        [Deferred.fromCoroutine(rig.connect(source_address(k))) for k in range(n)]
    )
    await _until(rig.reactor, lambda: rig.recorder.admission.total == n, f"{n} admitted")
    # Each held connection costs two fds here (client and server end) and one
    # classify timer; none of them is refused or filed.
    assert fd_count() >= fds0 + 2 * n
    assert len(new_calls()) >= n
    await gatherResults([c.close() for c in clients])
    await _until(rig.reactor, lambda: rig.recorder.admission.total == 0, "every slot released")
    await _until(rig.reactor, lambda: fd_count() <= fds0, f"fd count back to {fds0}")
    await _until(rig.reactor, lambda: new_calls() == [], "every timer cancelled")
    assert threading.active_count() <= threads0
    assert rig.recorder.open_sessions == [] and rig.recorder.sessions_done == []
    assert not rig.output.exists() or [p.name for p in rig.output.iterdir()] == []


# -- TLS handshakes from concurrent clients ---------------------------------------------------


@pytest.mark.timeout_s(60)
async def test_concurrent_tls_handshakes_all_succeed(reactor: Any) -> None:
    from qiotwisted.channel import SocketChannel
    from qiotwisted.channel.tls import TLSChannel
    from qiotwisted.crypto import TLSCreds
    from qiotwisted.listener import NetListener

    pki = _pki()
    server_creds = TLSCreds.load_sync(pki.server_dir, "server")
    client_creds = TLSCreds.load_sync(pki.client_dir, "client")
    done: list[str] = []
    failed: list[BaseException] = []

    async def serve(ch: SocketChannel) -> None:
        tls = TLSChannel.new_server(ch, server_creds)
        try:
            await tls.handshake().deferred
            done.append(tls.get_peer_dn() or "")
            await tls.write_all(b"k")
        except Exception as e:
            failed.append(e)
        finally:
            await tls.close()

    listener = NetListener(reactor=reactor, name="test-load-tls")
    listener.set_client_func(lambda _l, ch, _d: Deferred.fromCoroutine(serve(ch)))
    (address,) = await listener.open("tcp:0:interface=127.0.0.1", backlog=256)
    assert isinstance(address, IPv4Address)

    async def client(k: int) -> bytes:
        ch = SocketChannel(reactor=reactor)
        ep = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", address.port)
        await endpoints.connectProtocol(ep, ch.protocol)
        tls = TLSChannel.new_client(ch, client_creds, "localhost")
        await tls.handshake().deferred
        data: bytes = await tls.read_all(1)
        await tls.close()
        return data

    try:
        # 60 handshakes, 20 at a time.
        for _ in range(3):
            got = await gatherResults([Deferred.fromCoroutine(client(k)) for k in range(20)])
            assert got == [b"k"] * 20
        await _until(reactor, lambda: len(done) + len(failed) == 60, "60 server handshakes")
    finally:
        await listener.disconnect()
    assert failed == [] and len(done) == 60
    assert set(done) == {pki.client_dn}


# -- a TLS recording, concurrent handshakes, and a 10 ms timer -----------------------------------


@pytest.mark.timeout_s(60)
async def test_tls_recording_with_handshakes_while_a_timer_runs(rig: RecorderRig) -> None:
    from qiotwisted.channel.tls import TLSChannel
    from qiotwisted.crypto import PRIORITY_QEMU_RECEIVER, TLSCreds
    from qiotwisted.migration._tlsup import TLSUpgrade
    from tests.test_wire import build_multifd, build_stream

    pki = _pki()
    rig.tls = TLSUpgrade(
        pki.server_dir,
        endpoint="server",
        priority=PRIORITY_QEMU_RECEIVER,
        reactor=rig.reactor,
    )
    await rig.open(min_free_space=0)
    client_creds = TLSCreds.load_sync(pki.client_dir, "client")
    probe = LatenessProbe(rig.reactor)
    probe.start()

    async def tls_connect(source: str = "127.0.0.1") -> Any:
        tls = TLSChannel.new_client(await rig.connect(source), client_creds, "localhost")
        await tls.handshake().deferred
        return tls

    async def send(data: bytes, tls: Any = None) -> None:
        tls = tls or await tls_connect()
        for k in range(0, len(data), 1 << 16):
            await tls.write_all(data[k : k + (1 << 16)])
        await tls.close()

    async def idle_handshake(k: int) -> None:
        tls = await tls_connect(source_address(k, 8))
        await tls.close()

    s = build_stream(parts=4)
    filed = rig.recorder.next_session()
    try:
        main = await tls_connect()
        await gatherResults(
            [Deferred.fromCoroutine(send(build_multifd(s.ram_sections, k))) for k in range(3)]
            + [Deferred.fromCoroutine(idle_handshake(k)) for k in range(24)]
        )
        await send(s.data, main)
        path, status = await filed
    finally:
        probe.stop()
    assert status == "complete", (path / "manifest.json").read_text()
    assert sorted(p.name for p in path.iterdir() if p.suffix == ".bin") == [
        "main.bin",
        "multifd-0.bin",
        "multifd-1.bin",
        "multifd-2.bin",
    ]
    assert (path / "main.bin").read_bytes() == s.data
    figures = probe.figures()
    assert figures["samples"] > 0 and figures["max_ms"] >= 0


# -- slowloris against the real service ---------------------------------------------------------


@pytest.mark.qemu
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_slowloris_is_closed_by_timeouts_while_qemu_records(tmp_path: Path, tls: bool) -> None:
    """20 one-byte-a-second connections and 20 TLS stallers, 1 s timeouts, a real migration."""
    r = run_slowloris(tmp_path, _pki(), tls=tls, dribblers=20, stallers=20, timeout=1.0)
    assert r["migration"] == "completed", r
    assert r["session"] == "complete", r
    assert r["alive"] and r["straggler_threads_alive"] == 0, r
    kinds = r["stragglers"]
    # Every straggler was closed by the service, none outlived its wait.
    for name, k in kinds.items():
        assert k["closed"] == k["n"], (name, k)
        assert "still open" not in k["how"], (name, k)
    assert kinds["dribbler"]["n"] == 20
    if tls:
        # ClientHello dribbled: the handshake timeout; handshaken and silent: the
        # classify timeout.
        assert kinds["tls-staller+handshaken"]["n"] == 20, kinds
        assert r["log_tls_failed"] >= 20 and r["log_timeouts"] >= 40, r
    else:
        # The multifd init dribbled: the classify timeout; a ClientHello on the
        # plain port: refused at once (trap 12), never handshaken.
        assert kinds["tls-staller"]["n"] == 20, kinds
        assert r["log_timeouts"] >= 20 and r["log_refusals"] >= 40, r
    assert r["fds_after"] <= r["fds_before"], r
