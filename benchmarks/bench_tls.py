"""TLS through ``TLSChannel`` vs Twisted's own TLS (and a stdlib ``ssl`` server).

Two measurements, each over loopback TCP with the same PKI (ECDSA P-256, made
by ``qiotwisted.crypto.generate_pki_sync``), client certificates required:

1. **Full handshakes per second.**  A *server* process (pinned to one core)
   accepts connections, completes each handshake, writes one byte and closes.
   Variants: ``channel`` (``SocketChannel`` + ``TLSChannel.new_server`` +
   ``handshake()``: qiotwisted), ``twisted`` (``TLSMemoryBIOFactory`` with
   ``CertificateOptions``, the ``IHandshakeListener`` callback), and ``stdlib``
   (a blocking ``ssl`` accept loop, the floor).  A *client* process (pinned to
   the other core, stdlib ``ssl`` in threads, no resumption) drives load.
   The server reports handshakes per second of its own CPU time (the client
   may be the bottleneck of the wall rate; the server's CPU per handshake is
   what the implementations differ in), and the wall rate as well.
2. **Bulk bytes.**  A *receiver* process (one core) accepts one TLS
   connection and counts bytes until EOF; a stdlib ``ssl`` *sender* process
   (the other core) streams ``--size`` bytes.  Variants: ``channel`` (a pull
   loop ``await tls.read(1 MiB)``) and ``twisted`` (a Protocol under
   ``TLSMemoryBIOFactory`` counting ``dataReceived``).  The receiver reports
   its peak RSS (``ru_maxrss``); a final pair of runs streams ``--rss-size``
   bytes to show that RSS does not grow with the stream.

Variants are interleaved round by round; figures are medians; ratios are
printed against Twisted (goal >= 0.9x).  Bounded: about two minutes.

    python benchmarks/bench_tls.py
    python benchmarks/bench_tls.py --rounds 3 --hs-seconds 2 --size 128M --rss-size 0
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from qiotwisted.channel import port_of

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._rounds import bulk_rounds

SEND_CHUNK = 1 << 20


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def pin(cpu: int | None) -> None:
    if cpu is None or not hasattr(os, "sched_setaffinity"):
        return
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError:
        pass  # fewer cores than asked for: run unpinned


def report(**fields: Any) -> None:
    fields["rss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(fields), flush=True)


# ---- servers (handshake benchmark) ------------------------------------------------------------


def twisted_options(pki: Path) -> Any:
    """Twisted's own TLS configuration for the same files (verify-peer, like QEMU)."""
    warnings.simplefilter("ignore", DeprecationWarning)  # pyOpenSSL X509/PKey deprecations
    from twisted.internet import ssl as tssl

    ca = tssl.Certificate.loadPEM((pki / "ca-cert.pem").read_bytes())
    server = tssl.PrivateCertificate.loadPEM(
        (pki / "server-key.pem").read_bytes() + (pki / "server-cert.pem").read_bytes()
    )
    return server.options(ca)


def run_hs_server(variant: str, pki: Path, seconds: float) -> None:
    """Serve full handshakes until the client's connections stop (or *seconds* + slack)."""
    if variant == "stdlib":
        run_hs_server_stdlib(pki)
        return
    from twisted.internet import defer, task

    state: dict[str, Any] = {
        "n": 0, "t0": 0.0, "c0": 0.0, "t1": 0.0, "c1": 0.0, "first": True, "version": "",
        "cipher": "",
    }  # fmt: skip

    def started() -> None:
        if state["first"]:
            state["first"] = False
            state["t0"] = time.perf_counter()
            state["c0"] = time.process_time()

    def finished(version: str, cipher: str) -> None:
        state["n"] += 1
        state["version"], state["cipher"] = version, cipher
        state["t1"] = time.perf_counter()
        state["c1"] = time.process_time()

    async def main(reactor: Any) -> None:
        done: defer.Deferred[None] = defer.Deferred()
        if variant == "channel":
            from qiotwisted import NetListener
            from qiotwisted.channel.tls import TLSChannel
            from qiotwisted.crypto import TLSCreds
            from qiotwisted.task import Task

            creds = TLSCreds.load_sync(pki, "server")

            # QEMU's shape: a NetListener client func wraps the channel and
            # starts the handshake; the handshake's completion func answers.
            def handshaken(t: Task[Any], tls: TLSChannel) -> None:
                if t.propagate_error() is None:
                    finished(tls.protocol_version, tls.cipher or "")
                    tls.write_nowait(b"!")
                tls.close()

            def client(listener: Any, sock: Any, data: Any) -> None:
                started()
                tls = TLSChannel.new_server(sock, creds)
                tls.handshake(handshaken, tls)

            listener = NetListener(reactor=reactor)
            listener.set_client_func(client)
            (addr,) = await listener.open("tcp:0:interface=127.0.0.1", backlog=128)
            print(port_of(addr), flush=True)
        else:
            from twisted.internet import protocol
            from twisted.internet.interfaces import IHandshakeListener
            from twisted.protocols.tls import TLSMemoryBIOFactory
            from zope.interface import implementer

            @implementer(IHandshakeListener)
            class OneByte(protocol.Protocol):
                def connectionMade(self) -> None:
                    started()

                def handshakeCompleted(self) -> None:
                    transport: Any = (
                        self.transport
                    )  # a TLS transport: getHandle() is its Connection
                    conn = transport.getHandle()
                    finished(conn.get_protocol_version_name(), conn.get_cipher_name())
                    transport.write(b"!")
                    transport.loseConnection()

            factory = TLSMemoryBIOFactory(
                twisted_options(pki), False, protocol.Factory.forProtocol(OneByte)
            )
            port = reactor.listenTCP(0, factory, interface="127.0.0.1", backlog=128)
            print(port.getHost().port, flush=True)

        # The orchestrator closes our stdin when the client has finished.
        def stdin_closed() -> None:
            if not done.called:
                done.callback(None)

        threading.Thread(
            target=lambda: (sys.stdin.read(), reactor.callFromThread(stdin_closed)),
            daemon=True,
        ).start()
        await done
        report(
            handshakes=state["n"], seconds=state["t1"] - state["t0"],
            cpu_seconds=state["c1"] - state["c0"], version=state["version"],
            cipher=state["cipher"],
        )  # fmt: skip

    task.react(lambda r: defer.ensureDeferred(main(r)))


def run_hs_server_stdlib(pki: Path) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki / "server-cert.pem", pki / "server-key.pem")
    ctx.load_verify_locations(pki / "ca-cert.pem")
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.num_tickets = 0
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(128)
    print(lsock.getsockname()[1], flush=True)
    stop = threading.Event()

    def wait_stdin() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=wait_stdin, daemon=True).start()
    lsock.settimeout(0.2)
    n = 0
    t0 = c0 = t1 = c1 = 0.0
    version = cipher = ""
    while not stop.is_set():
        try:
            conn, _ = lsock.accept()
        except TimeoutError:
            continue
        if not n:
            t0, c0 = time.perf_counter(), time.process_time()
        conn.settimeout(10)
        try:
            with ctx.wrap_socket(conn, server_side=True) as s:
                s.sendall(b"!")
                negotiated = s.cipher()
                assert negotiated is not None  # the handshake is done inside wrap_socket
                version, cipher = str(s.version()), negotiated[0]
                n += 1
                t1, c1 = time.perf_counter(), time.process_time()
        except OSError:
            pass
    report(handshakes=n, seconds=t1 - t0, cpu_seconds=c1 - c0, version=version, cipher=cipher)


def run_hs_client(port: int, pki: Path, seconds: float, concurrency: int) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki / "ca-cert.pem")
    ctx.load_cert_chain(pki / "client-cert.pem", pki / "client-key.pem")
    deadline = time.monotonic() + seconds
    counts = [0] * concurrency
    errors: list[str] = []

    def worker(i: int) -> None:
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                    with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                        if s.recv(1) != b"!":
                            raise RuntimeError("no byte after the handshake")
                counts[i] += 1
            except (OSError, RuntimeError) as e:
                errors.append(repr(e))
                if len(errors) > 20:
                    return

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    print(json.dumps({"handshakes": sum(counts), "errors": errors[:3]}), flush=True)


# ---- bulk ---------------------------------------------------------------------------------------


def run_bulk_sender(port: int, pki: Path, size: int) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki / "ca-cert.pem")
    ctx.load_cert_chain(pki / "client-cert.pem", pki / "client-key.pem")
    payload = memoryview(bytes(range(256)) * (SEND_CHUNK // 256))
    with socket.create_connection(("127.0.0.1", port)) as raw:
        s = ctx.wrap_socket(raw, server_hostname="localhost")  # takes over raw's fd
        left = size
        while left:
            n = min(left, SEND_CHUNK)
            s.sendall(payload[:n])
            left -= n
        # A bare FIN, as QEMU 7.2 ends its TLS streams (no close_notify), then
        # wait for the receiver to close so it sees the EOF first.
        s.shutdown(socket.SHUT_WR)  # (also drops the TLS layer: recv is raw now)
        s.settimeout(120)
        while s.recv(65536):
            pass
        s.close()


def run_bulk_receiver(variant: str, pki: Path, nbytes: int) -> None:
    from twisted.internet import defer, task

    async def main(reactor: Any) -> None:
        if variant == "channel":
            from qiotwisted.channel import SocketChannel
            from qiotwisted.channel.tls import TLSChannel
            from qiotwisted.crypto import TLSCreds

            creds = TLSCreds.load_sync(pki, "server")
            lis = SocketChannel.listen("127.0.0.1:0")
            print(port_of(lis.get_local_address()), flush=True)
            sock = await lis.accept()
            await lis.close()
            tls = TLSChannel.new_server(sock, creds)
            await tls.handshake()
            t0, c0 = time.perf_counter(), time.process_time()
            total = 0
            read = tls.read
            while data := await read(nbytes):
                total += len(data)
            t1, c1 = time.perf_counter(), time.process_time()
            cipher = tls.cipher
            await tls.close()
            report(bytes=total, seconds=t1 - t0, cpu_seconds=c1 - c0, cipher=cipher)
            return

        from twisted.internet import protocol
        from twisted.internet.interfaces import IHandshakeListener
        from twisted.protocols.tls import TLSMemoryBIOFactory
        from zope.interface import implementer

        done: defer.Deferred[None] = defer.Deferred()

        @implementer(IHandshakeListener)
        class Counter(protocol.Protocol):
            total = 0
            t0 = c0 = 0.0
            cipher = ""

            def handshakeCompleted(self) -> None:
                self.t0, self.c0 = time.perf_counter(), time.process_time()
                transport: Any = self.transport  # a TLS transport: getHandle() is its Connection
                handle = transport.getHandle()
                self.cipher = handle.get_cipher_name()

            def dataReceived(self, data: bytes) -> None:
                self.total += len(data)

            def connectionLost(self, reason: Any = None) -> None:
                t1, c1 = time.perf_counter(), time.process_time()
                report(
                    bytes=self.total, seconds=t1 - self.t0, cpu_seconds=c1 - self.c0,
                    cipher=self.cipher,
                )  # fmt: skip
                done.callback(None)

        class Once(protocol.Factory):
            def buildProtocol(self, addr: Any) -> protocol.Protocol:
                port.stopListening()
                return Counter()

        factory = TLSMemoryBIOFactory(twisted_options(pki), False, Once())
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        print(port.getHost().port, flush=True)
        await done

    task.react(lambda r: defer.ensureDeferred(main(r)))


# ---- orchestration -------------------------------------------------------------------------------


def _me() -> list[str]:
    return [sys.executable, os.path.abspath(__file__)]


def _end(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


def hs_run(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    scmd = [*_me(), "--role", "hs-server", "--variant", variant, "--pki", args.pki]
    scmd += ["--cpu", str(args.server_cpu), "--hs-seconds", str(args.hs_seconds)]
    server = subprocess.Popen(scmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    client: subprocess.Popen[str] | None = None
    try:
        assert server.stdout is not None and server.stdin is not None
        port = int(server.stdout.readline())
        ccmd = [*_me(), "--role", "hs-client", "--port", str(port), "--pki", args.pki]
        ccmd += ["--cpu", str(args.client_cpu), "--hs-seconds", str(args.hs_seconds)]
        ccmd += ["--concurrency", str(args.concurrency)]
        client = subprocess.Popen(ccmd, stdout=subprocess.PIPE, text=True)
        out, _ = client.communicate(timeout=args.hs_seconds + 60)
        cres = json.loads(out)
        server.stdin.close()  # the server reports and exits
        sres: dict[str, Any] = json.loads(server.stdout.readline())
        server.wait(timeout=30)
    finally:
        _end(server)
        if client is not None:
            _end(client)
    if cres["errors"]:
        raise SystemExit(f"{variant}: client errors {cres['errors']}")
    sres["client_handshakes"] = cres["handshakes"]
    return sres


def bulk_run(variant: str, size: int, args: argparse.Namespace) -> dict[str, Any]:
    rcmd = [*_me(), "--role", "bulk-receiver", "--variant", variant, "--pki", args.pki]
    rcmd += ["--cpu", str(args.server_cpu), "--nbytes", str(args.nbytes)]
    recv = subprocess.Popen(rcmd, stdout=subprocess.PIPE, text=True)
    sender: subprocess.Popen[bytes] | None = None
    try:
        assert recv.stdout is not None
        port = int(recv.stdout.readline())
        scmd = [*_me(), "--role", "bulk-sender", "--port", str(port), "--pki", args.pki]
        scmd += ["--size", str(size), "--cpu", str(args.client_cpu)]
        sender = subprocess.Popen(scmd)
        line = recv.stdout.readline()
        sender.wait(timeout=120)
        recv.wait(timeout=120)
    finally:
        _end(recv)
        if sender is not None:
            _end(sender)
    result: dict[str, Any] = json.loads(line)
    if result["bytes"] != size:
        raise SystemExit(f"{variant}: received {result['bytes']} of {size} bytes")
    return result


def handshake_benchmark(args: argparse.Namespace) -> None:
    variants = ["twisted", "channel", "stdlib"]
    labels = {
        "twisted": "Twisted TLSMemoryBIOFactory",
        "channel": "TLSChannel (qiotwisted)",
        "stdlib": "stdlib ssl blocking server",
    }
    cpu_rate: dict[str, list[float]] = {v: [] for v in variants}
    wall_rate: dict[str, list[float]] = {v: [] for v in variants}
    per_round: list[float] = []
    print(
        f"full TLS handshakes (client certs required, ECDSA P-256): {args.rounds} interleaved "
        f"rounds of {args.hs_seconds:g} s, {args.concurrency} client threads; server on CPU "
        f"{args.server_cpu}, client on CPU {args.client_cpu}"
    )
    for r in range(args.rounds):
        order = variants if r % 2 == 0 else variants[::-1]
        this: dict[str, float] = {}
        for v in order:
            res = hs_run(v, args)
            n = res["handshakes"]
            cpu = n / max(res["cpu_seconds"], 1e-9)
            wall = n / max(res["seconds"], 1e-9)
            cpu_rate[v].append(cpu)
            wall_rate[v].append(wall)
            this[v] = cpu
            print(
                f"  round {r + 1} {v:8s} {n:6d} handshakes  {cpu:7.0f}/server-cpu-s  "
                f"{wall:7.0f}/s wall  {1e6 / cpu:6.0f} us cpu each  {res['version']} "
                f"{res['cipher']}  RSS {res['rss_kib'] / 1024:.1f} MiB"
            )
        per_round.append(this["channel"] / this["twisted"])
    mc = {v: statistics.median(cpu_rate[v]) for v in variants}
    mw = {v: statistics.median(wall_rate[v]) for v in variants}
    print()
    print(f"{'server (medians)':<32}{'hs/cpu-s':>10}{'us/hs':>8}{'hs/s wall':>11}")
    for v in variants:
        print(f"{labels[v]:<32}{mc[v]:>10.0f}{1e6 / mc[v]:>8.0f}{mw[v]:>11.0f}")
    print(
        f"ratio TLSChannel / Twisted: per server CPU second {mc['channel'] / mc['twisted']:.2f}x, "
        f"wall {mw['channel'] / mw['twisted']:.2f}x, median of per-round ratios "
        f"{statistics.median(per_round):.2f}x  (goal >= 0.9x); "
        f"TLSChannel / stdlib {mc['channel'] / mc['stdlib']:.2f}x"
    )


def bulk_benchmark(args: argparse.Namespace) -> None:
    size = parse_size(args.size)
    variants = ["twisted", "channel"]
    labels = {"twisted": "Twisted TLS Protocol", "channel": "TLSChannel.read (qiotwisted)"}
    print(
        f"bulk TLS receive: {args.rounds} interleaved rounds of {size / (1 << 20):.0f} MiB "
        f"from a stdlib ssl sender; channel reads of {args.nbytes} bytes"
    )
    mw, mc, per_round = bulk_rounds(
        variants,
        labels,
        args.rounds,
        lambda v: bulk_run(v, size, args),
        order=lambda r: variants if r % 2 == 0 else variants[::-1],
        ours="channel",
        baseline="twisted",
        digits=3,
        detail=lambda res: f"{res['cipher']}  ",
    )
    print(
        f"ratio TLSChannel / Twisted: wall {mw['channel'] / mw['twisted']:.2f}x, per receiver "
        f"CPU second {mc['channel'] / mc['twisted']:.2f}x, median of per-round wall ratios "
        f"{statistics.median(per_round):.2f}x  (goal >= 0.9x)"
    )
    rss_size = parse_size(args.rss_size)
    if rss_size:
        print()
        print("peak receiver RSS by stream size (bounded: must not grow with the stream):")
        for v in variants:
            small = bulk_run(v, size, args)["rss_kib"] / 1024
            big = bulk_run(v, rss_size, args)["rss_kib"] / 1024
            print(
                f"  {labels[v]:<32} {size / (1 << 20):5.0f} MiB: {small:5.1f} MiB"
                f"   {rss_size / (1 << 20):5.0f} MiB: {big:5.1f} MiB"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    roles = ["orchestrator", "hs-server", "hs-client", "bulk-receiver", "bulk-sender"]
    ap.add_argument("--role", choices=roles, default="orchestrator")
    ap.add_argument("--variant", choices=["channel", "twisted", "stdlib"], default="channel")
    ap.add_argument("--only", choices=["handshake", "bulk"], help="run one benchmark only")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--hs-seconds", type=float, default=3.0, help="client load per run (3 s)")
    ap.add_argument("--concurrency", type=int, default=4, help="client threads (default 4)")
    ap.add_argument("--size", default="256M", help="bulk bytes per timed run (default 256M)")
    ap.add_argument("--rss-size", default="1G", help="bulk stream of the RSS check (0: skip)")
    ap.add_argument("--nbytes", type=int, default=1 << 20, help="TLSChannel read size (1 MiB)")
    ap.add_argument("--pki", help="credentials directory (default: generated)")
    ap.add_argument("--port", type=int)
    ap.add_argument("--cpu", type=int)
    ap.add_argument("--server-cpu", type=int, default=0)
    ap.add_argument("--client-cpu", type=int, default=1)
    args = ap.parse_args()

    if args.role != "orchestrator":
        pin(args.cpu)
        pki = Path(args.pki)
        if args.role == "hs-server":
            run_hs_server(args.variant, pki, args.hs_seconds)
        elif args.role == "hs-client":
            run_hs_client(args.port, pki, args.hs_seconds, args.concurrency)
        elif args.role == "bulk-receiver":
            run_bulk_receiver(args.variant, pki, args.nbytes)
        else:
            run_bulk_sender(args.port, pki, parse_size(args.size))
        return

    with tempfile.TemporaryDirectory(prefix="bench-tls-") as tmp:
        if args.pki is None:
            from qiotwisted.crypto import generate_pki_sync

            args.pki = str(Path(tmp) / "pki")
            generate_pki_sync(args.pki, key_type="ecdsa")
        started = time.monotonic()
        if args.only in (None, "handshake"):
            handshake_benchmark(args)
            print()
        if args.only in (None, "bulk"):
            bulk_benchmark(args)
        print(f"\n(total {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
