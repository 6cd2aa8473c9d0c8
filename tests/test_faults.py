"""Faults the recorder survives with nothing lost, without QEMU.

In-process (fast, real loopback sockets and real worker threads): a multifd channel
reset mid-stream, a disk write that raises, a free-space check that hangs, a flooded
worker pool, a raising completion function and client func, leftovers of a killed run.
Then the real `twistd -n qio record` child: a disk that fills mid-session (EFBIG
through RLIMIT_FSIZE), `--min-free-space` refusal, SIGTERM and SIGKILL mid-session
followed by a restart on the same output directory.

Every case checks the same promises: the session is filed `incomplete` with the
reason, its manifest parses and matches the bytes on disk, earlier sessions are
untouched, and the service goes on (a following migration records complete).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import resource
import signal
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.logger import capturedLogs

from qiotwisted._pool import ThreadWorkerPool
from qiotwisted.channel import port_of
from qiotwisted.errors import QIOError
from qiotwisted.migration import session as session_mod
from qiotwisted.migration.recorder import LOCK_NAME, STOPPED_REASON, Recorder
from qiotwisted.migration.session import RECOVERED_REASON, recover_incoming
from qiotwisted.task import Task
from tests.test_limits import (
    ROOMY,
    Rig,
    assert_closed_with_nothing_written,
    manifest,
    text,
)
from tests.test_wire import build_multifd, build_stream
from tests.twistd_proc import BIN, Twistd, twistd_qio


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_manifest_matches_disk(session: Path) -> dict[str, Any]:
    """The manifest parses and every channel's bytes and sha256 are the file's."""
    m: dict[str, Any] = json.loads((session / "manifest.json").read_text())
    for ch in m["channels"]:
        data = (session / ch["file"]).read_bytes()
        assert ch["bytes"] == len(data), ch
        assert ch["sha256"] == hashlib.sha256(data).hexdigest(), ch
    return m


def snapshot(session: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted(session.iterdir())}


@pytest_twisted.async_yield_fixture
async def rigs(reactor: Any, tmp_path: Path) -> AsyncIterator[Any]:
    made: list[Rig] = []

    async def make(limits: Any = ROOMY, **kw: Any) -> Rig:
        r = Rig(reactor, tmp_path / "rec", limits, **kw)
        made.append(r)
        (address,) = await r.listener.open("tcp:0:interface=127.0.0.1")
        r.port = port_of(address)
        return r

    yield make
    for r in made:
        await r.listener.disconnect()
        await r.recorder.stop()


async def record_complete(rig: Rig, data: bytes | None = None) -> Path:
    filed = rig.recorder.next_session()
    await rig.send(data if data is not None else build_stream().data)
    path, status = await filed
    assert status == "complete", manifest(path)
    return path


# -- in-process ---------------------------------------------------------------------


async def test_one_multifd_channel_reset_mid_stream(rigs: Any) -> None:
    rig = await rigs()
    earlier = await record_complete(rig)
    before = snapshot(earlier)

    s = build_stream(parts=3)
    filed = rig.recorder.next_session()
    main = await rig.connect()
    await rig.send(build_multifd(s.ram_sections, channel_id=0))
    victim = await rig.connect()
    await victim.write_all(build_multifd(s.ram_sections, channel_id=1)[:3000])
    await main.write_all(s.data[:100])  # QEMU 7.2 writes main's header after the inits
    await rig.wait_for(
        lambda: any(
            "multifd-1.bin" in x.sinks
            and x.sinks["multifd-1.bin"].on_disk == 3000
            and x.sinks["main.bin"].on_disk == 100
            for x in rig.recorder.open_sessions
            if "main.bin" in x.sinks
        ),
        "3000 bytes of multifd-1 and 100 of main on disk",
    )
    with capturedLogs() as events:
        await victim.abort()  # RST: the channel dies mid-packet
        path, status = await filed  # at once: the migration is dead
    m = assert_manifest_matches_disk(path)
    assert status == "incomplete"
    assert m["reason"].startswith("multifd-1.bin: Unable to read from socket"), m["reason"]
    (mf1,) = [c for c in m["channels"] if c["file"] == "multifd-1.bin"]
    assert mf1["bytes"] == 3000 and mf1["error"]
    (mf0,) = [c for c in m["channels"] if c["file"] == "multifd-0.bin"]
    assert "error" not in mf0 and mf0["stream"]["sync_packets"] == s.ram_sections
    assert "stopping the session" in text(events)
    await assert_closed_with_nothing_written(main)  # its other channels are closed

    assert snapshot(earlier) == before  # the earlier session is untouched
    await record_complete(rig)  # and the service goes on


async def test_disk_write_that_raises_stops_the_session_only(
    rigs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = await rigs()
    earlier = await record_complete(rig)
    before = snapshot(earlier)
    real = session_mod.ChannelSink._write_in_thread
    fail = threading.Event()

    def flaky(self: Any, batch: list[bytes]) -> None:
        if fail.is_set():  # a worker that raises, once
            fail.clear()
            raise OSError(errno.EIO, "Input/output error")
        real(self, batch)

    monkeypatch.setattr(session_mod.ChannelSink, "_write_in_thread", flaky)
    data = build_stream(parts=40).data
    filed = rig.recorder.next_session()
    ch = await rig.connect()
    with capturedLogs() as events:
        await ch.write_all(data[:1000])
        await rig.wait_for(
            lambda: any(
                x.sinks.get("main.bin") is not None and x.sinks["main.bin"].on_disk == 1000
                for x in rig.recorder.open_sessions
            ),
            "1000 bytes on disk",
        )
        fail.set()
        await ch.write_all(data[1000:2000])
        path, status = await filed
    m = assert_manifest_matches_disk(path)
    assert status == "incomplete"
    assert m["reason"] == "main.bin: recording failed: [Errno 5] Input/output error", m
    assert m["channels"][0]["bytes"] == 1000
    assert "Input/output error" in text(events)
    await assert_closed_with_nothing_written(ch)  # the source learns it failed
    monkeypatch.setattr(session_mod.ChannelSink, "_write_in_thread", real)
    assert snapshot(earlier) == before
    await record_complete(rig)


@pytest.fixture
def pool(reactor: Any) -> Iterator[Callable[..., ThreadWorkerPool]]:
    pools: list[ThreadWorkerPool] = []

    def make(**kw: Any) -> ThreadWorkerPool:
        p = ThreadWorkerPool(reactor, stop_at_shutdown=False, name="test-faults", **kw)
        pools.append(p)
        return p

    yield make
    for p in pools:
        p.stop()


async def test_hung_free_space_check_times_out_and_releases_the_session(
    rigs: Any, pool: Callable[..., ThreadWorkerPool]
) -> None:
    release = threading.Event()
    calls = {"n": 0}

    def statvfs(path: str) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            release.wait(30)  # a stuck network filesystem
        return os.statvfs(path)

    limits = replace(ROOMY, min_free_space=1, disk_check_timeout=0.2)
    rig = await rigs(limits, statvfs=statvfs, pool=pool(size=4))
    try:
        with capturedLogs() as events:
            ch = await rig.connect()
            await ch.write_all(build_stream().data)
            await assert_closed_with_nothing_written(ch)
        assert "cannot check the free space on" in text(events)
        assert "timed out after 0.2 s" in text(events)
        await record_complete(rig)  # the next check does not hang: recorded
    finally:
        release.set()


async def test_flooded_worker_pool_refuses_with_a_clear_error(
    rigs: Any, pool: Callable[..., ThreadWorkerPool]
) -> None:
    # Two threads are what one channel needs at most (its write and hash chains).
    workers = pool(size=2, max_queued=0)
    rig = await rigs(pool=workers)
    block = threading.Event()
    for _ in range(2):  # a flood: every thread busy, no queue
        workers.submit(lambda: block.wait(30))
    try:
        with capturedLogs() as events:
            ch = await rig.connect()
            await ch.write_all(build_stream().data)
            await assert_closed_with_nothing_written(ch)
        assert "cannot create the session directory: Worker pool is full" in text(events)
    finally:
        block.set()
    await rig.wait_for(lambda: workers.pending == 0, "the flood to drain")
    await record_complete(rig)
    assert len([p for p in rig.recorder.output.iterdir() if not p.name.startswith(".")]) == 1


async def test_raising_completion_func_is_logged_and_the_service_goes_on(
    rigs: Any, pool: Callable[..., ThreadWorkerPool]
) -> None:
    workers = pool(size=2)
    rig = await rigs(pool=workers)

    def done(task: Task[Any], opaque: object) -> None:
        raise RuntimeError("completion blew up")

    with capturedLogs() as events:
        task: Task[Any] = Task(None, done, reactor=rig.reactor, pool=workers)
        task.run_in_thread(lambda t, o: t.set_result(42))
        assert await task == 42  # the Deferred still fires
    assert "completion blew up" in text(events) or any(
        "completion blew up" in str(e.get("log_failure", "")) for e in events
    )
    await record_complete(rig)


async def test_raising_client_func_is_logged_and_the_listener_goes_on(rigs: Any) -> None:
    rig = await rigs()
    real = rig.recorder.client_func
    calls = {"n": 0}

    def client_func(listener: Any, channel: Any, data: Any = None) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("client func blew up")
        real(listener, channel, data)

    rig.listener.set_client_func(client_func)
    with capturedLogs() as events:
        ch = await rig.connect()
        await assert_closed_with_nothing_written(ch)
    assert any("client func blew up" in str(e.get("log_failure", "")) for e in events)
    await record_complete(rig)


def _leftover(output: Path, stamp: str, files: dict[str, bytes]) -> Path:
    d = output / f".incoming-{stamp}"
    d.mkdir(parents=True)
    for name, data in files.items():
        (d / name).write_bytes(data)
    return d


async def test_start_files_leftovers_of_a_killed_run_and_locks_the_output(
    reactor: Any, tmp_path: Path
) -> None:
    out = tmp_path / "rec"
    s = build_stream(parts=2)
    full = build_multifd(s.ram_sections, channel_id=3)
    _leftover(out, "20260101T000000Z-aaaaaa", {"main.bin": s.data[:777], "multifd-3.bin": full})
    # died between writing its manifest and the rename: the manifest is kept
    kept = _leftover(out, "20260101T000001Z-bbbbbb", {"main.bin": s.data})
    (kept / "manifest.json").write_text('{"status": "complete", "kept": true}\n')
    recorder = Recorder(out, reactor=reactor, limits=ROOMY)
    with capturedLogs() as events:
        found = await recorder.start()
    assert [p.name for p in found] == ["20260101T000000Z-aaaaaa", "20260101T000001Z-bbbbbb"]
    assert not [p for p in out.iterdir() if p.name.startswith(".incoming-")]
    m = assert_manifest_matches_disk(found[0])
    assert m["status"] == "incomplete" and m["reason"] == RECOVERED_REASON
    assert m["started"] == "2026-01-01T00:00:00.000Z"
    assert [c["file"] for c in m["channels"]] == ["main.bin", "multifd-3.bin"]
    assert m["channels"][1]["id"] == 3
    assert m["channels"][0]["stream"]["machine_type"] == "pc-i440fx-7.2"
    assert json.loads((found[1] / "manifest.json").read_text())["kept"] is True
    assert "filed" in text(events) and "as incomplete" in text(events)
    # A second recorder on the same directory refuses to start.
    other = Recorder(out, reactor=reactor, limits=ROOMY)
    with pytest.raises(QIOError, match="in use by another recorder"):
        await other.start()
    await recorder.stop()
    assert (out / LOCK_NAME).exists()
    assert await Recorder(out, reactor=reactor, limits=ROOMY).start() == []  # lock released
    assert recover_incoming(tmp_path / "missing") == []


async def test_stop_files_multifd_channels_whose_main_never_came(rigs: Any) -> None:
    rig = await rigs(replace(ROOMY, handshake_timeout=30))
    await rig.send(build_multifd(2, channel_id=0))
    await rig.wait_for(
        lambda: (
            bool(rig.recorder.open_sessions)
            and all(c.ended for c in rig.recorder.open_sessions[0].channels)
            and bool(rig.recorder.open_sessions[0].channels)
        ),
        "the orphan channel to end",
    )
    filed = rig.recorder.next_session()
    await rig.recorder.stop()
    path, status = await filed
    m = assert_manifest_matches_disk(path)
    assert status == "incomplete" and m["reason"] == f"{STOPPED_REASON} (no main channel)"


async def test_orphan_multifd_session_is_filed_after_the_handshake_timeout(rigs: Any) -> None:
    rig = await rigs(replace(ROOMY, handshake_timeout=0.2))
    filed = rig.recorder.next_session()
    await rig.send(build_multifd(2, channel_id=0))
    path, status = await filed
    assert status == "incomplete" and manifest(path)["reason"] == "no main channel"
    await record_complete(rig)


# -- the real twistd child ---------------------------------------------------------------


def twistd_record(
    workdir: Path,
    output: Path,
    args: Sequence[str] = (),
    *,
    preexec_fn: Callable[[], None] | None = None,
    timeout: float = 30.0,
) -> contextlib.AbstractContextManager[Twistd]:
    """``twistd -n qio record`` on 127.0.0.1:0 into *output*, with *preexec_fn*."""
    return twistd_qio(
        workdir, ["record", *args], output=output, preexec_fn=preexec_fn, timeout=timeout
    )


def send(port: int, data: bytes, *, close: bool = True) -> socket.socket:
    """Send *data* to 127.0.0.1:*port* with a plain socket; errors from a closing peer pass."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    with contextlib.suppress(OSError):
        s.sendall(data)
    if close:
        s.close()
    return s


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)  # bounded poll of another process's output


def _fsize_limit(limit: int) -> Callable[[], None]:
    def preexec() -> None:
        # Writes past *limit* then fail with EFBIG instead of killing the process
        # with SIGXFSZ (the child is Python, which ignores SIGXFSZ; say so anyway).
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


@pytest.mark.timeout_s(120)
def test_disk_full_mid_session_efbig(tmp_path: Path) -> None:
    limit = 1 << 20
    big = build_stream(parts=255).data  # ~3 MB: the file hits the limit mid-session
    assert len(big) > 2 * limit
    out = tmp_path / "rec"
    with twistd_record(
        tmp_path / "svc", out, ["--min-free-space", "0"], preexec_fn=_fsize_limit(limit)
    ) as svc:
        earlier = (send(svc.port, build_stream().data), svc.wait_sessions(1))[1]
        assert earlier[0]["status"] == "complete"
        first = svc.sessions()[0]
        before = snapshot(first)

        send(svc.port, big)
        svc.wait_sessions(2)
        (session,) = set(svc.sessions()) - {first}
        m = assert_manifest_matches_disk(session)  # a valid, complete JSON manifest
        assert m["status"] == "incomplete"
        assert m["reason"] == "main.bin: recording failed: [Errno 27] File too large", m
        assert m["channels"][0]["bytes"] == limit
        assert m["channels"][0]["received"] > limit
        log = svc.wait_log("File too large")
        assert "recording to" in log and "failed" in log
        assert svc.proc.poll() is None and not svc.incoming()
        assert snapshot(first) == before

        send(svc.port, build_stream().data)  # the service goes on
        svc.wait_sessions(3)
        (last,) = set(svc.sessions()) - {first, session}
        assert assert_manifest_matches_disk(last)["status"] == "complete"


def test_min_free_space_refusal(tmp_path: Path) -> None:
    with twistd_record(tmp_path / "svc", tmp_path / "rec", ["--min-free-space", "1000000T"]) as svc:
        s = send(svc.port, build_stream().data, close=False)
        s.settimeout(30)
        try:
            assert s.recv(100) == b""  # closed, nothing written back
        except ConnectionResetError:
            pass
        finally:
            s.close()
        log = svc.wait_log("disk nearly full")
        assert "min-free-space is 1000000.0 TiB" in log
        assert svc.sessions() == [] and svc.incoming() == []
        assert svc.proc.poll() is None


def _start_session(svc: Twistd, data: bytes) -> socket.socket:
    """A migration that sends *data* and then stalls, its session open and on disk."""
    s = send(svc.port, data, close=False)
    wait_until(
        lambda: any(
            (d / "main.bin").exists() and (d / "main.bin").stat().st_size == len(data)
            for d in svc.incoming()
        ),
        "the stalled session on disk",
    )
    return s


def test_sigterm_mid_session_then_restart(tmp_path: Path) -> None:
    out = tmp_path / "rec"
    data = build_stream(parts=50).data
    with twistd_record(tmp_path / "svc", out, ["--min-free-space", "0"]) as svc:
        send(svc.port, data)
        svc.wait_sessions(1)
        s = _start_session(svc, data[:5000])
        t0 = time.monotonic()
        status = svc.terminate(timeout=10)
        took = time.monotonic() - t0
        s.close()
        print(f"SIGTERM mid-session: exit in {took:.2f} s")
        assert status == -signal.SIGTERM
        log = svc.log()
    assert not [p for p in out.iterdir() if p.name.startswith(".incoming-")]
    by_status = {m["status"]: m for m in map(assert_manifest_matches_disk, svc.sessions())}
    assert sorted(by_status) == ["complete", "incomplete"]
    m = by_status["incomplete"]
    assert m["reason"].startswith(STOPPED_REASON), m
    assert m["channels"][0]["bytes"] == 5000
    assert "incomplete" in log
    with twistd_record(tmp_path / "svc2", out, ["--min-free-space", "0"]) as again:
        old = set(again.sessions())
        assert len(old) == 2
        send(again.port, data)
        again.wait_sessions(3)
        (new,) = set(again.sessions()) - old
        assert assert_manifest_matches_disk(new)["status"] == "complete"


def test_sigkill_mid_session_then_restart_recovers(tmp_path: Path) -> None:
    out = tmp_path / "rec"
    data = build_stream(parts=50).data
    with twistd_record(tmp_path / "svc", out, ["--min-free-space", "0"]) as svc:
        send(svc.port, data)
        svc.wait_sessions(1)
        (first,) = svc.sessions()
        before = snapshot(first)
        s = _start_session(svc, data[:5000])
        svc.proc.kill()
        svc.proc.wait(timeout=10)
        s.close()
    (left,) = [p for p in out.iterdir() if p.name.startswith(".incoming-")]
    with twistd_record(tmp_path / "svc2", out, ["--min-free-space", "0"]) as again:
        log = again.wait_log("as incomplete: a previous run ended before it did")
        assert left.name[len(".incoming-") :] in log
        assert again.incoming() == []
        (recovered,) = set(again.sessions()) - {first}
        assert snapshot(first) == before
        m = assert_manifest_matches_disk(recovered)
        assert m["status"] == "incomplete" and m["reason"] == RECOVERED_REASON
        assert m["channels"][0]["bytes"] == 5000
        send(again.port, data)
        again.wait_sessions(3)
        (new,) = set(again.sessions()) - {first, recovered}
        assert assert_manifest_matches_disk(new)["status"] == "complete"


def test_second_recorder_on_the_same_output_refuses_to_start(tmp_path: Path) -> None:
    out = tmp_path / "rec"
    with twistd_record(tmp_path / "svc", out):
        log = tmp_path / "second.log"
        proc = subprocess.run(
            [
                str(BIN / "twistd"), "-n", "--pidfile=", "--logfile", str(log), "qio", "record",
                "--listen", "tcp:0:interface=127.0.0.1", "--output", str(out),
            ],
            cwd=tmp_path,
            timeout=60,
        )  # fmt: skip
        assert proc.returncode != 0 or "in use by another recorder" in log.read_text()
        assert "in use by another recorder" in log.read_text()
