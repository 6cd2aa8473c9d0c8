"""1,000 concurrent connections held open, then closed: does anything leak?

Two servers, one after the other:

* ``twistd``: the real ``twistd -n qio record`` child (``--max-connections 0``,
  60 s timeouts so nothing is closed while held); its file descriptors and
  threads are counted from ``/proc/<pid>/fd`` and ``/proc/<pid>/task``.
* ``inprocess``: a NetListener + Recorder in this process's reactor, the
  clients in a child process; fds, the reactor's pending delayed calls and
  selectables, Python threads and the recorder's admission count are read
  directly.

The clients connect from 127.0.0.2+ (50 per address, under the per-peer
limit), hold every connection for ``--hold`` seconds without sending a byte,
then close them all.  Printed: the counts before, while held and after, and
the leak (after - before), which must be 0.  Bounded: well under a minute.

    python benchmarks/load_connections.py
    python benchmarks/load_connections.py --connections 2000 --only inprocess
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from qiotwisted.channel import port_of

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.test_load import fd_count, source_address, thread_count


def raise_nofile(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, n)), hard))


def wait_for(predicate: Any, seconds: float) -> bool:
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        if predicate():
            return True
        time.sleep(0.02)  # bounded poll of another process's /proc entries
    return predicate()


def open_clients(port: int, n: int) -> list[socket.socket]:
    socks = []
    for k in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind((source_address(k), 0))
        s.connect(("127.0.0.1", port))
        socks.append(s)
    return socks


def client_main(port: int, n: int, hold: float) -> int:
    """Child process: open *n* connections, say so, hold them, close them all."""
    raise_nofile(n + 256)
    sys.stdin.readline()  # "go": the server has counted its baseline
    socks = open_clients(port, n)
    print("open", flush=True)
    sys.stdin.readline()  # the server says when to close (bounded by its own timeout)
    time.sleep(hold)  # keep them open a fixed, bounded time (--hold)
    for s in socks:
        s.close()
    print("closed", flush=True)
    return 0


# -- twistd ----------------------------------------------------------------------------------


def run_twistd(n: int, hold: float, backlog: int) -> dict[str, Any]:
    from tests.twistd_proc import twistd_qio

    args = [
        "record",
        "--max-connections",
        "0",
        "--handshake-timeout",
        "60",
        "--classify-timeout",
        "60",
    ]
    listen = [f"tcp:0:interface=127.0.0.1:backlog={backlog}"]
    with (
        tempfile.TemporaryDirectory(prefix="qiot-conn-") as tmp,
        twistd_qio(Path(tmp), args, listen=listen) as svc,
    ):
        pid = svc.proc.pid
        time.sleep(0.3)  # bounded: let the service settle
        r: dict[str, Any] = {"server": "twistd", "connections": n, "backlog": backlog}
        r["fds_before"], r["threads_before"] = fd_count(pid), thread_count(pid)
        t0 = time.monotonic()
        socks = open_clients(svc.port, n)
        r["connect_s"] = round(time.monotonic() - t0, 2)
        wait_for(lambda: fd_count(pid) >= r["fds_before"] + n, 30)
        r["fds_held"], r["threads_held"] = fd_count(pid), thread_count(pid)
        time.sleep(hold)  # hold the connections open for --hold seconds, bounded
        for s in socks:
            s.close()
        wait_for(lambda: fd_count(pid) <= r["fds_before"], 30)
        time.sleep(0.5)  # bounded: anything still closing settles
        r["fds_after"], r["threads_after"] = fd_count(pid), thread_count(pid)
        r["fd_leak"] = r["fds_after"] - r["fds_before"]
        r["thread_leak"] = r["threads_after"] - r["threads_before"]
        log = svc.log()
        r["log_refused"] = log.count("refused")
        r["alive"] = svc.proc.poll() is None
        r["sessions"] = len(svc.sessions())
    return r


# -- in-process ------------------------------------------------------------------------------


def run_inprocess(n: int, hold: float) -> dict[str, Any]:
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor
    from twisted.internet.defer import Deferred
    from twisted.internet.task import deferLater

    from qiotwisted.listener import NetListener
    from qiotwisted.migration.limits import Limits
    from qiotwisted.migration.recorder import Recorder

    r: dict[str, Any] = {"server": "inprocess", "connections": n}

    def selectables() -> int:
        return len(set(reactor.getReaders()) | set(reactor.getWriters()))

    def calls() -> int:
        return sum(1 for c in reactor.getDelayedCalls() if c.active())

    async def until(pred: Any, seconds: float) -> None:
        for _ in range(int(seconds / 0.02)):
            if pred():
                return
            await deferLater(reactor, 0.02)

    async def main() -> None:
        with tempfile.TemporaryDirectory(prefix="qiot-conn-") as tmp:
            rec = Recorder(
                Path(tmp) / "rec",
                limits=Limits(
                    max_connections=0, handshake_timeout=60, idle_timeout=60, min_free_space=0
                ),
            )
            listener = NetListener(name="load")
            listener.set_client_func(rec.client_func)
            (addr,) = await listener.open("tcp:0:interface=127.0.0.1", backlog=1024)
            port = port_of(addr)
            child = subprocess.Popen(
                [sys.executable, __file__, "--client", str(port), str(n), str(hold)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            assert child.stdin is not None and child.stdout is not None
            stdin, stdout = child.stdin, child.stdout
            os.set_blocking(stdout.fileno(), False)
            said = bytearray()

            def heard(word: bytes) -> bool:
                with contextlib.suppress(BlockingIOError, TypeError):
                    said.extend(os.read(stdout.fileno(), 4096))
                return word in said

            def tell(word: bytes) -> None:
                stdin.write(word + b"\n")
                stdin.flush()

            await deferLater(reactor, 0.1)
            r["fds_before"], r["threads_before"] = fd_count(), threading.active_count()
            r["delayed_calls_before"], r["selectables_before"] = calls(), selectables()
            t0 = time.monotonic()
            tell(b"go")
            await until(lambda: heard(b"open"), 60)
            await until(lambda: rec.admission.total >= n, 30)
            r["connect_s"] = round(time.monotonic() - t0, 2)
            r["admitted"] = rec.admission.total
            r["fds_held"], r["threads_held"] = fd_count(), threading.active_count()
            r["delayed_calls_held"], r["selectables_held"] = calls(), selectables()
            tell(b"close")
            await until(lambda: heard(b"closed"), 60)
            child.wait(timeout=30)
            await until(lambda: rec.admission.total == 0 and fd_count() <= r["fds_before"], 30)
            await deferLater(reactor, 0.5)
            r["fds_after"], r["threads_after"] = fd_count(), threading.active_count()
            r["delayed_calls_after"], r["selectables_after"] = calls(), selectables()
            r["admitted_after"] = rec.admission.total
            r["sessions"] = len(rec.sessions_done)
            child.stdin.close()
            child.stdout.close()
            await listener.disconnect()
            await rec.stop()
        r["fd_leak"] = r["fds_after"] - r["fds_before"]
        r["thread_leak"] = r["threads_after"] - r["threads_before"]
        r["delayed_call_leak"] = r["delayed_calls_after"] - r["delayed_calls_before"]
        r["selectable_leak"] = r["selectables_after"] - r["selectables_before"]

    failure: list[Any] = []

    def run() -> None:
        d = Deferred.fromCoroutine(main())
        d.addErrback(failure.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(run)
    reactor.run()
    if failure:
        failure[0].raiseException()
    return r


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--connections", type=int, default=1000)
    p.add_argument("--hold", type=float, default=2.0, help="seconds the connections stay open")
    p.add_argument("--only", choices=["twistd", "inprocess"], default=None)
    p.add_argument(
        "--backlog", type=int, default=1024, help="twistd's listen backlog (Twisted's default: 50)"
    )
    p.add_argument("--client", nargs=3, metavar=("PORT", "N", "HOLD"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.client:
        return client_main(int(a.client[0]), int(a.client[1]), float(a.client[2]))
    raise_nofile(2 * a.connections + 512)  # inherited by the twistd child
    ok = True
    for kind in ("twistd", "inprocess"):
        if a.only and a.only != kind:
            continue
        r = (
            run_twistd(a.connections, a.hold, a.backlog)
            if kind == "twistd"
            else run_inprocess(a.connections, a.hold)
        )
        print(json.dumps(r), flush=True)
        line = (
            f"{kind:9}: {a.connections} connections: fds {r['fds_before']} -> "
            f"{r['fds_held']} held -> "
            f"{r['fds_after']} after (leak {r['fd_leak']}); threads {r['threads_before']} -> "
            f"{r['threads_held']} -> {r['threads_after']} (leak {r['thread_leak']})"
        )
        if kind == "inprocess":
            line += (
                f"; delayed calls {r['delayed_calls_before']} -> {r['delayed_calls_held']} -> "
                f"{r['delayed_calls_after']} (leak {r['delayed_call_leak']}); selectables "
                f"{r['selectables_before']} -> {r['selectables_held']} -> "
                f"{r['selectables_after']} (leak {r['selectable_leak']})"
            )
        print(line, flush=True)
        leaks = [r["fd_leak"], r["thread_leak"], r.get("delayed_call_leak", 0)]
        ok = ok and all(x <= 0 for x in leaks) and r["sessions"] == 0
    print("RESULT", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
