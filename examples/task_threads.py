"""Four streams of blocking work, one reactor thread for every completion.

Each of four streams runs three steps.  A step is a ``Task`` whose worker does
some blocking work (here: hashing a buffer, then a short sleep, standing in for
disk or DNS) in a ``qio-worker-N`` thread; its completion function runs in the
reactor thread and starts the stream's next step.  The output shows the workers
spread over several threads while every completion shares the reactor's::

    python examples/task_threads.py

Exits by itself once the twelve steps are done.
"""

from __future__ import annotations

import hashlib
import sys
import threading
import time
from typing import Any

from twisted.internet import defer, task

from qiotwisted import Task

STREAMS = 4
STEPS = 3


def say(line: str) -> None:
    # One write per line, so lines from different threads do not interleave.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def worker(t: Task[str], step: tuple[int, int]) -> None:
    """Runs in a worker thread: blocking work is fine here."""
    stream, n = step
    me = threading.current_thread()
    say(f"stream {stream} step {n}: worker     thread={me.ident} ({me.name})")
    digest = hashlib.sha256(bytes([stream]) * 1_000_000).hexdigest()
    time.sleep(0.02)  # long enough that the four streams overlap
    t.set_result(digest[:12])


def run_stream(stream: int, done: defer.Deferred[None]) -> None:
    def step(n: int) -> None:
        Task(f"stream-{stream}", completed, n).run_in_thread(worker, (stream, n))

    def completed(t: Task[str], n: int) -> None:
        """Runs in the reactor thread."""
        err = t.propagate_error()
        me = threading.current_thread()
        outcome = f"failed: {err}" if err else f"sha256 {t.get_result()}"
        say(f"stream {stream} step {n}: completion thread={me.ident} ({me.name}) {outcome}")
        if n + 1 < STEPS:
            step(n + 1)
        else:
            done.callback(None)

    step(0)


async def main(reactor: Any) -> None:
    say(f"reactor thread={threading.get_ident()} ({threading.current_thread().name})")
    streams: list[defer.Deferred[None]] = []
    for stream in range(STREAMS):
        done: defer.Deferred[None] = defer.Deferred()
        streams.append(done)
        run_stream(stream, done)
    await defer.gatherResults(streams, consumeErrors=True)
    say("all streams done")


if __name__ == "__main__":
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor)))
