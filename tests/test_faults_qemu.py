"""Faults about a QEMU peer, survived by `twistd qio record` / `proxy`, against real QEMU 7.2.

- a TLS source killed mid-stream, and one multifd channel of a real multifd migration
  reset mid-stream (by a relay in this test, between QEMU and the recorder): the session
  is `incomplete` with the reason, the earlier session is untouched (same checksums),
  and a following migration records complete;
- SIGTERM to twistd while a (throttled) real migration is being recorded: the session
  is closed `incomplete`, twistd exits promptly, and restarted on the same output it
  serves again with the old session readable;
- proxy: the destination QEMU killed mid-stream disconnects the source (reason
  logged); the source killed mid-stream closes the destination side (reason logged).

Each test fails (does not skip) when QEMU is missing; every wait is bounded.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import hashlib
import json
import os
import signal
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from qiotwisted.migration.recorder import STOPPED_REASON
from tests.qemu import QemuVM, QMPError, qemu_destination, qemu_source
from tests.test_tls_record_qemu import pki
from tests.twistd_proc import Twistd, twistd_qio

pytestmark = [pytest.mark.qemu]

RAM_MIB = 64
SLOW = 4 << 20  # max-bandwidth for a migration we interrupt: ~16 s for 64 MiB
UUID = "0b5c6d7e-8f90-4a1b-8c2d-3e4f5a6b7c8e"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def snapshot(session: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted(session.iterdir())}


def manifest(session: Path) -> dict[str, Any]:
    """Parse the manifest and check it against the files it lists."""
    m: dict[str, Any] = json.loads((session / "manifest.json").read_text())
    for ch in m["channels"]:
        path = session / ch["file"]
        assert ch["bytes"] == path.stat().st_size, ch
        assert ch["sha256"] == sha256(path), ch
    return m


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)  # bounded poll of another process's state


def recording_bytes(svc: Twistd) -> int:
    total = 0
    for d in svc.incoming():
        with contextlib.suppress(FileNotFoundError):
            total += sum(p.stat().st_size for p in d.glob("*.bin"))
    return total


def migrate(src: QemuVM, port: int, **params: Any) -> None:
    multifd = params.pop("multifd", 0)
    if multifd:
        src.set_capabilities(multifd=True)
        src.set_parameters(multifd_channels=multifd, **params)
    else:
        src.set_capabilities()
        src.set_parameters(**params)
    src.migrate(f"tcp:127.0.0.1:{port}")


def record_complete(tmp_path: Path, svc: Twistd, name: str, **params: Any) -> Path:
    """A quick (zero-filled guest) migration into *svc*; returns its complete session."""
    before = set(svc.sessions())
    with qemu_source(tmp_path / name, ram_mib=RAM_MIB, fill="zero", name=name) as src:
        migrate(src, svc.port, **params)
        assert src.wait_migration(timeout=120)["status"] == "completed"
        svc.wait_sessions(len(before) + 1, timeout=60)
    (session,) = set(svc.sessions()) - before
    assert manifest(session)["status"] == "complete", manifest(session)
    return session


def kill(vm: QemuVM) -> None:
    os.kill(vm.proc.pid, signal.SIGKILL)
    vm.proc.wait(timeout=10)


# -- recorder -------------------------------------------------------------------------


@pytest.mark.timeout_s(300)
def test_tls_source_killed_mid_stream(tmp_path: Path) -> None:
    creds = pki(tmp_path / "pki")
    tls = {"tls_creds": "tls0", "tls_hostname": "localhost"}
    with twistd_qio(tmp_path / "svc", ["record", "--tls-creds", str(creds)]) as svc:
        with qemu_source(tmp_path / "a", ram_mib=RAM_MIB, fill="zero", tls_dir=creds) as a:
            migrate(a, svc.port, **tls)
            assert a.wait_migration(timeout=120)["status"] == "completed"
            svc.wait_sessions(1, timeout=60)
        (earlier,) = svc.sessions()
        before = snapshot(earlier)

        with qemu_source(tmp_path / "b", ram_mib=RAM_MIB, tls_dir=creds, name="b") as b:
            migrate(b, svc.port, max_bandwidth=SLOW, **tls)
            wait_until(lambda: recording_bytes(svc) > 1 << 20, "1 MiB recorded")
            kill(b)
        svc.wait_sessions(2, timeout=60)
        (session,) = set(svc.sessions()) - {earlier}
        m = manifest(session)
        assert m["status"] == "incomplete"
        assert m["reason"].startswith("main.bin:"), m["reason"]
        assert m["tls"]["protocol"] == "TLSv1.2"
        assert 1 << 20 < m["channels"][0]["bytes"] < RAM_MIB << 20
        assert snapshot(earlier) == before
        assert svc.proc.poll() is None and not svc.incoming()

        with qemu_source(tmp_path / "c", ram_mib=RAM_MIB, fill="zero", tls_dir=creds) as c:
            migrate(c, svc.port, **tls)
            assert c.wait_migration(timeout=120)["status"] == "completed"
            svc.wait_sessions(3, timeout=60)
        (last,) = set(svc.sessions()) - {earlier, session}
        assert manifest(last)["status"] == "complete"


def _wait_sent(sock: socket.socket, timeout: float) -> None:
    """Wait (bounded) until the kernel has sent everything written to *sock*."""
    unsent = array.array("i", [0])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fcntl.ioctl(sock, termios.TIOCOUTQ, unsent)  # SIOCOUTQ: bytes not yet sent
        if unsent[0] == 0:
            return
        time.sleep(0.005)  # a bounded poll of the kernel's queue, 5 s at most


class Relay:
    """A plain TCP relay (threads) between QEMU and the recorder, one upstream per channel.

    Connection *kill_index* (in accept order: 0 is main, then the multifd
    channels) is reset on both sides (SO_LINGER 0, so RST) once *kill_after*
    bytes went through it.  Nothing is sent back to QEMU otherwise.
    """

    def __init__(self, upstream_port: int, kill_index: int, kill_after: int) -> None:
        self.upstream_port = upstream_port
        self.kill_index = kill_index
        self.kill_after = kill_after
        self.killed = threading.Event()
        self.forwarded = b""  # what went through connection kill_index
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.lsock.settimeout(0.1)
        self.port = self.lsock.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []

    def _accept(self) -> None:
        index = 0
        while not self._stop.is_set() and index < 16:
            try:
                conn, _ = self.lsock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.setblocking(True)
            up = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10)
            self._sockets += [conn, up]
            t = threading.Thread(target=self._pump, args=(conn, up, index), daemon=True)
            self._threads.append(t)
            t.start()
            index += 1

    def _pump(self, src: socket.socket, dst: socket.socket, index: int) -> None:
        src.settimeout(0.5)
        total = 0
        try:
            while not self._stop.is_set():
                try:
                    data = src.recv(1 << 16)
                except TimeoutError:
                    continue
                if not data:
                    break
                dst.sendall(data)
                total += len(data)
                if index == self.kill_index:
                    self.forwarded += data
                if index == self.kill_index and total >= self.kill_after:
                    # SO_LINGER 0 discards what the kernel has not sent yet:
                    # let the recorder receive every byte counted first.
                    _wait_sent(dst, timeout=5.0)
                    linger = struct.pack("ii", 1, 0)
                    for s in (src, dst):
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                    self.killed.set()
                    break
        except OSError:
            pass
        finally:
            src.close()
            dst.close()

    @contextlib.contextmanager
    def running(self) -> Iterator[Relay]:
        acceptor = threading.Thread(target=self._accept, daemon=True)
        acceptor.start()
        try:
            yield self
        finally:
            self._stop.set()
            acceptor.join(5)
            self.lsock.close()
            for t in self._threads:
                t.join(5)


@pytest.mark.timeout_s(300)
def test_one_multifd_channel_reset_mid_stream(tmp_path: Path) -> None:
    with twistd_qio(tmp_path / "svc") as svc:
        earlier = record_complete(tmp_path, svc, "a")
        before = snapshot(earlier)

        relay = Relay(svc.port, kill_index=2, kill_after=1 << 20)
        with (
            relay.running(),
            qemu_source(tmp_path / "b", ram_mib=RAM_MIB, uuid=UUID, name="b") as b,
        ):
            migrate(b, relay.port, multifd=4, max_bandwidth=2 * SLOW)
            assert relay.killed.wait(60), svc.log()
            assert b.wait_migration(timeout=60)["status"] == "failed"
            svc.wait_sessions(2, timeout=60)
        (session,) = set(svc.sessions()) - {earlier}
        m = manifest(session)
        assert m["status"] == "incomplete"
        broken = [c for c in m["channels"] if c.get("error")]
        assert [c["kind"] for c in broken] == ["multifd"], m["channels"]
        assert m["reason"].startswith(broken[0]["file"] + ": "), m["reason"]
        assert broken[0]["bytes"] >= 1 << 20
        # Nothing stored is lost or invented: the file is what the relay forwarded.
        stored = (session / broken[0]["file"]).read_bytes()
        assert stored == relay.forwarded[: len(stored)] and len(stored) == broken[0]["bytes"]
        assert sorted(c["kind"] for c in m["channels"]) == ["main"] + ["multifd"] * 4
        assert snapshot(earlier) == before
        assert svc.proc.poll() is None and not svc.incoming()

        record_complete(tmp_path, svc, "c", multifd=4)


@pytest.mark.timeout_s(300)
def test_sigterm_mid_session_then_restart(tmp_path: Path) -> None:
    out = tmp_path / "rec"
    with twistd_qio(tmp_path / "svc", output=out) as svc:
        earlier = record_complete(tmp_path, svc, "a")
        before = snapshot(earlier)
        with qemu_source(tmp_path / "b", ram_mib=RAM_MIB, name="b") as b:
            migrate(b, svc.port, max_bandwidth=SLOW)
            wait_until(lambda: recording_bytes(svc) > 1 << 20, "1 MiB recorded")
            t0 = time.monotonic()
            svc.proc.send_signal(signal.SIGTERM)
            status = svc.proc.wait(timeout=5)  # the promise: out within 5 s
            took = time.monotonic() - t0
            print(f"\nSIGTERM mid-session: twistd exited in {took:.2f} s")
            assert status == -signal.SIGTERM
            assert b.wait_migration(timeout=60)["status"] == "failed"
        log = svc.log()
    assert "Server Shut Down." in log
    assert not [p for p in out.iterdir() if p.name.startswith(".incoming-")]
    sessions = [p for p in out.iterdir() if p.is_dir()]
    (stopped,) = set(sessions) - {earlier}
    m = manifest(stopped)
    assert m["status"] == "incomplete" and m["reason"].startswith(STOPPED_REASON), m["reason"]
    assert m["channels"][0]["bytes"] > 1 << 20
    assert snapshot(earlier) == before

    with twistd_qio(tmp_path / "svc2", output=out) as again:
        assert set(again.sessions()) == {earlier, stopped}
        record_complete(tmp_path, again, "c")


# -- proxy ----------------------------------------------------------------------------


@contextlib.contextmanager
def proxied(tmp_path: Path) -> Iterator[tuple[QemuVM, QemuVM, Twistd]]:
    with (
        qemu_destination(tmp_path, ram_mib=RAM_MIB, uuid=UUID) as dst,
        qemu_source(tmp_path, ram_mib=RAM_MIB, uuid=UUID) as src,
    ):
        dst.set_capabilities()
        dst.set_parameters()
        port = dst.migrate_incoming()
        with twistd_qio(
            tmp_path / "svc",
            ["proxy", "--to", f"127.0.0.1:{port}"],
            extra_output=False,
        ) as proxy:
            migrate(src, proxy.port, max_bandwidth=SLOW)
            wait_until(
                lambda: src.query_migrate().get("ram", {}).get("transferred", 0) > 1 << 20,
                "1 MiB through the proxy",
            )
            yield src, dst, proxy


@pytest.mark.timeout_s(180)
def test_proxy_destination_killed_disconnects_the_source(tmp_path: Path) -> None:
    with proxied(tmp_path) as (src, dst, proxy):
        kill(dst)
        assert src.wait_migration(timeout=60)["status"] == "failed"
        log = proxy.wait_log("(main): destination failed:")
        assert "Connection lost" in log or "Connection reset" in log, log
        assert proxy.proc.poll() is None


@pytest.mark.timeout_s(180)
def test_proxy_source_killed_closes_the_destination(tmp_path: Path) -> None:
    with proxied(tmp_path) as (src, dst, proxy):
        kill(src)
        try:
            status = dst.wait_migration(timeout=60)["status"]
        except QMPError:  # it exited while answering: a failed load exits QEMU (trap 6)
            dst.proc.wait(timeout=10)
            status = "exited"
        assert status in ("failed", "exited"), status
        log = proxy.wait_log("the source closed the main channel mid-stream")
        assert "no end-of-migration marker" in log
        proxy.wait_log("(main): ended, ")  # after the destination closed its side
        assert proxy.proc.poll() is None
