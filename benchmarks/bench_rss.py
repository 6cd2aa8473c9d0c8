"""Peak memory of `twistd qio record`, `qio send` and `twistd qio proxy` while 1 GiB migrates.

For each stream layout (plain, and multifd with N channels), one run of each
tool, each a real child process against real QEMU 7.2 with a random-RAM guest
(every page non-zero, so the stream is about as large as the guest):

1. record: a fresh source migrates into `twistd -n qio record`; the session
   must be filed `complete`;
2. replay: `qio send` loads that session into a fresh QEMU destination;
3. proxy: a fresh source migrates through `twistd -n qio proxy` into a fresh
   destination (plain TCP both sides; `--tap` adds a run with `--record`).

Peak RSS is the kernel's high-water mark, so nothing is sampled: for the
twistd services `VmHWM` from /proc/PID/status, read after the migration and
before SIGTERM (next to `VmRSS` once ready, before any migration: the imports'
share); for `qio send`, `ru_maxrss` of the reaped child (`os.wait4`).  The
replay and proxy loads are proved with the guest-RAM check unless
`--no-check` (the source of the recorded migration is kept until its replay
has been checked).  One source RAM file (`--ram-mib`, in /dev/shm) exists at
a time; the harness removes each after use, and each recording is deleted
after its replay.

Goal (issue 4): every peak < 100 MiB.

    .venv/bin/python benchmarks/bench_rss.py [--ram-mib 1024] [--multifd 4] [--tap] [--no-check]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.qemu import QemuVM, check_ram, qemu_destination, qemu_source
from tests.twistd_proc import Twistd, twistd_qio

UUID = "3f6c2a1e-8b7d-4c5e-9a0f-1b2c3d4e5f60"
TIMEOUT = 600.0
GOAL_MIB = 100.0
QIO = Path(sys.executable).parent / "qio"


@dataclass
class Peak:
    tool: str
    layout: str
    peak_kib: int  # high-water mark over the whole process life
    idle_kib: int | None  # VmRSS once ready, before any migration (services only)
    seconds: float  # the migration (or the send), for scale
    stream_bytes: int


def proc_status(pid: int) -> dict[str, int]:
    """The ``kB`` fields of /proc/PID/status (VmHWM, VmRSS...), in KiB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[key] = int(parts[0])
    return out


def prepare(vm: QemuVM, multifd: int) -> None:
    if multifd:
        vm.set_capabilities(multifd=True)
        vm.set_parameters(multifd_channels=multifd)
    else:
        vm.set_capabilities()
        vm.set_parameters()


def wait_completed(vm: QemuVM, what: str) -> None:
    info = vm.wait_migration(timeout=TIMEOUT, poll=0.01)
    if info["status"] != "completed":
        raise RuntimeError(f"{what}: {vm.name} migration {info['status']}: {info}\n{vm.log()}")


def peak_of(svc: Twistd) -> int:
    return proc_status(svc.proc.pid)["VmHWM"]


def run_record_and_replay(work: Path, ram_mib: int, multifd: int, check: bool) -> tuple[Peak, Peak]:
    layout = f"multifd {multifd}" if multifd else "plain"
    with qemu_source(work, ram_mib=ram_mib, uuid=UUID) as src:
        with twistd_qio(work / "record") as svc:
            idle = proc_status(svc.proc.pid)["VmRSS"]
            prepare(src, multifd)
            t0 = time.monotonic()
            src.migrate(f"tcp:127.0.0.1:{svc.port}")
            wait_completed(src, "record")
            (manifest,) = svc.wait_sessions(1, timeout=TIMEOUT)
            seconds = time.monotonic() - t0
            if manifest["status"] != "complete":
                raise RuntimeError(f"recording not complete: {manifest}")
            record = Peak(
                "twistd qio record",
                layout,
                peak_of(svc),
                idle,
                seconds,
                sum(c["bytes"] for c in manifest["channels"]),
            )
            session = svc.sessions()[0]
        try:
            replay = run_replay(work, session, ram_mib, multifd, src if check else None)
        finally:
            shutil.rmtree(session.parent)
    replay.stream_bytes = record.stream_bytes
    return record, replay


def run_replay(work: Path, session: Path, ram_mib: int, multifd: int, src: QemuVM | None) -> Peak:
    layout = f"multifd {multifd}" if multifd else "plain"
    argv = [str(QIO), "send"] if QIO.exists() else [sys.executable, "-m", "qiotwisted.cli", "send"]
    with qemu_destination(work, ram_mib=ram_mib, uuid=UUID) as dst:
        prepare(dst, multifd)
        port = dst.migrate_incoming()
        t0 = time.monotonic()
        out = work / "send.out"
        with open(out, "wb") as stdout, open(work / "send.err", "wb") as stderr:
            proc = subprocess.Popen(
                [*argv, str(session), "--to", f"127.0.0.1:{port}", "--json"],
                stdout=stdout,
                stderr=stderr,
            )
            try:
                deadline = time.monotonic() + TIMEOUT
                while (waited := os.wait4(proc.pid, os.WNOHANG))[0] == 0:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"qio send not done after {TIMEOUT} s")
                    time.sleep(0.02)  # bounded by the deadline
            finally:
                if proc.returncode is None and proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
        seconds = time.monotonic() - t0
        _, status, usage = waited
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0 or not json.loads(out.read_text())["ok"]:
            raise RuntimeError(f"qio send failed: {(work / 'send.err').read_text()[-2000:]}")
        wait_completed(dst, "replay")
        if src is not None:
            assert src.ram_path is not None
            check_ram(dst, src.ram_path)
        return Peak("qio send", layout, usage.ru_maxrss, None, seconds, 0)


def run_proxy(work: Path, ram_mib: int, multifd: int, check: bool, tap: bool) -> Peak:
    layout = f"multifd {multifd}" if multifd else "plain"
    with (
        qemu_destination(work, ram_mib=ram_mib, uuid=UUID) as dst,
        qemu_source(work, ram_mib=ram_mib, uuid=UUID) as src,
    ):
        prepare(dst, multifd)
        port = dst.migrate_incoming()
        args = ["proxy", "--to", f"127.0.0.1:{port}"]
        tap_dir = work / "tap"
        if tap:
            args += ["--record", str(tap_dir)]
        with twistd_qio(work / "proxy", args, extra_output=False) as svc:
            idle = proc_status(svc.proc.pid)["VmRSS"]
            prepare(src, multifd)
            t0 = time.monotonic()
            src.migrate(f"tcp:127.0.0.1:{svc.port}")
            wait_completed(src, "proxy")
            wait_completed(dst, "proxy")
            seconds = time.monotonic() - t0
            size = 0
            if tap:
                svc.output = tap_dir
                (manifest,) = svc.wait_sessions(1, timeout=TIMEOUT)
                if manifest["status"] != "complete":
                    raise RuntimeError(f"tap recording not complete: {manifest}")
                size = sum(c["bytes"] for c in manifest["channels"])
            peak = peak_of(svc)
        if check:
            assert src.ram_path is not None
            check_ram(dst, src.ram_path)
        shutil.rmtree(tap_dir, ignore_errors=True)
        name = "twistd qio proxy --record" if tap else "twistd qio proxy"
        return Peak(name, layout, peak, idle, seconds, size)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ram-mib", type=int, default=1024)
    parser.add_argument("--multifd", type=int, default=4, help="channels of the multifd layout")
    parser.add_argument("--tap", action="store_true", help="also: proxy with --record")
    parser.add_argument("--no-check", action="store_true", help="skip the guest-RAM checks")
    args = parser.parse_args()
    check = not args.no_check
    peaks: list[Peak] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="qio-bench-rss-") as tmp:
        work = Path(tmp)
        for multifd in (0, args.multifd):
            for p in run_record_and_replay(work, args.ram_mib, multifd, check):
                peaks.append(p)
                _progress(p)
            peaks.append(run_proxy(work, args.ram_mib, multifd, check, tap=False))
            _progress(peaks[-1])
            if args.tap:
                peaks.append(run_proxy(work, args.ram_mib, multifd, check, tap=True))
                _progress(peaks[-1])
    elapsed = time.monotonic() - started
    print(
        f"\n{args.ram_mib} MiB random guest (RAM-checked: {'yes' if check else 'no'}); "
        f"run took {elapsed:.0f} s"
    )
    print(f"{'tool':<28}{'layout':<11}{'peak RSS MiB':>13}{'idle RSS MiB':>14}{'seconds':>9}")
    worst = 0.0
    for p in peaks:
        mib = p.peak_kib / 1024
        worst = max(worst, mib)
        idle = f"{p.idle_kib / 1024:.1f}" if p.idle_kib is not None else "-"
        print(f"{p.tool:<28}{p.layout:<11}{mib:>13.1f}{idle:>14}{p.seconds:>9.2f}")
    verdict = "met" if worst < GOAL_MIB else "MISSED"
    print(f"\ngoal: every peak < {GOAL_MIB:.0f} MiB: {verdict} (highest {worst:.1f} MiB)")
    return 0


def _progress(p: Peak) -> None:
    print(
        f"{p.tool:<28}{p.layout:<11} peak {p.peak_kib / 1024:6.1f} MiB  {p.seconds:6.2f} s",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
