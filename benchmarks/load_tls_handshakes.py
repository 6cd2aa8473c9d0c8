"""500 TLS handshakes from 50 concurrent clients against NetListener + ``TLSChannel.new_server``.

The server runs in this process's reactor (pinned to CPU 0); the clients are a
child process (pinned to CPU 1) of 50 threads, each doing 10 full handshakes
with Python's ``ssl`` (a client certificate, verify-peer as QEMU does, no
resumption), reading the one byte the server writes once its handshake is
done, then closing.  Every handshake must succeed on both sides.

Side by side, the same load against Twisted's own TLS (``TLSMemoryBIOFactory``
over the very same pyOpenSSL context, the byte written from
``handshakeCompleted``): the baseline.  Printed: handshakes that succeeded
and failed on each side, the wall rate, and the server's rate per CPU second,
with the ratio qiotwisted / Twisted.  Bounded: a few seconds per variant.

    python benchmarks/load_tls_handshakes.py
    python benchmarks/load_tls_handshakes.py --clients 50 --per-client 10 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from qiotwisted.channel import port_of

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def pin(cpu: int) -> None:
    try:
        os.sched_setaffinity(0, {cpu % (os.cpu_count() or 1)})
    except (AttributeError, OSError):
        pass  # fewer cores or no affinity: run unpinned


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# -- the client process -------------------------------------------------------------------------


def client_main(port: int, pki_dir: str, clients: int, per_client: int) -> int:
    pin(1)
    from tests.test_load import stdlib_client_context

    ctx = stdlib_client_context(Path(pki_dir))
    ok = 0
    errors: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        nonlocal ok
        for _ in range(per_client):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
                    with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                        if tls.recv(1) != b"k":
                            raise RuntimeError("no byte from the server")
                with lock:
                    ok += 1
            except Exception as e:
                with lock:
                    errors.append(repr(e))

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    wall = time.monotonic() - t0
    print(json.dumps({"ok": ok, "errors": errors[:5], "failed": len(errors), "wall_s": wall}))
    return 0


# -- the servers ------------------------------------------------------------------------------


def serve(kind: str, pki_dir: Path, clients: int, per_client: int) -> dict[str, Any]:
    pin(0)
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor
    from twisted.internet.defer import Deferred

    from qiotwisted.crypto import TLSCreds

    creds = TLSCreds.load_sync(pki_dir, "server")
    total = clients * per_client
    stats: dict[str, Any] = {"variant": kind, "server_ok": 0, "server_failed": 0}
    times: list[float] = []

    def done(ok: bool) -> None:
        stats["server_ok" if ok else "server_failed"] += 1
        times.append(time.monotonic())

    if kind == "qiotwisted":
        from qiotwisted.channel.tls import TLSChannel
        from qiotwisted.listener import NetListener

        async def handle(ch: Any) -> None:
            tls = TLSChannel.new_server(ch, creds)
            try:
                await tls.handshake().deferred
                await tls.write_all(b"k")
                done(True)
            except Exception:
                done(False)
            finally:
                await tls.close()

        listener = NetListener(name="load-tls")
        listener.set_client_func(lambda _l, ch, _d: Deferred.fromCoroutine(handle(ch)))

        async def listen() -> int:
            (addr,) = await listener.open("tcp:0:interface=127.0.0.1", backlog=1024)
            return port_of(addr)

    else:
        from twisted.internet.interfaces import IHandshakeListener
        from twisted.internet.protocol import Factory, Protocol
        from twisted.protocols.tls import TLSMemoryBIOFactory
        from zope.interface import implementer

        @implementer(IHandshakeListener)
        class OneByte(Protocol):
            shook = False

            def handshakeCompleted(self) -> None:
                self.shook = True
                assert self.transport is not None
                self.transport.write(b"k")
                self.transport.loseConnection()
                done(True)

            def connectionLost(self, reason: Any = None) -> None:
                if not self.shook:
                    done(False)

        class Ctx:
            def getContext(self) -> Any:
                return creds.context

        # Ctx is the duck-typed context factory TLSMemoryBIOFactory calls
        # getContext() on; Twisted's annotation names its own class only.
        factory = TLSMemoryBIOFactory(Ctx(), False, Factory.forProtocol(OneByte))  # type: ignore[arg-type]

        async def listen() -> int:
            port = reactor.listenTCP(0, factory, backlog=1024, interface="127.0.0.1")
            return int(port.getHost().port)

    result: dict[str, Any] = {}

    async def main() -> None:
        port = await listen()
        cpu0 = cpu_seconds()
        child = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--client",
                str(port),
                str(pki_dir),
                str(clients),
                str(per_client),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        from twisted.internet.task import deferLater

        for _ in range(6000):  # bounded: 120 s
            if child.poll() is not None:
                break
            await deferLater(reactor, 0.02)
        for _ in range(50):  # bounded: server-side completions that trail the client's
            if len(times) >= total:
                break
            await deferLater(reactor, 0.02)
        out, _ = child.communicate(timeout=60)
        cpu = cpu_seconds() - cpu0
        result.update(stats)
        result["client"] = json.loads(out.strip().splitlines()[-1])
        # The wall rate is the client's: from its threads' start to their end
        # (the child's interpreter start-up is not part of it).
        wall = result["client"]["wall_s"]
        result["server_cpu_s"] = round(cpu, 3)
        result["wall_s"] = round(wall, 3)
        result["handshakes_per_s_wall"] = round(stats["server_ok"] / wall, 1)
        result["handshakes_per_server_cpu_s"] = round(stats["server_ok"] / cpu, 1) if cpu else 0

    def run() -> None:
        d = Deferred.fromCoroutine(main())
        d.addErrback(lambda f: result.setdefault("error", f.getTraceback()))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(run)
    reactor.run()
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--per-client", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3, help="rounds of both variants, interleaved")
    p.add_argument("--client", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.client:
        return client_main(int(a.client[0]), a.client[1], int(a.client[2]), int(a.client[3]))
    if a.serve:
        r = serve(a.serve[0], Path(a.serve[1]), a.clients, a.per_client)
        print(json.dumps(r), flush=True)
        return 0
    from tests.pki import get_test_pki

    total = a.clients * a.per_client
    runs: dict[str, list[dict[str, Any]]] = {"qiotwisted": [], "twisted": []}
    with tempfile.TemporaryDirectory(prefix="qiot-hs-") as tmp:
        pki = get_test_pki(Path(tmp) / "pki")
        for _ in range(a.rounds):
            for kind in ("qiotwisted", "twisted"):
                # Each server in a fresh process: one reactor per run.
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--serve",
                        kind,
                        str(pki.full_dir),
                        "--clients",
                        str(a.clients),
                        "--per-client",
                        str(a.per_client),
                    ],
                    capture_output=True,
                    text=True,
                    timeout=300,
                )
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(json.dumps(r), flush=True)
                runs[kind].append(r)
    ok = True
    med: dict[str, dict[str, float]] = {}
    for kind, rs in runs.items():
        good = all(r["server_ok"] == total and r["client"]["ok"] == total for r in rs)
        ok = ok and good
        med[kind] = {
            "wall": statistics.median(r["handshakes_per_s_wall"] for r in rs),
            "cpu": statistics.median(r["handshakes_per_server_cpu_s"] for r in rs),
        }
        print(
            f"{kind:10}: {total} handshakes x {len(rs)} rounds from {a.clients} concurrent "
            f"clients: all succeeded={good} (server ok {[r['server_ok'] for r in rs]}, failed "
            f"{[r['server_failed'] for r in rs]}; client ok {[r['client']['ok'] for r in rs]}); "
            f"median {med[kind]['wall']:.0f} handshakes/s wall, "
            f"{med[kind]['cpu']:.0f} per server CPU second",
            flush=True,
        )
    print(
        "ratio qiotwisted/twisted: "
        f"wall {med['qiotwisted']['wall'] / med['twisted']['wall']:.2f}x, "
        f"per CPU second {med['qiotwisted']['cpu'] / med['twisted']['cpu']:.2f}x"
    )
    print("RESULT", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
