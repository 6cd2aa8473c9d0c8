"""A recording session on disk: one directory per migration, one file per channel.

Layout (``OUTPUT`` is ``--output``)::

    OUTPUT/.incoming-<stamp>/       while the migration is running
    OUTPUT/<stamp>/                 once it ended (an atomic rename)
        main.bin                    the main channel's bytes, exactly as received
        multifd-<id>.bin            one per multifd channel, named by the id in its init packet
        manifest.json               status, reason, channels (kind, bytes, sha256), peer, times

Everything here that touches the disk or hashes runs in a worker thread: the
reactor only hands over chunks and waits for the sink to drain (backpressure).

Crash safety: a session is renamed into place only after its manifest was
written and synced, so a directory without the ``.incoming-`` prefix always
holds a complete, parseable manifest.  A service that dies mid-session
(SIGKILL, a crash) leaves ``.incoming-<stamp>``; the next start files it as
``incomplete`` (:func:`recover_incoming`), nothing deleted.
"""

from __future__ import annotations

import calendar
import contextlib
import hashlib
import json
import os
import secrets
import time
import uuid as _uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from .._pool import WorkerPool
from ..task import run_in_worker
from . import wire

__all__ = [
    "ChannelSink",
    "Session",
    "SessionStatus",
    "recover_incoming",
]


MANIFEST = "manifest.json"
_STAMP = "%Y%m%dT%H%M%SZ"
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
    received: int = 0
    sha256: str = ""
    ended: bool = False
    error: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)


class ChannelSink:
    """Streams one channel's bytes to a file, walking and hashing them, off the reactor.

    :meth:`write` is called in the reactor thread and never blocks.  Two chains
    of worker jobs, each one job at a time, do the work:

    * the *write* chain appends batches to the file and feeds the stream walker;
      :meth:`drained` fires once fewer than *max_pending* bytes wait for it,
      which is how the reader applies backpressure to the network;
    * the *hash* chain re-reads what was written (from the page cache) and
      feeds sha256.  Hashing is the slowest step (~0.9 GB/s here, slower than
      the network), so it trails behind instead of slowing the source down;
      memory stays bounded because it reads the file, not queued chunks.

    :meth:`finish` fires once the file is closed and fully hashed.
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
        self._writing = False
        self._hashing = False
        # Hash only once the stream has ended: sha256 (~0.9 GB/s here) is the
        # most expensive step, and run alongside it would take CPU from the
        # receive path and the source itself, slowing the live migration.
        self._finishing = False
        self._written = 0  # bytes on disk; updated in the reactor thread after each write job
        self._hashed = 0
        self._drain_waiters: list[Deferred[None]] = []
        self._idle_waiters: list[Deferred[None]] = []
        self._hash = hashlib.sha256()
        self._file: Any = None
        self._reader: Any = None
        # Bytes on disk, counted by the write job itself (worker thread), so a
        # batch that fails halfway (EFBIG, ENOSPC) still counts what it wrote.
        self._on_disk = 0
        self.bytes = 0
        self.error: BaseException | None = None
        self.hash_error: BaseException | None = None
        #: Called once, in the reactor thread, with the first error (a write or
        #: read-back failed): the owner can stop feeding at once rather than at
        #: its next write.
        self.on_error: Callable[[BaseException], object] | None = None

    # -- reactor thread ------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.error is not None:
            return
        self._pending.append(data)
        self._pending_bytes += len(data)
        self.bytes += len(data)
        if not self._writing:
            self._start_write()

    def drained(self) -> Deferred[None]:
        """Fires when the write backlog is below the limit (at once if it already is)."""
        if self._pending_bytes < self._max_pending or self.error is not None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._drain_waiters.append(d)
        return d

    def finish(self, eof: bool) -> Deferred[None]:
        """Write and hash everything, close the file; *eof* tells the walker the stream ended."""
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        self._finishing = True
        self._maybe_idle()
        return d.addCallback(
            lambda _: run_in_worker(
                self._close_in_thread, eof, pool=self._pool, reactor=self._reactor
            )
        )

    def _start_write(self) -> None:
        batch, self._pending = self._pending, []
        self._pending_bytes = 0
        self._writing = True
        size = sum(len(c) for c in batch)
        run_in_worker(self._write_in_thread, batch, pool=self._pool, reactor=self._reactor).addBoth(
            self._write_done, size
        )
        self._wake(self._drain_waiters)

    def _write_done(self, result: object, size: int) -> None:
        self._writing = False
        self._written = self._on_disk
        if isinstance(result, Failure):
            self._fail(result)
        if not self._hashing and self._finishing:
            self._start_hash()
        if self._pending:
            self._start_write()
            return
        self._wake(self._drain_waiters)
        self._maybe_idle()

    def _start_hash(self) -> None:
        # Hashing goes on after a write error: the manifest's sha256 then
        # covers exactly the bytes that reached the file.
        if self._hashed >= self._written or self.hash_error is not None:
            return
        self._hashing = True
        run_in_worker(
            self._hash_in_thread,
            self._hashed,
            self._written,
            pool=self._pool,
            reactor=self._reactor,
        ).addBoth(self._hash_done)

    def _hash_done(self, result: object) -> None:
        self._hashing = False
        if isinstance(result, Failure):
            self.hash_error = result.value
            self._fail(result)
        else:
            assert isinstance(result, int)
            self._hashed = result
            if self._finishing:
                self._start_hash()
        self._maybe_idle()

    def _fail(self, failure: Failure) -> None:
        self._pending.clear()
        self._pending_bytes = 0
        if self.error is None:
            error = self.error = failure.value
            assert error is not None
            self.log.error("recording to {path} failed: {error}", path=str(self.path), error=error)
            if self.on_error is not None:
                try:
                    self.on_error(error)
                except Exception:
                    self.log.failure("on_error callback of {path}", path=str(self.path))

    def _maybe_idle(self) -> None:
        if self._writing or self._hashing or self._pending or not self._finishing:
            return
        if self.hash_error is None and self._hashed < self._written:
            self._start_hash()
            return
        self._wake(self._idle_waiters)

    @staticmethod
    def _wake(waiters: list[Deferred[None]]) -> None:
        pending = list(waiters)
        waiters.clear()
        for d in pending:
            d.callback(None)

    # -- worker threads (one job of each chain at a time) -------------------------------

    def _open_in_thread(self) -> None:
        if self._file is None:
            # A channel can join a session before the job making its directory
            # ran (both are worker jobs, on different threads).
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "wb", buffering=0)  # closed in _close_in_thread
            self._reader = open(self.path, "rb", buffering=0)

    def _write_in_thread(self, batch: list[bytes]) -> None:
        self._open_in_thread()
        for chunk in batch:
            view = memoryview(chunk)
            while view:
                n = self._file.write(view)
                self._on_disk += n
                view = view[n:]
            self._walk(chunk)

    def _walk(self, data: bytes) -> None:
        # A malformed stream is still recorded byte for byte: the walker keeps
        # its first error (the session's verdict reports it) and ignores the rest.
        try:
            self.walker.feed(data)
        except wire.WireError:
            pass

    def _hash_in_thread(self, start: int, stop: int) -> int:
        buf = bytearray(min(stop - start, 4 << 20))
        view = memoryview(buf)
        offset = start
        fd = self._reader.fileno()
        while offset < stop:
            n = os.preadv(fd, [view[: min(len(buf), stop - offset)]], offset)
            if n <= 0:
                raise OSError(f"{self.path}: short read at offset {offset} while hashing")
            self._hash.update(view[:n])
            offset += n
        return offset

    def _close_in_thread(self, eof: bool) -> None:
        if eof:
            self._walk(b"")
        try:
            self._open_in_thread()
        finally:
            if self._file is not None:
                self._file.close()
            if self._reader is not None:
                self._reader.close()

    @property
    def on_disk(self) -> int:
        """Bytes written to the file (reactor thread: as of the last finished write job)."""
        return self._written

    @property
    def sha256(self) -> str:
        """sha256 of the file's bytes; empty if they could not all be read back."""
        return "" if self.hash_error is not None else self._hash.hexdigest()


class Session:
    """One migration being recorded: its directory, channels and manifest.

    Created in the reactor thread; the directory is made in a worker by
    :meth:`open`, and channels that join meanwhile wait for it with
    :meth:`when_open`.  :meth:`close` writes the manifest and renames the
    directory into place, both in a worker, and fires with the final path.

    :attr:`stop_reason` is set by whoever ends the session early (the service
    stopping, the disk filling up, a channel going idle): the verdict then
    names it, unless the content proves the migration complete anyway.
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
        # Milliseconds keep sessions of the same second in start order when
        # names are sorted; the random suffix keeps them unique across processes.
        millis = int(self.started * 1000) % 1000
        self.stamp = (
            time.strftime(_STAMP, time.gmtime(self.started)).replace("Z", f".{millis:03d}Z")
            + "-"
            + secrets.token_hex(3)
        )
        self.name = self.stamp
        self.tmp_dir = output / f".incoming-{self.stamp}"
        self.final_dir = output / self.stamp
        self.channels: list[_ChannelState] = []
        self.sinks: dict[str, ChannelSink] = {}
        self.extra: dict[str, Any] = {}
        self.uuid: _uuid.UUID | None = None
        self.has_main = False
        self.multifd_ids: set[int] = set()
        self.closing = False
        self.status: str = SessionStatus.RECORDING
        self.reason: str | None = None
        self.stop_reason: str | None = None
        #: The network channels feeding this session (owned by the recorder),
        #: so that ending the session early can close them all.
        self.live: set[Any] = set()
        self.opened = False
        self.open_error: str | None = None
        self._open_waiters: list[Deferred[None]] = []

    def open(self) -> Deferred[None]:
        """Make the session directory (worker thread); fires once it exists, or fails."""
        d = run_in_worker(self._mkdir, pool=self._pool, reactor=self._reactor)

        def done(result: object) -> object:
            if isinstance(result, Failure):
                self.open_error = str(result.value)
            else:
                self.opened = True
            waiters, self._open_waiters = self._open_waiters, []
            for w in waiters:
                w.callback(None)
            return result

        return d.addBoth(done)

    def fail_open(self, reason: str) -> None:
        """The session will never open (refused before :meth:`open`); wake the waiters."""
        self.open_error = reason
        waiters, self._open_waiters = self._open_waiters, []
        for w in waiters:
            w.callback(None)

    def when_open(self) -> Deferred[None]:
        """Fires (never fails) once :meth:`open` finished; check :attr:`open_error` after."""
        d: Deferred[None] = Deferred()
        if self.opened or self.open_error is not None:
            d.callback(None)
        else:
            self._open_waiters.append(d)
        return d

    def _mkdir(self) -> None:
        # exist_ok: the name is unique (a random token), and a channel that
        # joined while this job was queued may have created it already.
        self.output.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(exist_ok=True)

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
        state.bytes = sink.on_disk
        state.received = sink.bytes
        state.sha256 = sink.sha256
        state.summary = sink.walker.summary()

    def stop(self, reason: str) -> bool:
        """End the session early: keep the first *reason*, close its channels.

        Returns False if it was already stopping.  The channels' pumps then end,
        and the session is filed as usual, its verdict naming *reason*.
        """
        if self.stop_reason is not None:
            return False
        self.stop_reason = reason
        for channel in list(self.live):
            channel.close()
        return True

    def content_verdict(self) -> tuple[str, str | None]:
        """(status, reason) from the recorded content alone."""
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
        # QEMU numbers multifd channels 0..N-1 and a destination refuses an id
        # >= multifd-channels: any other set cannot be replayed.
        ids = sorted(
            c.channel_id for c in self.channels if c.kind == "multifd" and c.channel_id is not None
        )
        if ids != list(range(len(ids))):
            return SessionStatus.INCOMPLETE, (
                f"multifd channel ids {ids} are not 0..{len(ids) - 1}"
            )
        return SessionStatus.COMPLETE, None

    def verdict(self) -> tuple[str, str | None]:
        """(status, reason): ``complete`` only when the content proves it.

        A session ended early (:meth:`stop`) is ``incomplete`` with the stop
        reason first, then what the content says.
        """
        status, reason = self.content_verdict()
        if status == SessionStatus.COMPLETE or self.stop_reason is None:
            return status, reason
        if reason == self.stop_reason:  # a channel's own error stopped the session
            return status, reason
        return SessionStatus.INCOMPLETE, f"{self.stop_reason} ({reason})"

    def manifest(self, status: str, reason: str | None) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "status": status,
            "reason": reason,
            "peer": self.peer,
            "started": _iso(self.started),
            "ended": _iso(self.ended) if self.ended is not None else None,
            "channels": [_channel_entry(c) for c in self.channels],
            **({"uuid": str(self.uuid)} if self.uuid is not None else {}),
            **self.extra,
        }

    def close(self) -> Deferred[Path]:
        """Write the manifest and move the session into place; fires with its directory.

        Fails if the manifest cannot be written (the disk is full): the session
        then stays as ``.incoming-<name>``, which :func:`recover_incoming`
        files as incomplete at the next start.
        """
        self.ended = self._clock()
        status, reason = self.verdict()
        manifest = self.manifest(status, reason)
        self.status, self.reason = status, reason
        return run_in_worker(self._finalise, manifest, pool=self._pool, reactor=self._reactor)

    def _finalise(self, manifest: dict[str, Any]) -> Path:
        _write_manifest(self.tmp_dir, manifest)
        os.replace(self.tmp_dir, self.final_dir)
        _fsync_dir(self.output)
        return self.final_dir


def _channel_entry(c: _ChannelState) -> dict[str, Any]:
    return {
        "kind": c.kind,
        "file": c.filename,
        **({"id": c.channel_id} if c.channel_id is not None else {}),
        "bytes": c.bytes,
        # Bytes received but never stored (a write failed): the file holds "bytes".
        **({"received": c.received} if c.received != c.bytes else {}),
        "sha256": c.sha256,
        **({"error": c.error} if c.error else {}),
        "stream": c.summary,
    }


def _write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` atomically: a reader sees the old one or the whole new one."""
    tmp = directory / (MANIFEST + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / MANIFEST)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _fsync_dir(path: Path) -> None:
    # The rename is durable only once the directory holding it is synced.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename still happened
    finally:
        os.close(fd)


INCOMING_PREFIX = ".incoming-"
RECOVERED_REASON = "interrupted: the service ended before this session did (recovered at start)"


def recover_incoming(output: Path, *, chunk: int = 4 << 20) -> list[Path]:
    """File every ``.incoming-*`` session left in *output* as ``incomplete`` (worker thread).

    What a killed service (SIGKILL, a crash, power loss) leaves behind: a
    session directory that was never renamed into place.  Each one's channel
    files are walked and hashed as the recorder would have, and a manifest is
    written with status ``incomplete`` and :data:`RECOVERED_REASON`; then the
    directory is renamed to its final name.  A directory that already holds
    a manifest (the service died between writing it and the rename) keeps
    it.  Only call this when no recorder is writing into *output*.  Returns
    the directories filed, in name order.
    """
    if not output.is_dir():
        return []
    filed: list[Path] = []
    for tmp_dir in sorted(output.iterdir()):
        if not (tmp_dir.is_dir() and tmp_dir.name.startswith(INCOMING_PREFIX)):
            continue
        final = output / tmp_dir.name[len(INCOMING_PREFIX) :]
        if final.exists():
            final = output / (final.name + "-recovered")
        if not (tmp_dir / MANIFEST).exists():
            _write_manifest(tmp_dir, _recovered_manifest(tmp_dir, chunk))
        os.replace(tmp_dir, final)
        filed.append(final)
    if filed:
        _fsync_dir(output)
    return filed


def _recovered_manifest(tmp_dir: Path, chunk: int) -> dict[str, Any]:
    channels: list[dict[str, Any]] = []
    files = sorted(
        (p for p in tmp_dir.iterdir() if p.suffix == ".bin"),
        key=lambda p: (p.name != "main.bin", p.name),
    )
    for path in files:
        walker: wire.MainStreamWalker | wire.MultifdStreamWalker
        kind = "main" if path.name == "main.bin" else "multifd"
        walker = wire.MainStreamWalker() if kind == "main" else wire.MultifdStreamWalker()
        h = hashlib.sha256()
        size = 0
        with open(path, "rb") as f:
            while data := f.read(chunk):
                h.update(data)
                size += len(data)
                with contextlib.suppress(wire.WireError):
                    walker.feed(data)
        with contextlib.suppress(wire.WireError):
            walker.feed(b"")
        state = _ChannelState(kind=kind, filename=path.name, bytes=size, received=size)
        state.sha256 = h.hexdigest()
        state.ended = True
        state.summary = walker.summary()
        if isinstance(walker, wire.MultifdStreamWalker) and walker.channel_id is not None:
            state.channel_id = walker.channel_id
        channels.append(_channel_entry(state))
    st = tmp_dir.stat()
    try:  # the directory's name starts with the session's start time
        started: str | None = _iso(
            calendar.timegm(
                time.strptime(tmp_dir.name[len(INCOMING_PREFIX) :][:15], _STAMP.rstrip("Z"))
            )
        )
    except ValueError:
        started = None
    return {
        "format": FORMAT_VERSION,
        "status": SessionStatus.INCOMPLETE,
        "reason": RECOVERED_REASON,
        "peer": None,
        "started": started,
        "ended": _iso(st.st_mtime),
        "channels": channels,
        "recovered": True,
    }


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"
