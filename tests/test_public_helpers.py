"""Small public helpers: run_in_worker (the one-liner Task) and port_of."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from qiotwisted import run_in_worker


async def test_runs_in_a_worker_and_fires_in_the_reactor_thread(reactor: Any) -> None:
    seen: list[int] = []

    def blocking(a: int, b: int) -> int:
        seen.append(threading.get_ident())
        return a + b

    def completed(value: int) -> int:
        seen.append(threading.get_ident())
        return value

    assert await run_in_worker(blocking, 2, 3, reactor=reactor).addCallback(completed) == 5
    worker, completion = seen
    assert worker != threading.get_ident()
    assert completion == threading.get_ident()


async def test_exceptions_fail_the_deferred(reactor: Any) -> None:
    def boom() -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        await run_in_worker(boom, reactor=reactor)


def test_port_of_reads_twisted_and_qemu_style_addresses() -> None:
    from twisted.internet.address import IPv4Address, UNIXAddress

    from qiotwisted import port_of
    from qiotwisted.channel import InetSocketAddress

    assert port_of(IPv4Address("TCP", "127.0.0.1", 4444)) == 4444
    assert port_of(InetSocketAddress("::1", 5555)) == 5555
    with pytest.raises(ValueError, match="no TCP port"):
        port_of(UNIXAddress(b"/run/q.sock"))
