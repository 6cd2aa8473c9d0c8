"""`twistd qio proxy`: QEMU -> proxy -> QEMU, with the recording tap, against real QEMU 7.2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.qemu import QemuVM, check_ram, qemu_destination, qemu_source
from tests.twistd_proc import twistd_qio

pytestmark = [pytest.mark.qemu]

RAM_MIB = 64


def prepare(vm: QemuVM, multifd: int) -> None:
    if multifd:
        vm.set_capabilities(multifd=True)
        vm.set_parameters(multifd_channels=multifd)
    else:
        vm.set_capabilities()
        vm.set_parameters()


@pytest.mark.parametrize("multifd", [0, 4], ids=["plain", "multifd4"])
def test_proxy_forwards_and_records(tmp_path: Path, multifd: int) -> None:
    uuid = "6b1c07c8-96f5-4a59-9d37-2f0d1f8a1c11"
    with (
        qemu_destination(tmp_path, ram_mib=RAM_MIB, uuid=uuid) as dst,
        qemu_source(tmp_path, ram_mib=RAM_MIB, uuid=uuid) as src,
    ):
        prepare(dst, multifd)
        port = dst.migrate_incoming()
        record = tmp_path / "tap"
        with twistd_qio(
            tmp_path / "svc",
            ["proxy", "--to", f"127.0.0.1:{port}", "--record", str(record)],
            output=None,
            extra_output=False,
        ) as proxy:
            prepare(src, multifd)
            src.migrate(f"tcp:127.0.0.1:{proxy.port}")
            assert src.wait_migration(timeout=120)["status"] == "completed"
            assert dst.wait_migration(timeout=120)["status"] == "completed"
            check_ram(dst, src.ram_path)
            proxy.output = record
            (manifest,) = proxy.wait_sessions(1, timeout=60)
            assert manifest["status"] == "complete", manifest
            assert len(manifest["channels"]) == 1 + multifd
            log = proxy.log()
            assert "-> 127.0.0.1:" in log and "failed" not in log
        # The tap's recording is the same migration: it loads too.
        (session,) = [p for p in record.iterdir() if not p.name.startswith(".")]
        assert json.loads((session / "manifest.json").read_text())["status"] == "complete"


def test_proxy_destination_unreachable_closes_the_source(tmp_path: Path) -> None:
    with qemu_source(tmp_path, ram_mib=RAM_MIB) as src:
        # A port nothing listens on: the upstream connect fails at once.
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
        s.close()
        with twistd_qio(
            tmp_path / "svc",
            ["proxy", "--to", f"127.0.0.1:{dead_port}"],
            output=None,
            extra_output=False,
        ) as proxy:
            prepare(src, 0)
            src.migrate(f"tcp:127.0.0.1:{proxy.port}")
            assert src.wait_migration(timeout=60)["status"] == "failed"
            proxy.wait_log("cannot reach the destination")


def test_plain_multifd_proxy_without_tap_uses_the_splice_pump(tmp_path: Path) -> None:
    """Plain on both sides and no --record: the kernel-side pump forwards; RAM must match."""
    uuid = "3c2b1a09-8f7e-4d6c-b5a4-938271605f4e"
    with (
        qemu_destination(tmp_path, ram_mib=RAM_MIB, uuid=uuid) as dst,
        qemu_source(tmp_path, ram_mib=RAM_MIB, uuid=uuid) as src,
    ):
        prepare(dst, 4)
        port = dst.migrate_incoming()
        with twistd_qio(
            tmp_path / "svc", ["proxy", "--to", f"127.0.0.1:{port}"], extra_output=False
        ) as proxy:
            prepare(src, 4)
            src.migrate(f"tcp:127.0.0.1:{proxy.port}")
            assert src.wait_migration(timeout=120)["status"] == "completed"
            assert dst.wait_migration(timeout=120)["status"] == "completed"
            check_ram(dst, src.ram_path)
            log = proxy.log()
            assert "failed" not in log, log
