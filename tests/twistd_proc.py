"""Run ``twistd -n qio ...`` as a real child process for end-to-end tests.

Synchronous and bounded, like :mod:`tests.qemu`; only the process started here
is ever signalled, by its PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
_LISTENING = re.compile(r"listening on (.+)$", re.MULTILINE)


@dataclass
class Twistd:
    proc: subprocess.Popen[bytes]
    log_path: Path
    output: Path
    addresses: list[str]

    @property
    def port(self) -> int:
        return int(self.addresses[0].rsplit(":", 1)[1])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def sessions(self) -> list[Path]:
        """Finished sessions (renamed into place), oldest first."""
        if not self.output.exists():
            return []
        return sorted(
            (p for p in self.output.iterdir() if p.is_dir() and not p.name.startswith(".")),
            key=lambda p: p.name,
        )

    def incoming(self) -> list[Path]:
        if not self.output.exists():
            return []
        return [p for p in self.output.iterdir() if p.name.startswith(".incoming-")]

    def wait_sessions(self, count: int, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Block until *count* sessions are filed; return their manifests (bounded)."""
        deadline = time.monotonic() + timeout
        while len(self.sessions()) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(self.sessions())}/{count} sessions after {timeout} s\n" + self.log()
                )
            assert self.proc.poll() is None, "twistd exited:\n" + self.log()
            time.sleep(0.05)  # bounded poll of a directory another process writes
        return [json.loads((p / "manifest.json").read_text()) for p in self.sessions()]

    def wait_log(self, needle: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while needle not in (text := self.log()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{needle!r} not logged after {timeout} s\n" + text)
            time.sleep(0.05)  # bounded poll of another process's log
        return text

    def terminate(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


@contextlib.contextmanager
def twistd_qio(
    workdir: Path,
    args: Sequence[str] = ("record",),
    *,
    listen: Sequence[str] = ("tcp:0:interface=127.0.0.1",),
    output: Path | None = None,
    extra_output: bool = True,
    preexec_fn: Callable[[], None] | None = None,
    timeout: float = 30.0,
) -> Iterator[Twistd]:
    """Start ``twistd -n qio ARGS --listen ... [--output ...]`` and wait until it is ready.

    *extra_output* False leaves ``--output`` off (for ``proxy``, which has none);
    *preexec_fn* runs in the child before twistd (e.g. to set an rlimit).
    """
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    output = output or workdir / "recordings"
    log_path = workdir / f"twistd-{time.monotonic_ns()}.log"
    argv = [str(BIN / "twistd"), "-n", "--pidfile=", "--logfile", str(log_path), "qio", *args]
    for description in listen:
        argv += ["--listen", description]
    if extra_output:
        argv += ["--output", str(output)]
    proc = subprocess.Popen(
        argv, cwd=workdir, env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=preexec_fn
    )
    try:
        t = Twistd(proc, log_path, output, [])
        deadline = time.monotonic() + timeout
        while True:
            text = t.log() if log_path.exists() else ""
            if "ready" in text and (m := _LISTENING.search(text)):
                t.addresses = [a.strip() for a in m.group(1).split(",")]
                break
            if proc.poll() is not None:
                raise AssertionError(f"twistd exited with {proc.returncode}:\n{text}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"twistd not ready after {timeout} s:\n{text}")
            time.sleep(0.05)  # bounded poll of the child's log
        yield t
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
