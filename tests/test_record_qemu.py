"""`twistd qio record` against a real QEMU 7.2: record, then prove the recording loads.

Each test runs the real service (`twistd -n qio record`) as a child process and a
real `qemu-system-x86_64` source; these fail, not skip, when QEMU is missing.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from pathlib import Path

import pytest

from tests.qemu import check_ram, qemu_destination, qemu_source, stdlib_send
from tests.twistd_proc import twistd_qio

pytestmark = [pytest.mark.qemu]

RAM_MIB = 64


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def test_record_a_real_migration_then_replay_it_into_qemu(tmp_path: Path) -> None:
    with (
        twistd_qio(tmp_path / "svc") as svc,
        qemu_source(tmp_path, ram_mib=RAM_MIB) as src,
    ):
        src.set_capabilities()
        src.set_parameters()
        src.migrate(f"tcp:127.0.0.1:{svc.port}")
        assert src.wait_migration(timeout=120)["status"] == "completed"

        (manifest,) = svc.wait_sessions(1, timeout=60)
        (session,) = svc.sessions()
        assert manifest["status"] == "complete", manifest
        assert manifest["reason"] is None
        assert manifest["peer"].startswith("127.0.0.1:")
        assert manifest["started"] <= manifest["ended"]
        (channel,) = manifest["channels"]
        main = session / "main.bin"
        assert channel["kind"] == "main" and channel["file"] == "main.bin"
        assert channel["bytes"] == main.stat().st_size > RAM_MIB << 20
        assert channel["sha256"] == _sha256(main)
        assert channel["stream"]["machine_type"] == "pc-i440fx-7.2"
        assert not svc.incoming()

        # The recording loads into a fresh QEMU, and its guest RAM is the source's.
        with qemu_destination(tmp_path, ram_mib=RAM_MIB) as dst:
            dst.set_capabilities()
            dst.set_parameters()
            port = dst.migrate_incoming()
            stdlib_send(port, main)
            assert dst.wait_migration(timeout=120)["status"] == "completed"
            check_ram(dst, src.ram_path)


def test_source_killed_mid_stream_leaves_an_incomplete_session(tmp_path: Path) -> None:
    with (
        twistd_qio(tmp_path / "svc") as svc,
        qemu_source(tmp_path, ram_mib=RAM_MIB) as src,
    ):
        src.set_capabilities()
        src.set_parameters(max_bandwidth=4 << 20)  # ~16 s for the whole guest: time to kill it
        src.migrate(f"tcp:127.0.0.1:{svc.port}")
        deadline = time.monotonic() + 30
        while not any(
            (d / "main.bin").exists() and (d / "main.bin").stat().st_size > 1 << 20
            for d in svc.incoming()
        ):
            assert time.monotonic() < deadline, svc.log()
            time.sleep(0.05)  # bounded poll of the recorder's output directory
        os.kill(src.proc.pid, 9)
        src.proc.wait(timeout=10)

        (manifest,) = svc.wait_sessions(1, timeout=30)
        assert manifest["status"] == "incomplete"
        assert manifest["reason"].startswith("main.bin:"), manifest["reason"]
        assert 1 << 20 < manifest["channels"][0]["bytes"] < RAM_MIB << 20
        assert svc.proc.poll() is None  # the service goes on


CLIENT_HELLO = bytes.fromhex("160301020001 0001fc0303".replace(" ", "")) + os.urandom(64)


@pytest.mark.parametrize(
    "payload",
    [CLIENT_HELLO, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", os.urandom(4096), b"QEV"],
    ids=["tls-client-hello", "http", "random", "short-then-eof"],
)
def test_non_migration_connections_are_refused_and_store_nothing(
    tmp_path: Path, payload: bytes
) -> None:
    with twistd_qio(tmp_path / "svc") as svc:
        with socket.create_connection(("127.0.0.1", svc.port), timeout=10) as s:
            s.sendall(payload)
            if payload == b"QEV":
                s.shutdown(socket.SHUT_WR)
            # The recorder closes on us; it never answers.
            received = b""
            while chunk := s.recv(4096):
                received += chunk
            assert received == b""
        svc.wait_log("refused 127.0.0.1:")
        assert svc.sessions() == [] and svc.incoming() == []
