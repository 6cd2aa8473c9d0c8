"""Test harness: reactor hygiene and a per-test Deferred timeout.

pytest-twisted runs one reactor for the whole session and has neither trial's
dirty-reactor check nor a timeout; a hung Deferred would hang CI.  The fixture
and the collection hook below add both (twisted-notes.md, B.8).
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from hypothesis import settings
from twisted.internet import defer, task

DEFAULT_TIMEOUT_S = 10.0

# Property tests: no per-example deadline (this 2-core machine is shared and
# swings), and in CI a derandomized run, so a red CI is reproducible.
settings.register_profile("default", deadline=None)
settings.register_profile("ci", deadline=None, derandomize=True, database=None)
settings.load_profile("ci" if os.environ.get("CI") else "default")


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


@pytest.fixture
def reactor() -> Any:
    """The running global reactor (pytest-twisted installs and runs it)."""
    return _reactor()


@pytest.fixture(autouse=True)
def reactor_hygiene() -> Iterator[None]:
    """Fail a test that leaves delayed calls or selectables behind."""
    r = _reactor()
    calls0 = set(r.getDelayedCalls())
    sel0 = set(r.getReaders()) | set(r.getWriters())
    yield
    # Let asynchronous loseConnection / connectionLost finish first.
    pytest_twisted.blockon(task.deferLater(r, 0.02))
    internal: set[object] = getattr(r, "_internalReaders", set())
    calls = [c for c in r.getDelayedCalls() if c not in calls0 and c.active()]
    sel = (set(r.getReaders()) | set(r.getWriters())) - sel0 - internal
    for c in calls:
        c.cancel()
    for s in sel:
        s.loseConnection()
    assert not calls and not sel, f"dirty reactor: calls={calls} selectables={sel}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Wrap every ``async def`` test so a hung Deferred fails with TimeoutError."""
    for item in items:
        fn = getattr(item, "obj", None)
        if not inspect.iscoroutinefunction(fn):
            continue
        marker = item.get_closest_marker("timeout_s")
        limit = float(marker.args[0]) if marker else DEFAULT_TIMEOUT_S

        @functools.wraps(fn)
        def wrapper(*a: Any, __fn: Any = fn, __limit: float = limit, **kw: Any) -> Any:
            return defer.Deferred.fromCoroutine(__fn(*a, **kw)).addTimeout(__limit, _reactor())

        item.obj = wrapper  # type: ignore[attr-defined]  # pytest.Item has no typed obj
