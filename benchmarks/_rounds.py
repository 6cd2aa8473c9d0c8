"""Interleaved benchmark rounds of bulk receivers, and their table of medians.

Shared by ``bench_bulk.py`` and ``bench_tls.py``: each round runs every
variant once (in the order *order* gives), and a variant's run returns
``bytes``, ``seconds``, ``cpu_seconds`` and ``rss_kib``.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any


def bulk_rounds(
    variants: Sequence[str],
    labels: dict[str, str],
    rounds: int,
    run: Callable[[str], dict[str, Any]],
    *,
    order: Callable[[int], Sequence[str]],
    ours: str,
    baseline: str,
    digits: int = 2,
    detail: Callable[[dict[str, Any]], str] = lambda _: "",
) -> tuple[dict[str, float], dict[str, float], list[float]]:
    """Run and print the rounds and a medians table.

    Returns (median GB/s wall, median GB/s per CPU second, per-round wall
    ratios of *ours* to *baseline*).
    """
    wall: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    rss: dict[str, list[int]] = {v: [] for v in variants}
    per_round: list[float] = []
    for r in range(rounds):
        this: dict[str, float] = {}
        for v in order(r):
            res = run(v)
            gbps = res["bytes"] / res["seconds"] / 1e9
            cpu_gbps = res["bytes"] / max(res["cpu_seconds"], 1e-9) / 1e9
            wall[v].append(gbps)
            cpu[v].append(cpu_gbps)
            rss[v].append(res["rss_kib"])
            this[v] = gbps
            print(
                f"  round {r + 1} {v:8s} {gbps:6.{digits}f} GB/s wall  "
                f"{cpu_gbps:6.{digits}f} GB/cpu-s  {detail(res)}"
                f"peak RSS {res['rss_kib'] / 1024:5.1f} MiB"
            )
        per_round.append(this[ours] / this[baseline])
    mw = {v: statistics.median(wall[v]) for v in variants}
    mc = {v: statistics.median(cpu[v]) for v in variants}
    width = max(len(label) for label in labels.values()) + 2
    print()
    print(f"{'receiver (medians)':<{width}}{'GB/s wall':>10}{'GB/cpu-s':>10}{'peak RSS MiB':>14}")
    for v in variants:
        print(
            f"{labels[v]:<{width}}{mw[v]:>10.{digits}f}{mc[v]:>10.{digits}f}"
            f"{max(rss[v]) / 1024:>14.1f}"
        )
    return mw, mc, per_round
