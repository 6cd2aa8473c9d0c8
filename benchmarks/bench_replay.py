"""Replay: `qio send` vs a stdlib socket sender of the same recording into a QEMU destination.

Records one migration of a random-RAM guest with `twistd qio record`, then,
interleaved round by round, loads it into fresh QEMU destinations with
`qio send` (a child process, as a user runs it) and with the stdlib sender
(blocking sockets in threads, in a child process too).  Prints medians and the
ratio (goal >= 0.95x), plus `qio send`'s peak RSS.

    .venv/bin/python benchmarks/bench_replay.py [--ram-mib 256] [--rounds 5] [--multifd N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.qemu import QemuVM, qemu_destination, qemu_source
from tests.twistd_proc import twistd_qio

STDLIB_SENDER = """
import sys, json
sys.path.insert(0, {root!r})
from pathlib import Path
import time
from tests.qemu import stdlib_send
paths = [Path(p) for p in json.loads(sys.argv[2])]
t0 = time.monotonic()
stdlib_send(int(sys.argv[1]), paths[0], paths[1:], timeout=600)
print(json.dumps({{"seconds": time.monotonic() - t0}}))
"""

RSS_WRAPPER = """
import resource, runpy, sys
sys.argv = ["qio", *sys.argv[1:]]
try:
    from qiotwisted.cli import main
    code = main(sys.argv[1:])
finally:
    print("maxrss_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(code)
"""


ROOT = Path(__file__).resolve().parent.parent
QIO_SEND = [sys.executable, "-c", RSS_WRAPPER, "send"]
STDLIB = [sys.executable, "-c", STDLIB_SENDER.format(root=str(ROOT))]


def prepare(vm: QemuVM, multifd: int) -> None:
    if multifd:
        vm.set_capabilities(multifd=True)
        vm.set_parameters(multifd_channels=multifd)
    else:
        vm.set_capabilities()
        vm.set_parameters()


def replay(
    work: Path, session: Path, how: str, ram_mib: int, multifd: int, uuid: str
) -> tuple[float, float, int]:
    """(seconds the sender itself measured, wall seconds until the destination completed, RSS)."""
    with qemu_destination(work, ram_mib=ram_mib, uuid=uuid) as dst:
        prepare(dst, multifd)
        port = dst.migrate_incoming()
        files = [session / "main.bin", *sorted(session.glob("multifd-*.bin"))]
        t0 = time.monotonic()
        if how == "qio send":
            argv = [*QIO_SEND, str(session), "--to", f"127.0.0.1:{port}", "--json"]
        else:
            argv = [*STDLIB, str(port), json.dumps([str(f) for f in files])]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"{how} failed: {proc.stderr[-2000:]}")
        info = dst.wait_migration(timeout=300, poll=0.005)
        elapsed = time.monotonic() - t0
        if info["status"] != "completed":
            raise RuntimeError(f"{how}: destination {info['status']}")
        inner = json.loads(proc.stdout)["seconds"]
        rss = 0
        for line in proc.stderr.splitlines():
            if line.startswith("maxrss_kib"):
                rss = int(line.split()[1])
        return inner, elapsed, rss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ram-mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--multifd", type=int, default=0)
    args = parser.parse_args()
    uuid = "0e3c8f7a-5b1d-4c2e-9f00-1a2b3c4d5e6f"
    names = ["qio send", "stdlib sender"]
    times: dict[str, list[float]] = {n: [] for n in names}
    walls: dict[str, list[float]] = {n: [] for n in names}
    rss: list[int] = []
    with tempfile.TemporaryDirectory(prefix="qio-bench-replay-") as tmp:
        work = Path(tmp)
        with (
            twistd_qio(work / "svc") as svc,
            qemu_source(work, ram_mib=args.ram_mib, uuid=uuid) as src,
        ):
            prepare(src, args.multifd)
            src.migrate(f"tcp:127.0.0.1:{svc.port}")
            assert src.wait_migration(timeout=300)["status"] == "completed"
            (manifest,) = svc.wait_sessions(1, timeout=300)
            assert manifest["status"] == "complete", manifest
            session = svc.sessions()[0]
            size = sum(c["bytes"] for c in manifest["channels"])
            for r in range(args.rounds):
                for name in names if r % 2 == 0 else names[::-1]:
                    t, w, k = replay(work, session, name, args.ram_mib, args.multifd, uuid)
                    times[name].append(t)
                    walls[name].append(w)
                    if name == "qio send":
                        rss.append(k)
                    print(f"round {r + 1} {name:<14} send {t:.3f} s  wall {w:.3f} s", flush=True)
    print(
        f"\n{args.ram_mib} MiB random guest, multifd {args.multifd}, "
        f"recording {size / 1e6:.0f} MB, {args.rounds} interleaved rounds, medians"
    )
    med = {n: statistics.median(times[n]) for n in names}
    wall = {n: statistics.median(walls[n]) for n in names}
    print("sender       send time (measured inside the sender)   wall (process start to load done)")
    for n in names:
        print(f"{n:<16}{med[n]:8.3f} s {size / med[n] / 1e6:9.0f} MB/s      {wall[n]:8.3f} s")
    ratio = med["stdlib sender"] / med["qio send"]
    wall_ratio = wall["stdlib sender"] / wall["qio send"]
    print(
        f"\nratio qio send / stdlib sender: {ratio:.2f}x send time (goal >= 0.95x), "
        f"{wall_ratio:.2f}x wall (includes ~0.25 s of Twisted imports)"
    )
    print(f"qio send peak RSS: {max(rss) / 1024:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
