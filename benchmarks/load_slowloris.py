"""Slowloris against ``twistd qio record``, plain and ``--tls-creds``, while a real QEMU records.

For each service: 200 connections that send one byte a second (plain: a
multifd init packet; TLS: a real ClientHello) and 200 that open TLS and stall
(TLS: handshake finished, then silence; plain: a ClientHello, refused at once
as QEMU's trap 12 says), all from 127.0.0.2+ (50 per address); meanwhile a
real QEMU 7.2 source migrates into the same service from 127.0.0.1.  The
service runs with ``--handshake-timeout``/``--classify-timeout`` *timeout* and
``--max-connections`` high enough for all of them.

Printed per service: the migration's and session's outcome, how each kind of
straggler ended and after how long (the service's timeouts, or a refusal),
the refusals in the service's log, and the service's fd/thread counts
before, with the stragglers, and after.

A third scenario, ``slow-sessions``, is the variant the timeouts do not
cover: ``--max-sessions`` connections (default 8, each from its own address)
send a valid 12-byte stream header at once, then one byte a second.  Each is a
main channel and opens a session; a byte a second keeps ``--idle-timeout``
from firing; the real QEMU migration that follows finds every session slot
taken.  Printed: its outcome and the service's refusal.  Bounded: about a
minute in all.

    python benchmarks/load_slowloris.py
    python benchmarks/load_slowloris.py --dribblers 50 --stallers 50 --timeout 2
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.pki import get_test_pki
from tests.test_load import run_slowloris, source_address


def run_slow_sessions(workdir: Path, sessions: int, timeout: float) -> dict[str, Any]:
    """*sessions* main channels at one byte a second after their header, then QEMU."""
    from tests.qemu import qemu_source
    from tests.test_wire import build_stream
    from tests.twistd_proc import twistd_qio

    data = build_stream().data
    stop = threading.Event()

    def slow(k: int) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((source_address(k, 1), 0))
            sock.connect(("127.0.0.1", port))
            sock.sendall(data[:12])  # magic, version, start of the configuration
            i = 12
            while not stop.wait(1.0) and i < len(data):
                try:
                    sock.send(data[i : i + 1])
                except OSError:
                    return
                i += 1

    args = ["record", "--handshake-timeout", f"{timeout:g}", "--classify-timeout", f"{timeout:g}"]
    r: dict[str, Any] = {"scenario": "slow-sessions", "slow_sessions": sessions}
    with twistd_qio(workdir, [*args, "--max-sessions", str(sessions)]) as svc:
        port = svc.port
        threads = [threading.Thread(target=slow, args=(k,), daemon=True) for k in range(sessions)]
        for t in threads:
            t.start()
        time.sleep(timeout + 1)  # bounded: past every identification timeout
        with qemu_source(workdir, ram_mib=64) as src:
            src.set_capabilities()
            src.set_parameters()
            src.migrate(f"tcp:127.0.0.1:{port}")
            r["migration"] = src.wait_migration(timeout=60)["status"]
        time.sleep(0.5)  # bounded: the refusal is logged
        r["slow_sessions_open"] = len(svc.incoming())
        r["qemu_refusals"] = [
            line.split("] ", 1)[-1]
            for line in svc.log().splitlines()
            if "refused 127.0.0.1:" in line
        ][:2]
        stop.set()
        for t in threads:
            t.join(timeout=5)
    return r


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dribblers", type=int, default=200)
    p.add_argument("--stallers", type=int, default=200)
    p.add_argument("--timeout", type=float, default=5.0, help="handshake/classify timeout (s)")
    p.add_argument("--ram-mib", type=int, default=256, help="the QEMU guest's RAM")
    p.add_argument("--only", choices=["plain", "tls", "slow-sessions"], default=None)
    p.add_argument("--max-sessions", type=int, default=8, help="slow-sessions: the slots to fill")
    a = p.parse_args()
    # Each straggler is one socket (plus one thread) here; keep room for 400+.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4 * (a.dribblers + a.stallers) + 256))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    ok = True
    with tempfile.TemporaryDirectory(prefix="qiot-slowloris-") as tmp:
        root = Path(tmp)
        pki = get_test_pki(root / "pki")
        for tls in (False, True):
            if a.only and a.only != ("tls" if tls else "plain"):
                continue
            r = run_slowloris(
                root / ("tls" if tls else "plain"),
                pki,
                tls=tls,
                dribblers=a.dribblers,
                stallers=a.stallers,
                timeout=a.timeout,
                ram_mib=a.ram_mib,
            )
            print(json.dumps(r), flush=True)
            name = "tls  " if tls else "plain"
            print(
                f"{name}: migration {r['migration']} in {r['migration_s']} s, session "
                f"{r['session']} ({r['session_bytes']} bytes); service fds {r['fds_before']} -> "
                f"{r['fds_with_stragglers']} with stragglers -> {r['fds_after']} after, threads "
                f"{r['threads_before']} -> {r['threads_after']}",
                flush=True,
            )
            for kind, k in r["stragglers"].items():
                print(
                    f"       {kind:22} {k['closed']}/{k['n']} closed by the service "
                    f"after {k['close_s_min']}-{k['close_s_max']} s: {k['how']}",
                    flush=True,
                )
            print(
                f"       log: {r['log_refusals']} refusals, {r['log_timeouts']} timeouts, "
                f"{r['log_tls_failed']} TLS handshakes failed",
                flush=True,
            )
            all_closed = all(k["closed"] == k["n"] for k in r["stragglers"].values())
            ok = ok and r["session"] == "complete" and all_closed
        if a.only in (None, "slow-sessions"):
            r = run_slow_sessions(root / "slow-sessions", a.max_sessions, a.timeout)
            print(json.dumps(r), flush=True)
            print(
                f"slow-sessions: {a.max_sessions} main channels at one byte a second after "
                f"their header hold {r['slow_sessions_open']} sessions open; the QEMU "
                f"migration after them: {r['migration']}; the service said: "
                f"{r['qemu_refusals'] or 'nothing'}",
                flush=True,
            )
            ok = ok and r["migration"] == "completed"
    print("RESULT", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
