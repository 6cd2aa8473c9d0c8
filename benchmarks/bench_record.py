"""Recording a real QEMU migration: `twistd qio record` vs a stdlib sink vs a QEMU destination.

One run, variants interleaved round by round, a fresh random-RAM source per
migration.  Two figures per migration:

* source time: from `migrate` until the source reports `completed` (the
  receiver's speed reaches the source through TCP backpressure);
* end to end: until the receiver is done too (the recorder has filed its
  session with manifest and sha256; the stdlib sink saw EOF; the destination
  reports `completed`).

Goals (issue 2): recorder >= 1.0x the stdlib sink and >= 0.9x the QEMU
destination, as throughput ratios of medians.

    .venv/bin/python benchmarks/bench_record.py [--ram-mib 512] [--rounds 5]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.qemu import QemuVM, qemu_destination, qemu_source, stdlib_sink
from tests.twistd_proc import Twistd, twistd_qio


def _migrate(src: QemuVM, uri: str, receiver_done: Callable[[], object]) -> tuple[float, float]:
    src.set_capabilities()
    src.set_parameters(**({"tls_creds": "tls0", "tls_hostname": "localhost"} if TLS_DIR else {}))
    t0 = time.monotonic()
    src.migrate(uri)
    info = src.wait_migration(timeout=300, poll=0.005)
    t_src = time.monotonic() - t0
    if info["status"] != "completed":
        raise RuntimeError(f"migration {info['status']}: {info}")
    receiver_done()
    return t_src, time.monotonic() - t0


TLS_DIR: Path | None = None  # --tls: every variant speaks TLS, with these credentials


def ssl_sink(directory: Path) -> tuple[int, threading.Event, threading.Thread]:
    """A stdlib ``ssl`` server storing one connection to a file: the TLS baseline.

    Client certificates required, as the recorder does; TLS 1.3 with no session
    tickets (``num_tickets = 0``), which a QEMU 7.2 source needs (trap 1).
    """
    assert TLS_DIR is not None
    directory.mkdir(parents=True, exist_ok=True)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(TLS_DIR / "server-cert.pem", TLS_DIR / "server-key.pem")
    ctx.load_verify_locations(TLS_DIR / "ca-cert.pem")
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.num_tickets = 0
    lsock = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def serve() -> None:
        conn, _ = lsock.accept()
        lsock.close()
        with (
            ctx.wrap_socket(conn, server_side=True) as tls,
            open(directory / "main.bin", "wb") as f,
        ):
            buf = bytearray(1 << 20)
            view = memoryview(buf)
            while True:
                try:
                    n = tls.recv_into(buf)
                except (ssl.SSLEOFError, ConnectionResetError):
                    break  # QEMU 7.2 closes without close_notify
                if not n:
                    break
                f.write(view[:n])
        done.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return lsock.getsockname()[1], done, thread


def run_recorder(work: Path, svc: Twistd, ram_mib: int) -> tuple[float, float]:
    before = len(svc.sessions())
    with qemu_source(work, ram_mib=ram_mib, tls_dir=TLS_DIR) as src:
        result = _migrate(
            src,
            f"tcp:127.0.0.1:{svc.port}",
            lambda: svc.wait_sessions(before + 1, timeout=300),
        )
    manifest = svc.wait_sessions(before + 1)[-1]
    if manifest["status"] != "complete":
        raise RuntimeError(f"recorder session not complete: {manifest}")
    for s in svc.sessions():
        shutil.rmtree(s)
    return result


def run_stdlib(work: Path, ram_mib: int) -> tuple[float, float]:
    if TLS_DIR is not None:
        port, done, thread = ssl_sink(work / "sink")
        with qemu_source(work, ram_mib=ram_mib, tls_dir=TLS_DIR) as src:
            result = _migrate(src, f"tcp:127.0.0.1:{port}", lambda: done.wait(300))
        thread.join(10)
        shutil.rmtree(work / "sink")
        return result
    with (
        stdlib_sink(work / "sink") as sink,
        qemu_source(work, ram_mib=ram_mib) as src,
    ):
        result = _migrate(
            src,
            f"tcp:127.0.0.1:{sink.port}",
            lambda: sink.wait_connections_closed(1, timeout=300),
        )
    shutil.rmtree(work / "sink")
    return result


def run_qemu(work: Path, ram_mib: int) -> tuple[float, float]:
    with (
        qemu_destination(work, ram_mib=ram_mib, tls_dir=TLS_DIR) as dst,
        qemu_source(work, ram_mib=ram_mib, tls_dir=TLS_DIR) as src,
    ):
        dst.set_capabilities()
        dst.set_parameters(**({"tls_creds": "tls0"} if TLS_DIR else {}))
        port = dst.migrate_incoming()

        def dst_done() -> None:
            if dst.wait_migration(timeout=300, poll=0.005)["status"] != "completed":
                raise RuntimeError("destination did not complete")

        return _migrate(src, f"tcp:127.0.0.1:{port}", dst_done)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ram-mib", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tls", action="store_true", help="TLS on every variant")
    args = parser.parse_args()
    global TLS_DIR
    names = ["twistd qio record", "stdlib socket sink", "QEMU destination"]
    if args.tls:
        names = ["twistd qio record", "stdlib ssl sink", "QEMU TLS destination"]
    times: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="qio-bench-record-", dir=".") as tmp:
        work = Path(tmp).resolve()
        svc_args = ["record"]
        if args.tls:
            TLS_DIR = work / "pki"
            subprocess.run(
                [sys.executable, "-m", "qiotwisted.cli", "pki", str(TLS_DIR)],
                check=True,
                capture_output=True,
            )
            svc_args += ["--tls-creds", str(TLS_DIR)]
        with twistd_qio(work / "svc", svc_args) as svc:
            for r in range(args.rounds):
                # Rotate the order each round so no variant always runs first.
                order = names[r % 3 :] + names[: r % 3]
                for name in order:
                    if name == names[0]:
                        t = run_recorder(work, svc, args.ram_mib)
                    elif name == names[1]:
                        t = run_stdlib(work, args.ram_mib)
                    else:
                        t = run_qemu(work, args.ram_mib)
                    times[name].append(t)
                    print(
                        f"round {r + 1} {name:<20} source {t[0]:.3f} s  end-to-end {t[1]:.3f} s",
                        flush=True,
                    )
    mib = args.ram_mib
    mode = "TLS, " if args.tls else ""
    print(f"\n{mode}{mib} MiB random guest, {args.rounds} interleaved rounds, medians")
    print(f"{'receiver':<22}{'source s':>10}{'e2e s':>10}{'MB/s (e2e)':>12}")
    src_med: dict[str, float] = {}
    e2e_med: dict[str, float] = {}
    for name in names:
        src_med[name] = statistics.median(t[0] for t in times[name])
        e2e_med[name] = statistics.median(t[1] for t in times[name])
        mbps = (mib << 20) / e2e_med[name] / 1e6
        print(f"{name:<22}{src_med[name]:>10.3f}{e2e_med[name]:>10.3f}{mbps:>12.0f}")
    rec = names[0]
    print("\nmigration time (source `completed`), the figure the goals are about:")
    sink_ratio = src_med[names[1]] / src_med[rec]
    qemu_ratio = src_med[names[2]] / src_med[rec]
    print(f"  recorder vs stdlib sink:      {sink_ratio:.2f}x  (goal >= 1.0x)")
    print(f"  recorder vs QEMU destination: {qemu_ratio:.2f}x  (goal >= 0.9x)")
    print("end to end (receiver done: for the recorder, session filed with its sha256):")
    print(f"  recorder vs stdlib sink:      {e2e_med[names[1]] / e2e_med[rec]:.2f}x")
    print(f"  recorder vs QEMU destination: {e2e_med[names[2]] / e2e_med[rec]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
