"""Accepting connections: NetListener + client func vs a bare Twisted ServerFactory.

Two servers, each run in its own fresh process:

* ``bare``: a ``ServerFactory`` whose protocol calls ``loseConnection()`` in
  ``connectionMade`` (the baseline);
* ``netlistener``: a :class:`qiotwisted.NetListener` whose client func closes the
  :class:`SocketChannel` it is handed;
* ``dispatch`` (a diagnostic row): the same NetListener handing a plain
  ``Protocol`` instead of a SocketChannel, so the report shows how the overhead
  splits between the listener's own dispatch and the channel it builds.

The load comes from a separate client process: stdlib non-blocking sockets that
connect, wait for the server's close (EOF) and close with ``SO_LINGER`` 0 (an
RST, so no TIME_WAIT piles up), keeping ``--window`` connections in flight, for
a bounded ``--count`` connections after a short warm-up.  The server measures
itself over the measured connections (from the warm-up's last close to the
last measured close): the wall-clock accept rate and its own CPU time per
connection (``time.process_time``).  On a 2-core machine shared with the client
(and with other users), CPU per accept is the fairer figure; the rate also
depends on the client keeping up.

Runs of the variants are interleaved (the order rotates each round);
the figures are medians of ``--runs`` (default 7, at least 5).  Bounded: about
20-45 s with the defaults.

Run: ``python benchmarks/bench_accept.py [--runs N] [--count N] [--window N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import statistics
import struct
import subprocess
import sys
import time
from typing import Any

GOAL_RATIO = 0.9
RUN_TIMEOUT_S = 30.0


# ---- server (child process) ---------------------------------------------------------------


def serve(variant: str, warmup: int, count: int) -> None:
    from twisted.internet import reactor
    from twisted.internet.protocol import Protocol, ServerFactory

    total = warmup + count
    state: dict[str, Any] = {"lost": 0, "t0": None, "cpu0": None}
    r: Any = reactor

    def one_lost(_: object = None) -> None:
        state["lost"] += 1
        n = state["lost"]
        if n == warmup:
            state["t0"], state["cpu0"] = time.perf_counter(), time.process_time()
        elif n == total:
            wall = time.perf_counter() - state["t0"]
            cpu = time.process_time() - state["cpu0"]
            print(json.dumps({"wall": wall, "cpu": cpu, "count": count}), flush=True)
            r.stop()

    factory: Any
    if variant == "bare":

        class CloseAtOnce(Protocol):
            def connectionMade(self) -> None:
                assert self.transport is not None
                self.transport.loseConnection()

            def connectionLost(self, reason: object = None) -> None:
                one_lost()

        factory = ServerFactory.forProtocol(CloseAtOnce)
        factory.noisy = False
        port = r.listenTCP(0, factory, backlog=1024, interface="127.0.0.1")
        port_number = port.getHost().port
    else:
        from qiotwisted import NetListener, SocketChannel

        listener: NetListener
        if variant == "netlistener":

            def client_func(listener: NetListener, channel: SocketChannel, data: object) -> None:
                channel.close().addCallback(one_lost)

            listener = NetListener(name="bench")
            listener.set_client_func(client_func)
        else:
            # Diagnostic: the listener's own dispatch (ports, func, trace check)
            # with a plain Protocol in place of the SocketChannel, to show how
            # the cost splits between NetListener and the channel it builds.
            class Plain(Protocol):
                def __init__(self, owner: NetListener) -> None:
                    self.owner = owner

                def connectionMade(self) -> None:
                    # Diagnostic only: hand NetListener a bare protocol where it
                    # expects a SocketChannel's, to time its dispatch alone.
                    self.owner._accepted(self)  # type: ignore[arg-type]

                def connectionLost(self, reason: object = None) -> None:
                    one_lost()

            class DispatchOnly(NetListener):
                def buildProtocol(self, addr: object) -> Protocol:
                    return Plain(self)

            def lose(listener: NetListener, proto: Any, data: object) -> None:
                proto.transport.loseConnection()

            listener = DispatchOnly(name="bench")
            listener.set_client_func(lose)
        opened: list[Any] = []
        listener.open("tcp:0:interface=127.0.0.1", backlog=1024).addCallback(opened.extend)
        port_number = opened[0].port  # a numeric address listens synchronously

    print(json.dumps({"port": port_number}), flush=True)
    r.callLater(RUN_TIMEOUT_S, r.stop)
    r.run()


# ---- client (child process) ---------------------------------------------------------------


def client(port: int, total: int, window: int) -> None:
    sel = selectors.DefaultSelector()
    linger = struct.pack("ii", 1, 0)
    started = done = errors = 0
    deadline = time.monotonic() + RUN_TIMEOUT_S

    def start() -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        s.connect_ex(("127.0.0.1", port))
        sel.register(s, selectors.EVENT_READ)

    while done < total and time.monotonic() < deadline:
        while started < total and started - done < window:
            start()
            started += 1
        for key, _ in sel.select(timeout=1.0):
            s = key.fileobj
            assert isinstance(s, socket.socket)  # only sockets are registered
            try:
                if s.recv(16):
                    errors += 1  # the server never writes
            except BlockingIOError:
                continue
            except OSError:
                errors += 1
            sel.unregister(s)
            s.close()
            done += 1
    sel.close()
    print(json.dumps({"done": done, "errors": errors}), flush=True)


# ---- driver -------------------------------------------------------------------------------


def _pin(cpu: int) -> list[str]:
    # Server and client on different cores when there are several (and the
    # platform allows it); otherwise they share, and CPU per accept is the figure.
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2 and shutil_which("taskset"):
        return ["taskset", "-c", str(cpu)]
    return []


def shutil_which(name: str) -> str | None:
    import shutil

    return shutil.which(name)


def run_once(variant: str, warmup: int, count: int, window: int) -> dict[str, float]:
    me = os.path.abspath(__file__)
    server = subprocess.Popen(
        [
            *_pin(0),
            sys.executable,
            me,
            "--serve",
            variant,
            "--warmup",
            str(warmup),
            "--count",
            str(count),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = json.loads(server.stdout.readline())["port"]
        cl = subprocess.run(
            [
                *_pin(1),
                sys.executable,
                me,
                "--client",
                str(port),
                "--count",
                str(warmup + count),
                "--window",
                str(window),
            ],
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S + 5,
            check=True,
        )
        client_result = json.loads(cl.stdout)
        line = server.stdout.readline()
        server.wait(timeout=RUN_TIMEOUT_S)
        if not line:
            raise RuntimeError(f"{variant} server gave no result (client: {client_result})")
        result = json.loads(line)
        if client_result["errors"] or client_result["done"] != warmup + count:
            raise RuntimeError(f"{variant}: client saw {client_result}")
    finally:
        if server.poll() is None:
            server.kill()  # our own child, by its handle
            server.wait()
    n = result["count"]
    return {"rate": n / result["wall"], "cpu_us": result["cpu"] / n * 1e6}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--count", type=int, default=4000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--serve", choices=["bare", "netlistener", "dispatch"])
    parser.add_argument("--client", type=int, metavar="PORT")
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.warmup, args.count)
        return
    if args.client:
        client(args.client, args.count, args.window)
        return
    runs = max(5, args.runs)
    variants = ["bare", "netlistener", "dispatch"]
    results: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    t_start = time.monotonic()
    for i in range(runs):
        order = variants[i % 3 :] + variants[: i % 3]  # rotate: no variant always first
        for v in order:
            results[v].append(run_once(v, args.warmup, args.count, args.window))
    elapsed = time.monotonic() - t_start

    med = {
        v: {k: statistics.median(r[k] for r in results[v]) for k in ("rate", "cpu_us")}
        for v in variants
    }
    print(
        f"accepts: {args.count} measured connections per run (+{args.warmup} warm-up), "
        f"window {args.window}, {runs} interleaved runs per variant, medians; {elapsed:.1f} s"
    )
    print(f"{'variant':<28} {'accepts/s':>10} {'server CPU/accept':>18}   all runs (accepts/s)")
    names = {
        "bare": "Twisted ServerFactory (bare)",
        "netlistener": "NetListener + client func",
        "dispatch": "  diagnostic: dispatch only",
    }
    for v in variants:
        every = " ".join(f"{r['rate']:,.0f}" for r in results[v])
        print(f"{names[v]:<28} {med[v]['rate']:>10,.0f} {med[v]['cpu_us']:>15.1f} us   {every}")
    rate_ratio = med["netlistener"]["rate"] / med["bare"]["rate"]
    cpu_ratio = med["bare"]["cpu_us"] / med["netlistener"]["cpu_us"]
    print(
        f"ratio NetListener/bare: accept rate {rate_ratio:.2f}x, "
        f"CPU-equivalent rate (bare CPU / NetListener CPU) {cpu_ratio:.2f}x   goal >= {GOAL_RATIO}x"
    )
    d_rate = med["dispatch"]["rate"] / med["bare"]["rate"]
    d_cpu = med["bare"]["cpu_us"] / med["dispatch"]["cpu_us"]
    channel_us = med["netlistener"]["cpu_us"] - med["dispatch"]["cpu_us"]
    print(
        f"diagnostic: dispatch-only/bare {d_rate:.2f}x rate, {d_cpu:.2f}x CPU-equivalent; "
        f"the SocketChannel (build, attach, close) costs {channel_us:.1f} us of CPU per accept"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
