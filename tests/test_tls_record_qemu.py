"""`twistd qio record --tls-creds` against a real QEMU 7.2 TLS source.

Credentials come from `qio pki`; QEMU (GnuTLS, sanity-check on) must accept them.
The recording must be complete by content (QEMU 7.2 closes TLS without
close_notify, and a TLS 1.3 server's tickets would make it drop the end of its
stream), record the client's DN, and load into a plain QEMU destination with
identical guest RAM.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.qemu import check_ram, qemu_destination, qemu_source, stdlib_send
from tests.twistd_proc import twistd_qio

pytestmark = [pytest.mark.qemu]

RAM_MIB = 512
CLIENT_DN = "C=UK,O=qiotwisted,CN=qemu-src-1"


def pki(directory: Path, *args: str) -> Path:
    subprocess.run(
        [sys.executable, "-m", "qiotwisted.cli", "pki", str(directory), *args],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return directory


@pytest.mark.timeout_s(300)
def test_tls_migration_recorded_complete_with_dn_and_replays(tmp_path: Path) -> None:
    creds = pki(tmp_path / "pki", "--client-dn", CLIENT_DN)
    with (
        twistd_qio(
            tmp_path / "svc",
            ["record", "--tls-creds", str(creds), "--tls-authz", "C=UK,O=qiotwisted,CN=qemu-src-*"],
        ) as svc,
        qemu_source(tmp_path, ram_mib=RAM_MIB, tls_dir=creds) as src,
    ):
        src.set_capabilities()
        src.set_parameters(tls_creds="tls0", tls_hostname="localhost")
        src.migrate(f"tcp:127.0.0.1:{svc.port}")
        assert src.wait_migration(timeout=180)["status"] == "completed"
        (manifest,) = svc.wait_sessions(1, timeout=120)
        assert manifest["status"] == "complete", manifest
        assert manifest["tls"]["peer_dn"] == CLIENT_DN
        assert manifest["tls"]["protocol"] == "TLSv1.2"  # no TLS 1.3 tickets toward QEMU 7.2
        session = svc.sessions()[0]
        with qemu_destination(tmp_path, ram_mib=RAM_MIB) as dst:
            dst.set_capabilities()
            dst.set_parameters()
            port = dst.migrate_incoming()
            stdlib_send(port, session / "main.bin", timeout=180)
            assert dst.wait_migration(timeout=180)["status"] == "completed"
            check_ram(dst, src.ram_path)


def test_client_cert_from_another_ca_fails_and_stores_nothing(tmp_path: Path) -> None:
    ours = pki(tmp_path / "ours")
    theirs = pki(tmp_path / "theirs")
    # The source trusts our server (our CA) but presents a client cert of another
    # CA; its ca-cert.pem bundles both, or its own sanity check refuses to start.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "ca-cert.pem").write_bytes(
        (ours / "ca-cert.pem").read_bytes() + (theirs / "ca-cert.pem").read_bytes()
    )
    for name in ("client-cert.pem", "client-key.pem"):
        shutil.copy(theirs / name, mixed / name)
    with (
        twistd_qio(tmp_path / "svc", ["record", "--tls-creds", str(ours)]) as svc,
        qemu_source(tmp_path, ram_mib=64, tls_dir=mixed) as src,
    ):
        src.set_capabilities()
        src.set_parameters(tls_creds="tls0", tls_hostname="localhost")
        src.migrate(f"tcp:127.0.0.1:{svc.port}")
        assert src.wait_migration(timeout=60)["status"] == "failed"
        svc.wait_log("TLS handshake failed")
        assert svc.sessions() == [] and svc.incoming() == []


def test_authz_denied_dn_stores_nothing(tmp_path: Path) -> None:
    creds = pki(tmp_path / "pki", "--client-dn", "C=UK,O=elsewhere,CN=intruder")
    with (
        twistd_qio(
            tmp_path / "svc", ["record", "--tls-creds", str(creds), "--tls-authz", "C=UK,CN=qemu*"]
        ) as svc,
        qemu_source(tmp_path, ram_mib=64, tls_dir=creds) as src,
    ):
        src.set_capabilities()
        src.set_parameters(tls_creds="tls0", tls_hostname="localhost")
        src.migrate(f"tcp:127.0.0.1:{svc.port}")
        assert src.wait_migration(timeout=60)["status"] == "failed"
        log = svc.wait_log("TLS handshake failed")
        assert "C=UK,O=elsewhere,CN=intruder" in log and "denied" in log
        assert svc.sessions() == [] and svc.incoming() == []
