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
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.qemu import QemuVM, qemu_destination, qemu_source, stdlib_sink
from tests.twistd_proc import Twistd, twistd_qio


def _migrate(src: QemuVM, uri: str, receiver_done: Callable[[], object]) -> tuple[float, float]:
    src.set_capabilities()
    src.set_parameters()
    t0 = time.monotonic()
    src.migrate(uri)
    info = src.wait_migration(timeout=300, poll=0.005)
    t_src = time.monotonic() - t0
    if info["status"] != "completed":
        raise RuntimeError(f"migration {info['status']}: {info}")
    receiver_done()
    return t_src, time.monotonic() - t0


def run_recorder(work: Path, svc: Twistd, ram_mib: int) -> tuple[float, float]:
    before = len(svc.sessions())
    with qemu_source(work, ram_mib=ram_mib) as src:
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
        qemu_destination(work, ram_mib=ram_mib) as dst,
        qemu_source(work, ram_mib=ram_mib) as src,
    ):
        dst.set_capabilities()
        dst.set_parameters()
        port = dst.migrate_incoming()

        def dst_done() -> None:
            if dst.wait_migration(timeout=300, poll=0.005)["status"] != "completed":
                raise RuntimeError("destination did not complete")

        return _migrate(src, f"tcp:127.0.0.1:{port}", dst_done)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ram-mib", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    names = ["twistd qio record", "stdlib socket sink", "QEMU destination"]
    times: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="qio-bench-record-", dir=".") as tmp:
        work = Path(tmp).resolve()
        with twistd_qio(work / "svc") as svc:
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
    print(f"\n{mib} MiB random guest, {args.rounds} interleaved rounds, medians")
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
