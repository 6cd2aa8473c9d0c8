"""The programs in ``examples/tls_migration/``, run as their README runs them.

Each example is a child process (as a user starts it), and every wait on it is
bounded.  The QEMU tests use a real QEMU 7.2 on both sides of the example:

* ``destination.py`` receives a TLS migration from a QEMU source; the file it
  wrote must load into a plain QEMU destination with the source's exact RAM;
* ``source.py`` sends a recording (made by ``twistd qio record`` from a plain
  migration: a recording is plaintext) into a QEMU TLS destination, whose RAM
  must then equal the source's;
* ``multichannel_demo.py`` needs no QEMU: it must verify its image's sha256
  and show completions on the reactor thread only, workers on others.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.qemu import check_ram, qemu_destination, qemu_source, stdlib_send
from tests.twistd_proc import twistd_qio

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "tls_migration"
RAM_MIB = 64
CLIENT_DN = "C=UK,O=qiotwisted,CN=qemu-client"  # qio pki's default client subject
SERVER_DN = "C=UK,O=qiotwisted,CN=localhost"


def make_pki(directory: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "qiotwisted.cli", "pki", str(directory)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return directory


@dataclass
class Program:
    proc: subprocess.Popen[bytes]
    log_path: Path

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        """Block until *pattern* appears in the program's output (bounded)."""
        deadline = time.monotonic() + timeout
        while (m := re.search(pattern, text := self.output())) is None:
            if self.proc.poll() is not None:
                raise AssertionError(f"exited with {self.proc.returncode}:\n{text}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{pattern!r} not printed after {timeout} s:\n{text}")
            time.sleep(0.05)  # bounded poll of another process's output
        return m

    def wait(self, timeout: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"still running after {timeout} s:\n{self.output()}") from None


@contextlib.contextmanager
def example(workdir: Path, name: str, *args: str) -> Iterator[Program]:
    """Run ``python examples/tls_migration/NAME ARGS``; stopped by PID on exit if still running."""
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(EXAMPLES / name), *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        yield Program(proc, log_path)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def test_multichannel_demo_verifies_sha256_with_completions_on_the_reactor(
    tmp_path: Path,
) -> None:
    with example(tmp_path, "multichannel_demo.py", "--mib", "16") as demo:
        assert demo.wait(timeout=120) == 0, demo.output()
    out = demo.output()
    assert re.search(r"^sha256 verified: [0-9a-f]{64}$", out, re.MULTILINE), out
    assert "sent 16 MiB over 4 TLS channels" in out
    assert out.count(f"TLSv1.3 from {CLIENT_DN}") == 4
    reactor_thread = re.search(r"^reactor thread: (\S+)$", out, re.MULTILINE)
    completions = re.search(r"^completions ran on: (.+)$", out, re.MULTILINE)
    workers = re.search(r"^workers ran on: (.+)$", out, re.MULTILINE)
    assert reactor_thread and completions and workers, out
    assert completions.group(1) == reactor_thread.group(1) == "MainThread"
    worker_threads = workers.group(1).split(", ")
    assert worker_threads and all(t.startswith("qio-worker-") for t in worker_threads), out
    # Each kind of blocking step ran in a worker and completed in the reactor thread.
    steps = re.findall(r"^  (worker|completion)\s+(.+?)\s+ran on (\S+)$", out, re.MULTILINE)
    for what in (
        "generate PKI (CA, server, client)",
        "load server credentials",
        "load client credentials",
        "generate 16 MiB image + sha256",
        "connect",
        "read image chunk",
        "write received chunk",
        "hash received image",
    ):
        assert {t for role, w, t in steps if w == what and role == "completion"} == {
            "MainThread"
        }, what
        ran = {t for role, w, t in steps if w == what and role == "worker"}
        assert ran and all(t.startswith("qio-worker-") for t in ran), what
    # The TLS handshake is a Task without a worker: only its completion shows.
    assert {(r, t) for r, w, t in steps if w.startswith("TLS handshake")} == {
        ("completion", "MainThread")
    }


@pytest.mark.qemu
def test_destination_receives_a_qemu_tls_migration_that_loads_back(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    stream = tmp_path / "stream.bin"
    args = ["--tls-creds", str(pki), "--port", "0", str(stream)]
    with (
        example(tmp_path, "destination.py", *args) as dest,
        qemu_source(tmp_path, ram_mib=RAM_MIB, tls_dir=pki) as src,
    ):
        port = int(dest.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1))
        src.set_capabilities()
        src.set_parameters(tls_creds="tls0", tls_hostname="localhost")
        src.migrate(f"tcp:127.0.0.1:{port}")
        assert src.wait_migration(timeout=120)["status"] == "completed"
        assert dest.wait(timeout=60) == 0, dest.output()
        size = stream.stat().st_size
        assert size > RAM_MIB << 20  # a random guest: every page travels
        out = dest.output()
        # TLS 1.2: a TLS 1.3 server's tickets would make QEMU 7.2 drop its stream's end.
        assert f"TLS TLSv1.2 with {CLIENT_DN}" in out
        assert f"received {size} bytes from {CLIENT_DN} into {stream}: complete" in out
        with qemu_destination(tmp_path, ram_mib=RAM_MIB) as dst:
            dst.set_capabilities()
            dst.set_parameters()
            stdlib_send(dst.migrate_incoming(), stream, timeout=120)
            assert dst.wait_migration(timeout=120)["status"] == "completed"
            check_ram(dst, src.ram_path)


@pytest.mark.qemu
def test_source_sends_a_recording_into_a_qemu_tls_destination(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    with qemu_source(tmp_path, ram_mib=RAM_MIB) as src:
        with twistd_qio(tmp_path / "record", ["record"]) as recorder:
            src.set_capabilities()
            src.set_parameters()
            src.migrate(f"tcp:127.0.0.1:{recorder.port}")
            assert src.wait_migration(timeout=120)["status"] == "completed"
            (manifest,) = recorder.wait_sessions(1, timeout=120)
            assert manifest["status"] == "complete", manifest
            stream = recorder.sessions()[0] / "main.bin"
        size = stream.stat().st_size
        with qemu_destination(tmp_path, ram_mib=RAM_MIB, tls_dir=pki) as dst:
            dst.set_capabilities()
            dst.set_parameters(tls_creds="tls0")
            port = dst.migrate_incoming()
            # --tls-hostname defaults to the host of --to: 127.0.0.1, an IP SAN of qio pki's cert.
            args = ["--tls-creds", str(pki), "--to", f"127.0.0.1:{port}", str(stream)]
            with example(tmp_path, "source.py", *args) as source:
                assert source.wait(timeout=120) == 0, source.output()
            assert dst.wait_migration(timeout=120)["status"] == "completed", dst.log()
            out = source.output()
            assert f"with {SERVER_DN}" in out
            assert f"sent {size} of {size} bytes (100%" in out
            assert re.search(rf"^sent {size} bytes of {size} in ", out, re.MULTILINE), out
            check_ram(dst, src.ram_path)
