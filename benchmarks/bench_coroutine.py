"""Coroutine switches vs the Twisted ways of doing the same hand-off, side by side in one run.

One "round trip" hands control from a driver to a suspended piece of code and
back.  Variants:

* ``generator send`` (floor): a bare generator, ``gen.send(None)`` against
  ``yield`` in a loop; the cheapest switch Python has.
* ``Coroutine enter/yield``: ``co.enter()`` against ``await coroutine_yield()``
  (QEMU's ``/perf/yield``).
* ``Deferred callback``: the plain Twisted hand-off without a coroutine: a new
  ``Deferred`` with one callback, fired by the driver.
* ``Coroutine on Deferred``: a Coroutine awaiting a fresh Deferred that the
  driver fires (the ``qio_channel_yield`` + ``aio_co_wake`` path).
* ``fromCoroutine on Deferred``: the same ``async def`` loop driven by Twisted's
  ``Deferred.fromCoroutine`` (the baseline for the line above).
* ``CoMutex ping-pong``: two Coroutines handing a contended CoMutex back and
  forth; one round trip = one lock hand-off (waker queued, run after yield).

Variants alternate in rounds so the drift of a shared machine hits all alike;
figures are medians over the rounds.  Bounded: about 5-10 s with the defaults.

Run: ``python benchmarks/bench_coroutine.py [--rounds N] [--seconds S]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Generator
from typing import Any

from twisted.internet.defer import Deferred

from qiotwisted.coroutine import CoMutex, Coroutine, coroutine_yield

Bench = Callable[[int], float]  # runs n round trips, returns the elapsed seconds


def bench_generator(n: int) -> float:
    def gen() -> Generator[None, None, None]:
        while True:
            yield

    g = gen()
    next(g)
    send = g.send
    t0 = time.perf_counter()
    for _ in range(n):
        send(None)
    return time.perf_counter() - t0


def bench_coroutine_yield(n: int) -> float:
    async def loop(_: object) -> None:
        while True:
            await coroutine_yield()

    co = Coroutine(loop)
    co.enter()
    enter = co.enter
    t0 = time.perf_counter()
    for _ in range(n):
        enter()
    return time.perf_counter() - t0


def bench_deferred_callback(n: int) -> float:
    count = [0]

    def step(_: object) -> None:
        count[0] += 1

    t0 = time.perf_counter()
    for _ in range(n):
        d: Deferred[None] = Deferred()
        d.addCallback(step)
        d.callback(None)
    elapsed = time.perf_counter() - t0
    assert count[0] == n
    return elapsed


def _deferred_loop(n: int, slot: list[Deferred[None]]) -> Any:
    async def loop(_: object = None) -> int:
        for _ in range(n):
            d: Deferred[None] = Deferred()
            slot[0] = d
            await d
        return n

    return loop


def bench_coroutine_on_deferred(n: int) -> float:
    slot: list[Deferred[None]] = []
    slot.append(Deferred())
    co = Coroutine(_deferred_loop(n, slot))
    co.enter()
    t0 = time.perf_counter()
    for _ in range(n):
        slot[0].callback(None)
    elapsed = time.perf_counter() - t0
    assert co.result == n
    return elapsed


def bench_fromcoroutine_on_deferred(n: int) -> float:
    slot: list[Deferred[None]] = []
    slot.append(Deferred())
    done = Deferred.fromCoroutine(_deferred_loop(n, slot)())
    t0 = time.perf_counter()
    for _ in range(n):
        slot[0].callback(None)
    elapsed = time.perf_counter() - t0
    out: list[int] = []
    done.addCallback(out.append)
    assert out == [n]
    return elapsed


def bench_comutex_pingpong(n: int) -> float:
    m = CoMutex()
    handoffs = [0]

    async def player(_: object) -> None:
        while handoffs[0] < n:
            await m.lock()
            handoffs[0] += 1
            await coroutine_yield()
            m.unlock()

    a, b = Coroutine(player), Coroutine(player)
    t0 = time.perf_counter()
    a.enter()  # a holds the lock and yields
    b.enter()  # b waits for it
    for _ in range(2 * n + 2):  # bounded: each enter of the holder hands the lock over once
        if a.done and b.done:
            break
        holder = m.holder
        if holder is None:
            break
        holder.enter()
    elapsed = time.perf_counter() - t0
    assert handoffs[0] >= n
    return elapsed


VARIANTS: list[tuple[str, Bench]] = [
    ("generator send (floor)", bench_generator),
    ("Coroutine enter/yield", bench_coroutine_yield),
    ("Deferred callback (Twisted hand-off)", bench_deferred_callback),
    ("Coroutine on Deferred", bench_coroutine_on_deferred),
    ("fromCoroutine on Deferred (Twisted)", bench_fromcoroutine_on_deferred),
    ("CoMutex ping-pong (lock hand-offs)", bench_comutex_pingpong),
]


def calibrate(bench: Bench, target_s: float) -> int:
    """Pick n so that one run takes about *target_s*; bounded doubling."""
    n = 1000
    for _ in range(20):
        if bench(n) >= target_s / 4:
            break
        n *= 2
    return max(1000, int(n * target_s / max(bench(n), 1e-6)))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median)")
    parser.add_argument("--seconds", type=float, default=0.15, help="time per variant per round")
    args = parser.parse_args(argv)
    rounds = max(1, min(args.rounds, 50))
    seconds = max(0.01, min(args.seconds, 1.0))  # keeps the whole run well under 30 s

    sizes = {name: calibrate(bench, seconds) for name, bench in VARIANTS}
    rates: dict[str, list[float]] = {name: [] for name, _ in VARIANTS}
    for r in range(rounds):
        order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
        for name, bench in order:
            n = sizes[name]
            rates[name].append(n / bench(n))

    med = {name: statistics.median(v) for name, v in rates.items()}
    base = med["Coroutine enter/yield"]
    print(f"round trips per second, median of {rounds} interleaved rounds")
    print(f"{'variant':40} {'rate/s':>12} {'ns/trip':>9} {'vs enter/yield':>15}")
    for name, _ in VARIANTS:
        rate = med[name]
        print(f"{name:40} {rate:12,.0f} {1e9 / rate:9.0f} {rate / base:14.2f}x")
    print()
    print(
        "Coroutine enter/yield vs Deferred callback hand-off: "
        f"{base / med['Deferred callback (Twisted hand-off)']:.2f}x"
    )
    print(
        "Coroutine on Deferred vs fromCoroutine on Deferred: "
        f"{med['Coroutine on Deferred'] / med['fromCoroutine on Deferred (Twisted)']:.2f}x"
    )
    print(
        "generator floor vs Coroutine enter/yield: "
        f"{med['generator send (floor)'] / base:.2f}x faster"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
