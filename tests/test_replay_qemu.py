"""`qio send` and `qio inspect` on recordings of real QEMU 7.2 migrations (plain and multifd).

Record with `twistd qio record`, look inside with `qio inspect`, replay with `qio
send` into a fresh QEMU destination, and prove the load by comparing guest RAM.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid as uuidlib
from pathlib import Path
from typing import Any

import pytest

from tests.qemu import QemuVM, check_ram, qemu_destination, qemu_source
from tests.twistd_proc import Twistd, twistd_qio

pytestmark = [pytest.mark.qemu]

RAM_MIB = 64
QIO = [sys.executable, "-m", "qiotwisted.cli"]


def qio(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*QIO, *args], capture_output=True, text=True, timeout=timeout)


def record(svc: Twistd, src: QemuVM, *, multifd: int = 0) -> Path:
    before = len(svc.sessions())
    if multifd:
        src.set_capabilities(multifd=True)
        src.set_parameters(multifd_channels=multifd)
    else:
        src.set_capabilities()
        src.set_parameters()
    src.migrate(f"tcp:127.0.0.1:{svc.port}")
    assert src.wait_migration(timeout=120)["status"] == "completed"
    manifest = svc.wait_sessions(before + 1, timeout=60)[-1]
    assert manifest["status"] == "complete", manifest
    return svc.sessions()[-1]


def destination_port(dst: QemuVM, *, multifd: int = 0) -> int:
    if multifd:
        dst.set_capabilities(multifd=True)
        dst.set_parameters(multifd_channels=multifd)
    else:
        dst.set_capabilities()
        dst.set_parameters()
    return dst.migrate_incoming()


def inspect_json(path: Path) -> dict[str, Any]:
    proc = qio("inspect", "--json", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def test_plain_record_inspect_send(tmp_path: Path) -> None:
    with twistd_qio(tmp_path / "svc") as svc, qemu_source(tmp_path, ram_mib=RAM_MIB) as src:
        session = record(svc, src)
        report = inspect_json(session)
        assert report["complete"] is True and report["problems"] == []
        assert report["main"]["machine_type"] == "pc-i440fx-7.2"
        blocks = {b["name"]: b["size"] for b in report["main"]["ram_blocks"]}
        assert blocks["pc.ram"] == RAM_MIB << 20
        assert report["main"]["normal_pages"] >= (RAM_MIB << 20) // 4096 - 256
        assert len(report["devices"]) > 10
        assert {"name", "instance_id", "version_id"} <= set(report["devices"][0])
        text = qio("inspect", str(session))
        assert text.returncode == 0 and "pc-i440fx-7.2" in text.stdout

        with qemu_destination(tmp_path, ram_mib=RAM_MIB) as dst:
            port = destination_port(dst)
            sent = qio("send", str(session), "--to", f"127.0.0.1:{port}", "--json")
            assert sent.returncode == 0, sent.stderr
            summary = json.loads(sent.stdout)
            assert summary["ok"] is True
            assert summary["channels"][0]["delivered"] is True
            assert dst.wait_migration(timeout=120)["status"] == "completed"
            check_ram(dst, src.ram_path)


@pytest.mark.parametrize("channels", [2, 4])
def test_multifd_record_inspect_send_with_uuid_rewrite(tmp_path: Path, channels: int) -> None:
    with twistd_qio(tmp_path / "svc") as svc, qemu_source(tmp_path, ram_mib=RAM_MIB) as src:
        session = record(svc, src, multifd=channels)
        manifest = json.loads((session / "manifest.json").read_text())
        files = sorted(c["file"] for c in manifest["channels"])
        assert files == ["main.bin"] + [f"multifd-{i}.bin" for i in range(channels)]
        assert manifest["uuid"] == src.uuid
        report = inspect_json(session)
        assert report["complete"] is True
        assert sum(c["normal_pages"] for c in report["multifd"]) > 0

        # A destination with another -uuid hangs on the recorded one (trap 5):
        # --uuid rewrites the init packets so it accepts them.
        other = str(uuidlib.uuid4())
        with qemu_destination(tmp_path, ram_mib=RAM_MIB, uuid=other) as dst:
            port = destination_port(dst, multifd=channels)
            sent = qio("send", str(session), "--to", f"127.0.0.1:{port}", "--uuid", other)
            assert sent.returncode == 0, sent.stderr
            assert dst.wait_migration(timeout=60)["status"] == "completed"
            check_ram(dst, src.ram_path)


def test_inspect_reports_where_a_truncated_recording_breaks(tmp_path: Path) -> None:
    with twistd_qio(tmp_path / "svc") as svc, qemu_source(tmp_path, ram_mib=RAM_MIB) as src:
        session = record(svc, src)
    cut = tmp_path / "cut.bin"
    data = (session / "main.bin").read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    proc = qio("inspect", str(cut))
    assert proc.returncode == 1
    assert "complete:      no" in proc.stdout
    assert f"stream ends at byte {len(data) // 2}" in proc.stdout, proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"QEVM\x00\x00\x00\x09" + bytes(100))
    proc = qio("inspect", str(garbage))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "version" in proc.stdout.lower()
    missing = qio("inspect", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "no such file" in missing.stderr
