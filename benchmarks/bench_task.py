"""Task round trips vs Twisted's ``deferToThread``, side by side in one run.

Measures, for a trivial worker:

* throughput (tasks/s) with 1 task in flight and with 64 in flight;
* the worst lateness of a 1 ms ``LoopingCall`` while 64 tasks are kept in flight.

Baseline: ``threads.deferToThread`` on the reactor's pool.  Contenders:
``Task`` with a QEMU-style completion function, and ``Task`` awaited through its
Deferred.  Variants alternate in small chunks so the drift of a shared machine
hits all of them alike; the ratios compare figures from this same run (absolute
numbers drift a lot between runs, see ``reference/performance.md``).

Run: ``python benchmarks/bench_task.py [--rounds N] [--scale F]`` (a few seconds).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, task, threads

from qiotwisted.task import Task, get_default_pool

GOALS = {"n1": 1.3, "n64": 2.0, "late_ms": 5.0}


def _work(_task: Any = None, _opaque: Any = None) -> int:
    return 1


# Each driver starts `total` round trips, keeps `inflight` of them in flight,
# and returns a Deferred that fires when all have completed.
Driver = Callable[[Any, int, int], defer.Deferred[None]]


def drive_defer_to_thread(reactor: Any, inflight: int, total: int) -> defer.Deferred[None]:
    done: defer.Deferred[None] = defer.Deferred()
    state = {"started": 0, "finished": 0}

    def start() -> None:
        state["started"] += 1
        threads.deferToThread(_work).addCallback(finished)

    def finished(_: object) -> None:
        state["finished"] += 1
        if state["started"] < total:
            start()
        elif state["finished"] == total:
            done.callback(None)

    for _ in range(min(inflight, total)):
        start()
    return done


def drive_task_func(reactor: Any, inflight: int, total: int) -> defer.Deferred[None]:
    done: defer.Deferred[None] = defer.Deferred()
    state = {"started": 0, "finished": 0}

    def start() -> None:
        state["started"] += 1
        Task(None, finished, reactor=reactor).run_in_thread(_work)

    def finished(_task: Task[Any], _opaque: object) -> None:
        state["finished"] += 1
        if state["started"] < total:
            start()
        elif state["finished"] == total:
            done.callback(None)

    for _ in range(min(inflight, total)):
        start()
    return done


def drive_task_deferred(reactor: Any, inflight: int, total: int) -> defer.Deferred[None]:
    done: defer.Deferred[None] = defer.Deferred()
    state = {"started": 0, "finished": 0}

    def start() -> None:
        state["started"] += 1
        t: Task[int] = Task(None, reactor=reactor)
        t.run_in_thread(_work)
        t.deferred.addCallback(finished)

    def finished(_: object) -> None:
        state["finished"] += 1
        if state["started"] < total:
            start()
        elif state["finished"] == total:
            done.callback(None)

    for _ in range(min(inflight, total)):
        start()
    return done


async def throughput(reactor: Any, driver: Driver, inflight: int, total: int) -> float:
    t0 = time.perf_counter()
    await driver(reactor, inflight, total)
    return total / (time.perf_counter() - t0)


async def interleaved_rates(
    reactor: Any, drivers: dict[str, Driver], inflight: int, rounds: int, chunk: int
) -> dict[str, float]:
    """tasks/s per driver, from *rounds* alternating chunks of *chunk* round trips each.

    Alternating small chunks spreads the drift of a shared machine (other
    processes, CPU placement) over every variant alike.
    """
    spent = dict.fromkeys(drivers, 0.0)
    for _ in range(rounds):
        for name, driver in drivers.items():
            t0 = time.perf_counter()
            await driver(reactor, inflight, chunk)
            spent[name] += time.perf_counter() - t0
    return {name: rounds * chunk / t for name, t in spent.items()}


async def lateness(reactor: Any, driver: Driver, inflight: int, total: int) -> float:
    """Worst lateness (ms) of a 1 ms LoopingCall while *driver* keeps *inflight* tasks busy."""
    interval = 0.001
    worst = 0.0
    last: list[float] = []

    def tick() -> None:
        nonlocal worst
        now = time.perf_counter()
        if last:
            worst = max(worst, now - last[0] - interval)
            last[0] = now
        else:
            last.append(now)

    loop = task.LoopingCall(tick)
    loop.clock = reactor
    stopped = loop.start(interval, now=True)
    await driver(reactor, inflight, total)
    loop.stop()
    await stopped
    return worst * 1000.0


async def main(reactor: Any, argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=15, help="alternations per figure")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the work counts")
    args = parser.parse_args(argv)
    n1_chunk = max(10, int(200 * args.scale))
    n64_chunk = max(64, int(2000 * args.scale))

    drivers: dict[str, Driver] = {
        "deferToThread": drive_defer_to_thread,
        "Task (func)": drive_task_func,
        "Task (await)": drive_task_deferred,
    }
    # Warm both pools up so thread start-up is not measured.
    for d in drivers.values():
        await throughput(reactor, d, 64, 500)

    n1 = await interleaved_rates(reactor, drivers, 1, args.rounds, n1_chunk)
    n64 = await interleaved_rates(reactor, drivers, 64, args.rounds, n64_chunk)
    # Lateness: each window is sized to last ~0.1 s for that variant.
    late: dict[str, list[float]] = {name: [] for name in drivers}
    for _ in range(max(3, args.rounds // 3)):
        for name, d in drivers.items():
            late[name].append(await lateness(reactor, d, 64, int(n64[name] * 0.1 * args.scale)))
    late_ms = {name: statistics.median(xs) for name, xs in late.items()}
    worst_ms = {name: max(xs) for name, xs in late.items()}

    print(
        f"Task round trip vs deferToThread ({args.rounds} interleaved rounds;"
        f" reactor pool 10 threads, qio pool {get_default_pool(reactor).size} threads)"
    )
    print(
        f"{'variant':<16} {'N=1 tasks/s':>12} {'N=64 tasks/s':>13}"
        f" {'1ms timer late: median':>23} {'worst':>9}"
    )
    for name in drivers:
        print(
            f"{name:<16} {n1[name]:>12,.0f} {n64[name]:>13,.0f}"
            f" {late_ms[name]:>20.2f} ms {worst_ms[name]:>6.2f} ms"
        )
    base = "deferToThread"
    print()
    print(f"{'ratio vs deferToThread':<24} {'N=1':>7} {'N=64':>7} {'lateness':>9}   goals")
    for name in drivers:
        if name == base:
            continue
        print(
            f"{name:<24} {n1[name] / n1[base]:>6.2f}x {n64[name] / n64[base]:>6.2f}x"
            f" {late_ms[name]:>6.2f}ms   >={GOALS['n1']}x, >={GOALS['n64']}x,"
            f" <{GOALS['late_ms']}ms (baseline {late_ms[base]:.1f}ms)"
        )
    print(
        f"(lateness: each ~0.1 s window's worst tick; median and worst of"
        f" {len(late[base])} windows per variant)"
    )


if __name__ == "__main__":
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, sys.argv[1:])))
