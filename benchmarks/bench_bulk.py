"""Bulk receive over loopback TCP: ``SocketChannel.read`` vs a bare Twisted protocol.

Each run starts a *receiver* process (pinned to one core) and a *sender*
process (a stdlib blocking ``sendall`` loop of 1 MiB buffers, pinned to the
other core).  The receiver is one of

* ``raw``: a blocking ``recv_into`` loop of 64 KiB, no event loop (a reference);
* ``protocol``: a bare Twisted ``Protocol`` counting bytes in ``dataReceived``
  (``reactor.listenTCP``, Twisted's default 64 KiB reads): the baseline;
* ``channel``: ``SocketChannel.listen`` + ``accept`` and the pull loop
  ``while data := await ch.read(1 MiB)``: qiotwisted.

The receiver times itself from connection to EOF and reports two rates:
*wall* GB/s (what a user sees; on loopback the sender's core does much of the
TCP work, so this moves with the machine's load) and GB per receiver CPU
second (how much work the receiver itself does per byte, steadier), plus its
own peak RSS (``ru_maxrss``).  Variants are interleaved round by round and
the figures are medians.  A last set of runs streams each of
``--rss-sizes`` (default 512 MiB and 2 GiB) through each receiver to show that
peak RSS does not grow with the stream.

    python benchmarks/bench_bulk.py                  # about 20 s on 2 cores
    python benchmarks/bench_bulk.py --size 256M --rounds 3 --rss-sizes 0
    python benchmarks/bench_bulk.py --read-burst 0   # the channel without read bursts
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
import time
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


# ---- sender (stdlib, blocking) -------------------------------------------------------------


def run_sender(port: int, size: int) -> None:
    payload = memoryview(bytes(range(256)) * (SEND_CHUNK // 256))
    with socket.create_connection(("127.0.0.1", port)) as s:
        left = size
        while left:
            n = min(left, SEND_CHUNK)
            s.sendall(payload[:n])
            left -= n
        s.shutdown(socket.SHUT_WR)
        s.recv(1)  # wait for the receiver to close, so it sees a clean EOF first


# ---- receivers -------------------------------------------------------------------------------


def report(total: int, t0: float, t1: float, c0: float, c1: float) -> None:
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"bytes": total, "seconds": t1 - t0, "cpu_seconds": c1 - c0, "rss_kib": rss_kib}
    print(json.dumps(out), flush=True)


def run_raw_receiver() -> None:
    """The reference: a blocking ``recv_into`` loop, no event loop at all.

    64 KiB reads: on loopback they beat larger ones (the copy stays in cache
    and the receive window reopens sooner).
    """
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        print(lsock.getsockname()[1], flush=True)
        conn, _ = lsock.accept()
        with conn:
            t0, c0 = time.perf_counter(), time.process_time()
            buf = bytearray(1 << 16)
            total = 0
            while n := conn.recv_into(buf):
                total += n
            report(total, t0, time.perf_counter(), c0, time.process_time())


def run_protocol_receiver() -> None:
    from twisted.internet import protocol
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor

    class Counter(protocol.Protocol):
        total = 0
        t0 = c0 = 0.0

        def connectionMade(self) -> None:
            self.t0 = time.perf_counter()
            self.c0 = time.process_time()

        def dataReceived(self, data: bytes) -> None:
            self.total += len(data)

        def connectionLost(self, reason: Any = None) -> None:
            report(self.total, self.t0, time.perf_counter(), self.c0, time.process_time())
            reactor.stop()

    class Once(protocol.ServerFactory):
        def buildProtocol(self, addr: Any) -> protocol.Protocol:
            port.stopListening()
            return Counter()

    port = reactor.listenTCP(0, Once(), interface="127.0.0.1")
    print(port.getHost().port, flush=True)
    reactor.run()


def run_channel_receiver(nbytes: int, options: dict[str, Any]) -> None:
    from twisted.internet import defer, task

    from qiotwisted.channel import SocketChannel

    async def main(reactor: Any) -> None:
        lis = SocketChannel.listen("127.0.0.1:0", **options)
        print(port_of(lis.get_local_address()), flush=True)
        ch = await lis.accept()
        t0 = time.perf_counter()
        c0 = time.process_time()
        await lis.close()
        total = 0
        read = ch.read
        while data := await read(nbytes):
            total += len(data)
        t1 = time.perf_counter()
        c1 = time.process_time()
        await ch.close()
        report(total, t0, t1, c0, c1)

    task.react(lambda r: defer.ensureDeferred(main(r)))


# ---- orchestration -------------------------------------------------------------------------------


def one_run(variant: str, size: int, args: argparse.Namespace) -> dict[str, Any]:
    me = [sys.executable, os.path.abspath(__file__)]
    rcmd = [*me, "--role", "receiver", "--variant", variant, "--nbytes", str(args.nbytes)]
    for opt in ("recv_size", "read_burst"):
        if getattr(args, opt) is not None:
            rcmd += ["--" + opt.replace("_", "-"), str(getattr(args, opt))]
    rcmd += ["--cpu", str(args.receiver_cpu)]
    procs: list[subprocess.Popen[str]] = []
    try:
        recv = subprocess.Popen(rcmd, stdout=subprocess.PIPE, text=True)
        procs.append(recv)
        assert recv.stdout is not None
        port = int(recv.stdout.readline())
        scmd = [*me, "--role", "sender", "--port", str(port), "--size", str(size)]
        scmd += ["--cpu", str(args.sender_cpu)]
        sender = subprocess.Popen(scmd, text=True)
        procs.append(sender)
        line = recv.stdout.readline()
        sender.wait(timeout=120)
        recv.wait(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    result: dict[str, Any] = json.loads(line)
    if result["bytes"] != size:
        raise SystemExit(f"{variant}: received {result['bytes']} of {size} bytes")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--role", choices=["orchestrator", "sender", "receiver"], default="orchestrator"
    )
    ap.add_argument("--variant", choices=["raw", "protocol", "channel"], default="channel")
    ap.add_argument("--size", default="1G", help="bytes per timed run (default 1G)")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    ap.add_argument(
        "--rss-sizes",
        default="512M,2G",
        help="comma-separated stream sizes of the RSS check ('' or 0: skip)",
    )
    ap.add_argument("--nbytes", type=int, default=1 << 20, help="channel read size (1 MiB)")
    ap.add_argument("--recv-size", type=int, help="SocketChannel recv_size (library default)")
    ap.add_argument("--read-burst", type=int, help="SocketChannel read_burst (library default)")
    ap.add_argument("--port", type=int)
    ap.add_argument("--cpu", type=int)
    ap.add_argument("--receiver-cpu", type=int, default=0)
    ap.add_argument("--sender-cpu", type=int, default=1)
    args = ap.parse_args()
    size = parse_size(args.size)

    if args.role == "sender":
        pin(args.cpu)
        run_sender(args.port, size)
        return
    if args.role == "receiver":
        pin(args.cpu)
        if args.variant == "protocol":
            run_protocol_receiver()
        elif args.variant == "raw":
            run_raw_receiver()
        else:
            options = {}
            if args.recv_size is not None:
                options["recv_size"] = args.recv_size
            if args.read_burst is not None:
                options["read_burst"] = args.read_burst
            run_channel_receiver(args.nbytes, options)
        return

    variants = ["raw", "protocol", "channel"]
    labels = {
        "raw": "stdlib recv_into 64K (reference)",
        "protocol": "Twisted Protocol (baseline)",
        "channel": "SocketChannel.read (qiotwisted)",
    }
    print(
        f"bulk receive over loopback TCP: {args.rounds} interleaved rounds of "
        f"{size / (1 << 20):.0f} MiB; channel reads of {args.nbytes} bytes; "
        f"receiver on CPU {args.receiver_cpu}, sender on CPU {args.sender_cpu}"
    )
    mw, mc, round_ratios = bulk_rounds(
        variants,
        labels,
        args.rounds,
        lambda v: one_run(v, size, args),
        order=lambda r: variants[r % 3 :] + variants[: r % 3],  # rotate who goes first
        ours="channel",
        baseline="protocol",
    )
    print(
        f"ratio channel / protocol: wall {mw['channel'] / mw['protocol']:.2f}x, "
        f"per receiver CPU second {mc['channel'] / mc['protocol']:.2f}x, "
        f"median of per-round wall ratios {statistics.median(round_ratios):.2f}x  (goal >= 1.0x)"
    )

    rss_sizes = [parse_size(x) for x in args.rss_sizes.split(",") if x.strip()]
    rss_sizes = [x for x in rss_sizes if x > 0]
    if rss_sizes:
        print()
        print("receiver peak RSS by stream size (goal <= 60 MiB whatever the size):")
        for v in variants:
            cells = []
            for n in rss_sizes:
                peak = one_run(v, n, args)["rss_kib"] / 1024
                cells.append(f"{n / (1 << 20):5.0f} MiB stream: {peak:5.1f} MiB")
            print(f"  {labels[v]:<34} " + "   ".join(cells))


if __name__ == "__main__":
    main()
