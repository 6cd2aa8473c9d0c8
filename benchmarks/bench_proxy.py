"""Proxy overhead: QEMU -> `twistd qio proxy` -> QEMU vs QEMU -> QEMU directly.

One run, plain and TLS, multifd (4 channels by default), the direct and the
proxied migration interleaved round by round (the order alternates), a fresh
random-RAM source and a fresh destination per migration, and a fresh
`twistd -n qio proxy` child per proxied migration (started before the clock
starts: its `--to` is the destination's port, which QEMU picks).  With TLS the
proxy terminates TLS on both hops (source -> proxy with `--tls-creds`, proxy
-> destination with `--to-tls-creds`); the direct migration is TLS source ->
TLS destination.

A third variant is the floor any proxy reaches on this machine: a stdlib
proxy (blocking sockets and `ssl`, one thread per channel, in a child
process; see STDLIB_PROXY).  On a 2-core host the two QEMUs already use most
of the CPU, so a proxy's cost shows up as its CPU seconds, printed for both.

Two figures per migration, both from `migrate` on the source:

* source: until the source's `query-migrate` says `completed`;
* destination: until the destination's says `completed` (the guest is loaded).

Both ends are polled in the same loop, so neither wait hides the other.  The
proxy's CPU seconds (user + system, from /proc) are printed too.  The
first round proves every variant with a guest-RAM check (pmemsave compared
with the source's RAM file, outside the timed part); `--check-all` checks
every migration.

Goal (issue 4): proxied destination time <= 1.15x direct, as a ratio of
medians.

    .venv/bin/python benchmarks/bench_proxy.py [--ram-mib 512] [--rounds 5] [--multifd 4]
        [--modes plain,tls] [--no-stdlib] [--check-all]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.qemu import QemuVM, check_ram, qemu_destination, qemu_source
from tests.twistd_proc import Twistd, twistd_qio

UUID = "6a1f0c3e-2b4d-4e5f-8a9b-0c1d2e3f4a5b"

# The floor a proxy can reach on this machine: blocking stdlib sockets (and
# stdlib `ssl`), one thread per channel doing recv_into/sendall with a reused
# 1 MiB buffer, in a child process.  It forwards the source's bytes only: a
# QEMU 7.2 destination never sends a byte back in precopy (qemu-interop.md),
# and a stdlib SSLSocket must not be read and written from two threads.  The
# order rules are the proxy's: upstream connections in accept order, multifd
# ones only after main has forwarded its first bytes (trap 3).  Its TLS server
# is capped at TLS 1.2 like `twistd qio proxy`'s (trap 1).
STDLIB_PROXY = r"""
import socket, ssl, sys, threading
port, channels, creds = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
server_ctx = client_ctx = None
if creds:
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    server_ctx.load_cert_chain(f"{creds}/server-cert.pem", f"{creds}/server-key.pem")
    server_ctx.load_verify_locations(f"{creds}/ca-cert.pem")
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_cert_chain(f"{creds}/client-cert.pem", f"{creds}/client-key.pem")
    client_ctx.load_verify_locations(f"{creds}/ca-cert.pem")
lsock = socket.create_server(("127.0.0.1", 0))
lsock.settimeout(300)
print(lsock.getsockname()[1], flush=True)
main_started = threading.Event()
turns = [threading.Event() for _ in range(channels + 1)]
turns[0].set()
def channel(i, conn):
    # The source's handshakes run at once (a 7.2 source waits for every multifd
    # channel before it writes main); upstream connects wait for their turn.
    try:
        conn.settimeout(300)
        if server_ctx:
            conn = server_ctx.wrap_socket(conn, server_side=True)
        turns[i].wait(300)
        if i:
            main_started.wait(300)
        up = socket.create_connection(("127.0.0.1", port), timeout=300)
        if client_ctx:
            up = client_ctx.wrap_socket(up, server_hostname="localhost")
    finally:
        turns[i + 1].set()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    first = i == 0
    try:
        while n := conn.recv_into(buf):
            up.sendall(view[:n])
            if first:
                main_started.set()
                first = False
    finally:
        main_started.set()
        up.close()
        conn.close()
threads = []
for i in range(channels):
    conn, _ = lsock.accept()
    t = threading.Thread(target=channel, args=(i, conn))
    t.start()
    threads.append(t)
for t in threads:
    t.join(300)
"""
TIMEOUT = 300.0
_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    source: float  # seconds from migrate to the source's `completed`
    destination: float  # ... to the destination's `completed`
    proxy_cpu: float | None = None  # CPU seconds the proxy child spent on this migration
    warnings: list[str] = field(default_factory=list)  # the proxy's logged warnings


def cpu_seconds(pid: int) -> float:
    """utime + stime of *pid* (fields 14 and 15 of /proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def prepare(vm: QemuVM, multifd: int, **params: Any) -> None:
    if multifd:
        vm.set_capabilities(multifd=True)
        vm.set_parameters(multifd_channels=multifd, **params)
    else:
        vm.set_capabilities()
        vm.set_parameters(**params)


def migrate(src: QemuVM, dst: QemuVM, uri: str, extra_log: Any = None) -> tuple[float, float]:
    """Start the migration, poll both ends until both are `completed`; bounded."""
    t0 = time.monotonic()
    src.migrate(uri)
    t_src: float | None = None
    t_dst: float | None = None
    deadline = t0 + TIMEOUT
    while t_src is None or t_dst is None:
        now = time.monotonic()
        if now > deadline:
            raise TimeoutError(f"migration not finished after {TIMEOUT} s")
        for vm, done in ((src, t_src), (dst, t_dst)):
            if done is not None:
                continue
            if vm.proc.poll() is not None:
                raise RuntimeError(
                    f"{vm.name} exited:\n{vm.log()}\n{extra_log() if extra_log else ''}"
                )
            status = vm.query_migrate().get("status")
            if status == "completed":
                if vm is src:
                    t_src = time.monotonic() - t0
                else:
                    t_dst = time.monotonic() - t0
            elif status in ("failed", "cancelled"):
                raise RuntimeError(
                    f"{vm.name}: migration {status}\n{vm.log()}\n{extra_log() if extra_log else ''}"
                )
        time.sleep(0.005)  # bounded by the deadline above
    return t_src, t_dst


VARIANTS = ("direct", "qio proxy", "stdlib proxy")


def run_one(
    work: Path,
    how: str,
    *,
    tls: bool,
    ram_mib: int,
    multifd: int,
    creds: Path,
    check: bool,
) -> Result:
    """One migration of a fresh random-RAM source into a fresh destination, *how* routed."""
    tls_dir = creds if tls else None
    with (
        qemu_destination(work, ram_mib=ram_mib, uuid=UUID, tls_dir=tls_dir) as dst,
        qemu_source(work, ram_mib=ram_mib, uuid=UUID, tls_dir=tls_dir) as src,
    ):
        prepare(dst, multifd, **({"tls_creds": "tls0"} if tls else {}))
        port = dst.migrate_incoming()
        src_params = {"tls_creds": "tls0", "tls_hostname": "localhost"} if tls else {}
        prepare(src, multifd, **src_params)
        if how == "direct":
            result = Result(*migrate(src, dst, f"tcp:127.0.0.1:{port}"))
        elif how == "qio proxy":
            result = _via_twistd(work, src, dst, port, tls, creds)
        else:
            result = _via_stdlib(src, dst, port, tls, creds, 1 + multifd)
        if check:
            assert src.ram_path is not None
            check_ram(dst, src.ram_path)
        return result


def _via_twistd(work: Path, src: QemuVM, dst: QemuVM, port: int, tls: bool, creds: Path) -> Result:
    args = ["proxy", "--to", f"127.0.0.1:{port}"]
    if tls:
        args += ["--tls-creds", str(creds)]
        args += ["--to-tls-creds", str(creds), "--to-tls-hostname", "localhost"]
    with twistd_qio(work / "proxy", args, extra_output=False) as proxy:
        cpu0 = cpu_seconds(proxy.proc.pid)
        t_src, t_dst = migrate(src, dst, f"tcp:127.0.0.1:{proxy.port}", proxy.log)
        cpu = cpu_seconds(proxy.proc.pid) - cpu0
        warnings = _check_proxy_log(proxy)
    return Result(t_src, t_dst, cpu, warnings)


def _via_stdlib(
    src: QemuVM, dst: QemuVM, port: int, tls: bool, creds: Path, channels: int
) -> Result:
    argv = [sys.executable, "-c", STDLIB_PROXY, str(port), str(channels), str(creds) if tls else ""]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the child prints its port, then serves
        if not line.strip():
            raise RuntimeError(f"stdlib proxy did not start: {proc.communicate(timeout=10)}")
        cpu0 = cpu_seconds(proc.pid)
        t_src, t_dst = migrate(src, dst, f"tcp:127.0.0.1:{int(line)}")
        deadline = time.monotonic() + 60
        while (waited := os.wait4(proc.pid, os.WNOHANG))[0] == 0:
            if time.monotonic() > deadline:
                raise TimeoutError("stdlib proxy did not exit after the migration")
            time.sleep(0.01)  # bounded by the deadline
        _, status, usage = waited
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise RuntimeError(f"stdlib proxy failed: {proc.stderr.read() if proc.stderr else ''}")
        return Result(t_src, t_dst, usage.ru_utime + usage.ru_stime - cpu0)
    finally:
        if proc.returncode is None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()


def _check_proxy_log(proxy: Twistd) -> list[str]:
    """Fail on a traceback in the proxy's log; return its warnings (printed at the end)."""
    text = proxy.log()
    for bad in ("Traceback", "Unhandled"):
        if bad in text:
            raise RuntimeError(f"proxy logged {bad!r}:\n{text}")
    return [line.split("] ", 1)[-1] for line in text.splitlines() if "#warn]" in line]


def make_pki(work: Path) -> Path:
    creds = work / "pki"
    subprocess.run(
        [sys.executable, "-m", "qiotwisted.cli", "pki", str(creds)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return creds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ram-mib", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--multifd", type=int, default=4, help="channels; 0 = no multifd")
    parser.add_argument("--modes", default="plain,tls", help="comma-separated: plain, tls")
    parser.add_argument("--no-stdlib", action="store_true", help="skip the stdlib proxy floor")
    parser.add_argument("--check-all", action="store_true", help="RAM-check every migration")
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("plain", "tls") for m in modes):
        parser.error("--modes takes plain and/or tls")
    hows = [h for h in VARIANTS if not (args.no_stdlib and h == "stdlib proxy")]
    results: dict[tuple[str, str], list[Result]] = {(m, h): [] for m in modes for h in hows}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="qio-bench-proxy-") as tmp:
        work = Path(tmp)
        creds = make_pki(work)
        for r in range(args.rounds):
            for mode in modes:
                # Rotate the order round by round so no variant always runs first.
                k = r % len(hows)
                for how in hows[k:] + hows[:k]:
                    res = run_one(
                        work,
                        how,
                        tls=mode == "tls",
                        ram_mib=args.ram_mib,
                        multifd=args.multifd,
                        creds=creds,
                        check=args.check_all or r == 0,
                    )
                    results[(mode, how)].append(res)
                    cpu = f"  proxy CPU {res.proxy_cpu:.2f} s" if res.proxy_cpu is not None else ""
                    print(
                        f"round {r + 1} {mode:<5} {how:<12} source {res.source:.3f} s  "
                        f"destination {res.destination:.3f} s{cpu}",
                        flush=True,
                    )
    elapsed = time.monotonic() - started
    mib = args.ram_mib
    print(
        f"\n{mib} MiB random guest, multifd {args.multifd}, {args.rounds} interleaved rounds, "
        f"medians (run took {elapsed:.0f} s; "
        f"{'every migration' if args.check_all else 'first round'} RAM-checked)"
    )
    print(
        f"{'mode':<7}{'path':<14}{'source s':>10}{'dest s':>10}"
        f"{'MB/s (dest)':>13}{'proxy CPU s':>13}"
    )
    med: dict[tuple[str, str], tuple[float, float]] = {}
    for mode in modes:
        for how in hows:
            rs = results[(mode, how)]
            s = statistics.median(x.source for x in rs)
            d = statistics.median(x.destination for x in rs)
            med[(mode, how)] = (s, d)
            cpus = [x.proxy_cpu for x in rs if x.proxy_cpu is not None]
            cpu = f"{statistics.median(cpus):.2f}" if cpus else ""
            print(f"{mode:<7}{how:<14}{s:>10.3f}{d:>10.3f}{(mib << 20) / d / 1e6:>13.0f}{cpu:>13}")
    print()
    worst = 0.0
    for mode in modes:
        ds, dd = med[(mode, "direct")]
        for how in hows[1:]:
            ps, pd = med[(mode, how)]
            if how == "qio proxy":
                worst = max(worst, pd / dd)
            print(
                f"ratio {how} / direct, {mode:<5}: destination {pd / dd:.2f}x  "
                f"source {ps / ds:.2f}x"
            )
    print(
        f"goal: qio proxy destination time <= 1.15x direct: "
        f"{'met' if worst <= 1.15 else 'MISSED'} (worst {worst:.2f}x)"
    )
    for mode in modes:
        rs = results[(mode, "qio proxy")]
        warned = [w for x in rs for w in x.warnings]
        if warned:
            n = sum(1 for x in rs if x.warnings)
            print(f"qio proxy warnings, {mode}: {n}/{len(rs)} migrations, e.g. {warned[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
