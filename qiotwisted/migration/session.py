"""A recording session on disk: one directory per migration, one file per channel.

Layout (``OUTPUT`` is ``--output``)::

    OUTPUT/.incoming-<stamp>/       while the migration is running
    OUTPUT/<stamp>/                 once it ended (an atomic rename)
        main.bin                    the main channel's bytes, exactly as received
        multifd-<id>.bin            one per multifd channel, named by the id in its init packet
        manifest.json               status, reason, channels (kind, bytes, sha256), peer, times

Everything here that touches the disk or hashes runs in a worker thread: the
reactor only hands over chunks and waits for the sink to drain (backpressure).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
import uuid as _uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from .._pool import WorkerPool
from ..task import Task
from . import wire

__all__ = ["ChannelSink", "Session", "SessionStatus", "run_in_worker"]

_R = TypeVar("_R")

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class SessionStatus:
    COMPLETE = "complete"
    INCOMPLETE = "incomplete"
    RECORDING = "recording"


@dataclass
class _ChannelState:
    kind: str
    filename: str
    channel_id: int | None = None
    bytes: int = 0
    sha256: str = ""
    ended: bool = False
    error: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)


class ChannelSink:
    """Streams one channel's bytes to a file, hashing and walking them, off the reactor.

    :meth:`write` is called in the reactor thread and never blocks: chunks are
    batched and handed to one worker job at a time (so the file is written in
    order).  :meth:`drained` fires once fewer than *max_pending* bytes are
    waiting, which is how the reader applies backpressure to the network.
    """

    log = Logger()

    def __init__(
        self,
        path: Path,
        walker: wire.MainStreamWalker | wire.MultifdStreamWalker,
        *,
        pool: WorkerPool | None = None,
        reactor: Any = None,
        max_pending: int = 16 * 1024 * 1024,
    ) -> None:
        self.path = path
        self.walker = walker
        self._pool = pool
        self._reactor = reactor
        self._max_pending = max_pending
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._busy = False
        self._drain_waiters: list[Deferred[None]] = []
        self._idle_waiters: list[Deferred[None]] = []
        self._hash = hashlib.sha256()
        self._file: Any = None
        self.bytes = 0
        self.error: BaseException | None = None

    # -- reactor thread ------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.error is not None:
            return
        self._pending.append(data)
        self._pending_bytes += len(data)
        self.bytes += len(data)
        if not self._busy:
            self._start_job()

    def drained(self) -> Deferred[None]:
        """Fires when the backlog is below the limit (at once if it already is)."""
        if self._pending_bytes < self._max_pending or self.error is not None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._drain_waiters.append(d)
        return d

    def finish(self, eof: bool) -> Deferred[None]:
        """Flush everything, close the file; *eof* tells the walker the stream ended."""
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        if not self._busy:
            self._start_job()
        return d.addCallback(lambda _: self._close(eof))

    def _close(self, eof: bool) -> Deferred[None]:
        return run_in_worker(self._close_in_thread, eof, pool=self._pool, reactor=self._reactor)

    def _start_job(self) -> None:
        batch, self._pending = self._pending, []
        self._pending_bytes = 0
        self._busy = True
        run_in_worker(self._write_in_thread, batch, pool=self._pool, reactor=self._reactor).addBoth(
            self._job_done
        )
        self._wake(self._drain_waiters)

    def _job_done(self, result: object) -> None:
        self._busy = False
        from twisted.python.failure import Failure

        if isinstance(result, Failure):
            self.error = result.value
            self.log.error(
                "writing {path} failed: {error}", path=str(self.path), error=result.value
            )
            self._pending.clear()
            self._pending_bytes = 0
        if self._pending:
            self._start_job()
            return
        self._wake(self._drain_waiters)
        self._wake(self._idle_waiters)

    @staticmethod
    def _wake(waiters: list[Deferred[None]]) -> None:
        pending = list(waiters)
        waiters.clear()
        for d in pending:
            d.callback(None)

    # -- worker thread -----------------------------------------------------------------

    def _write_in_thread(self, batch: list[bytes]) -> None:
        if self._file is None:
            self._file = open(self.path, "wb", buffering=0)
        for chunk in batch:
            view = memoryview(chunk)
            while view:
                n = self._file.write(view)
                view = view[n:]
            self._hash.update(chunk)
            self.walker.feed(chunk)

    def _close_in_thread(self, eof: bool) -> None:
        if eof:
            self.walker.feed(b"")
        if self._file is None:
            self._file = open(self.path, "wb", buffering=0)
        self._file.close()

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


class Session:
    """One migration being recorded: its directory, channels and manifest.

    Created in the reactor thread; the directory is made in a worker by
    :meth:`open`.  :meth:`close` writes the manifest and renames the
    directory into place, both in a worker, and fires with the final path.
    """

    log = Logger()

    def __init__(
        self,
        output: Path,
        *,
        peer: str,
        pool: WorkerPool | None = None,
        reactor: Any = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.output = output
        self.peer = peer
        self._pool = pool
        self._reactor = reactor
        self._clock = clock
        self.started = clock()
        self.ended: float | None = None
        self.stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self.started)) + (
            "-" + secrets.token_hex(3)
        )
        self.name = self.stamp
        self.tmp_dir = output / f".incoming-{self.stamp}"
        self.final_dir = output / self.stamp
        self.channels: list[_ChannelState] = []
        self.sinks: dict[str, ChannelSink] = {}
        self.extra: dict[str, Any] = {}
        self.uuid: _uuid.UUID | None = None
        self.has_main = False
        self.closing = False
        self.status: str = SessionStatus.RECORDING
        self.reason: str | None = None

    def open(self) -> Deferred[None]:
        return run_in_worker(self._mkdir, pool=self._pool, reactor=self._reactor)

    def _mkdir(self) -> None:
        self.output.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir()

    def add_channel(self, kind: str, filename: str, channel_id: int | None = None) -> ChannelSink:
        walker: wire.MainStreamWalker | wire.MultifdStreamWalker
        walker = wire.MainStreamWalker() if kind == "main" else wire.MultifdStreamWalker()
        sink = ChannelSink(self.tmp_dir / filename, walker, pool=self._pool, reactor=self._reactor)
        self.channels.append(_ChannelState(kind=kind, filename=filename, channel_id=channel_id))
        if kind == "main":
            self.has_main = True
        self.sinks[filename] = sink
        return sink

    def channel_ended(self, filename: str, error: str | None) -> None:
        state = next(c for c in self.channels if c.filename == filename)
        sink = self.sinks[filename]
        state.ended = True
        state.error = error or (str(sink.error) if sink.error else None)
        state.bytes = sink.bytes
        state.sha256 = sink.sha256
        state.summary = sink.walker.summary()

    def verdict(self) -> tuple[str, str | None]:
        """(status, reason): ``complete`` only when the content proves it."""
        mains = [c for c in self.channels if c.kind == "main"]
        if len(mains) != 1:
            return (
                SessionStatus.INCOMPLETE,
                "no main channel" if not mains else "several main channels",
            )
        main = mains[0]
        main_walker = self.sinks[main.filename].walker
        assert isinstance(main_walker, wire.MainStreamWalker)
        for c in self.channels:
            if c.error:
                return SessionStatus.INCOMPLETE, f"{c.filename}: {c.error}"
        if not main_walker.complete:
            return SessionStatus.INCOMPLETE, f"main.bin: {main_walker.reason}"
        ram_sections = main_walker.ram_sections
        for c in self.channels:
            if c.kind != "multifd":
                continue
            w = self.sinks[c.filename].walker
            assert isinstance(w, wire.MultifdStreamWalker)
            if not w.ok:
                return SessionStatus.INCOMPLETE, f"{c.filename}: {w.reason}"
            if not w.is_complete(ram_sections):
                return SessionStatus.INCOMPLETE, (
                    f"{c.filename}: {w.sync_packets} SYNC packets, main stream has "
                    f"{ram_sections} ram sections"
                )
        return SessionStatus.COMPLETE, None

    def manifest(self, status: str, reason: str | None) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "status": status,
            "reason": reason,
            "peer": self.peer,
            "started": _iso(self.started),
            "ended": _iso(self.ended) if self.ended is not None else None,
            "channels": [
                {
                    "kind": c.kind,
                    "file": c.filename,
                    **({"id": c.channel_id} if c.channel_id is not None else {}),
                    "bytes": c.bytes,
                    "sha256": c.sha256,
                    **({"error": c.error} if c.error else {}),
                    "stream": c.summary,
                }
                for c in self.channels
            ],
            **({"uuid": str(self.uuid)} if self.uuid is not None else {}),
            **self.extra,
        }

    def close(self) -> Deferred[Path]:
        """Write the manifest and move the session into place; fires with its directory."""
        self.ended = self._clock()
        status, reason = self.verdict()
        manifest = self.manifest(status, reason)
        self.status, self.reason = status, reason
        return run_in_worker(self._finalise, manifest, pool=self._pool, reactor=self._reactor)

    def _finalise(self, manifest: dict[str, Any]) -> Path:
        tmp = self.tmp_dir / (MANIFEST + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.tmp_dir / MANIFEST)
        os.replace(self.tmp_dir, self.final_dir)
        return self.final_dir


def run_in_worker(
    fn: Callable[..., _R], *args: Any, pool: WorkerPool | None = None, reactor: Any = None
) -> Deferred[_R]:
    """Run ``fn(*args)`` as a Task in the worker pool; the Deferred fires in the reactor thread."""

    def worker(task: Task[_R], _opaque: object) -> None:
        task.set_result(fn(*args))

    task: Task[_R] = Task(None, reactor=reactor, pool=pool)
    task.run_in_thread(worker)
    return task.deferred


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"
