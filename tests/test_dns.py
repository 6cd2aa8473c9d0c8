"""Tests for qiotwisted.dns (QEMU's QIODNSResolver): real getaddrinfo, real threads."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.logger import capturedLogs

from qiotwisted import Resolver
from qiotwisted.dns import ResolvedAddress, ResolverError, get_instance
from qiotwisted.task import Task, set_trace_enabled
from qiotwisted.testing import MemoryWorkerPool

V4 = socket.AF_INET
V6 = socket.AF_INET6


@pytest.fixture
def resolver() -> Resolver:
    return Resolver()


def test_localhost_resolves_to_both_loopbacks(resolver: Resolver) -> None:
    """NetListener relies on this: listen on every address localhost names."""
    addrs = resolver.lookup_sync(("localhost", 5900))
    assert set(addrs) == {
        ResolvedAddress(V4, "127.0.0.1", 5900),
        ResolvedAddress(V6, "::1", 5900),
    }
    assert len(addrs) == 2  # no duplicates
    assert all(isinstance(a.family, socket.AddressFamily) for a in addrs)


def test_family_hint(resolver: Resolver) -> None:
    assert resolver.lookup_sync(("localhost", 1), V4) == [ResolvedAddress(V4, "127.0.0.1", 1)]
    assert resolver.lookup_sync(("localhost", 1), V6) == [ResolvedAddress(V6, "::1", 1)]


def test_numeric_addresses_and_brackets(resolver: Resolver) -> None:
    assert resolver.lookup_sync(("127.0.0.1", "80"), numeric=True) == [
        ResolvedAddress(V4, "127.0.0.1", 80)
    ]
    assert resolver.lookup_sync(("[::1]", 22)) == [ResolvedAddress(V6, "::1", 22)]


def test_service_name_becomes_a_port(resolver: Resolver) -> None:
    addrs = resolver.lookup_sync(("127.0.0.1", "ssh"))
    assert addrs == [ResolvedAddress(V4, "127.0.0.1", 22)]


def test_empty_host_is_the_wildcard(resolver: Resolver) -> None:
    """QEMU passes NULL for "" with AI_PASSIVE: the any-addresses, to listen on."""
    addrs = resolver.lookup_sync(("", 0))
    assert ResolvedAddress(V4, "0.0.0.0", 0) in addrs
    assert {a.family for a in addrs} <= {V4, V6}


def test_unix_path_passes_through(resolver: Resolver) -> None:
    assert resolver.lookup_sync("/run/qemu.sock") == [
        ResolvedAddress(socket.AF_UNIX, "/run/qemu.sock", 0)
    ]


def test_errors_use_qemus_messages(resolver: Resolver) -> None:
    with pytest.raises(ResolverError, match=r"^host not specified$"):
        resolver.lookup_sync((None, 80))
    with pytest.raises(ResolverError, match=r"^address resolution failed for localhost:80: ") as e:
        resolver.lookup_sync(("localhost", 80), numeric=True)  # AI_NUMERICHOST: no names
    assert isinstance(e.value.__cause__, socket.gaierror)
    with pytest.raises(ValueError, match="family"):
        resolver.lookup_sync(("localhost", 80), socket.AF_UNIX)
    with pytest.raises(ValueError, match="host, port"):
        resolver.lookup_sync(("localhost", 80, 0))  # type: ignore[arg-type]  # wrong on purpose


def test_lookup_on_the_memory_pool() -> None:
    """The async lookup is a Task: getaddrinfo in the worker, func in the reactor side."""
    pool = MemoryWorkerPool()
    resolver = Resolver(pool=pool)
    seen: list[Any] = []

    def func(task: Task[Any], opaque: str) -> None:
        seen.append((task.source, opaque, Resolver.lookup_result(task), task.propagate_error()))

    task = resolver.lookup(("127.0.0.1", 7), func=func, opaque="op")
    assert seen == [] and pool.queued == 1
    pool.run_until_idle()
    assert seen == [(resolver, "op", [ResolvedAddress(V4, "127.0.0.1", 7)], None)]
    assert task.deferred.called


def test_lookup_error_on_the_memory_pool() -> None:
    pool = MemoryWorkerPool()
    task = Resolver(pool=pool).lookup((None, 1))
    pool.run_until_idle()
    caught: list[Any] = []
    task.deferred.addErrback(caught.append)
    assert caught[0].check(ResolverError)
    assert Resolver.lookup_result(task) == []


@pytest.fixture
def trace() -> Iterator[None]:
    set_trace_enabled(True)
    try:
        yield
    finally:
        set_trace_enabled(False)


async def test_lookup_runs_getaddrinfo_in_a_worker_thread(
    reactor: Any, resolver: Resolver, trace: None
) -> None:
    completion_thread: list[int] = []

    def func(task: Task[Any], _: object) -> None:
        completion_thread.append(threading.get_ident())

    with capturedLogs() as events:
        addrs = await resolver.lookup(("localhost", 0), func=func)
    assert ResolvedAddress(V4, "127.0.0.1", 0) in addrs
    assert ResolvedAddress(V6, "::1", 0) in addrs
    me = threading.get_ident()
    assert completion_thread == [me]
    run = [e["thread_id"] for e in events if e.get("event") == "qio_task_thread_run"]
    assert len(run) == 1 and run[0] != me


async def test_lookup_failure_is_delivered(reactor: Any, resolver: Resolver) -> None:
    with pytest.raises(ResolverError, match="address resolution failed for no-such:1"):
        await resolver.lookup(("no-such", 1), numeric=True)


def test_get_instance_is_a_singleton() -> None:
    assert get_instance() is get_instance()
    assert isinstance(get_instance(), Resolver)
