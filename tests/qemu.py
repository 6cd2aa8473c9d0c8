"""A synchronous harness that drives a real QEMU 7.2 as a migration source or destination.

Everything here blocks the calling thread and every wait is bounded: it is
meant for plain (non-async) tests and for benchmarks, never for reactor code.
The recipes follow ``reference/qemu-interop.md``:

* a source runs ``-S`` over a ``memory-backend-file`` named ``pc.ram`` whose
  file in ``/dev/shm`` is filled with random bytes, so every page is non-zero
  and the stream is about as large as the guest;
* a destination runs ``-incoming defer`` so capabilities and parameters
  (multifd, TLS) are set before ``migrate-incoming tcp:127.0.0.1:0``; the port
  it chose is read back from ``query-migrate`` (never by probing the port:
  a plain destination takes a probe as its main channel and exits);
* QEMU is stopped with QMP ``quit``, then SIGKILL by PID after a bounded wait
  (a multifd destination hung on a wrong uuid may stop answering QMP).

Usage::

    with qemu_source(tmp_path, ram_mib=64) as src, stdlib_sink(tmp_path / "cap") as sink:
        src.set_parameters()
        src.migrate(f"tcp:127.0.0.1:{sink.port}")
        assert src.wait_migration()["status"] == "completed"
        sink.wait_connections_closed(1)

A test that needs QEMU gets it from :func:`qemu_binary`, which raises (the
test fails, it is not skipped) when ``qemu-system-x86_64`` is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid as uuidlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "QEMU_BINARY",
    "QMPClient",
    "QMPError",
    "QemuVM",
    "Sink",
    "check_ram",
    "fill_random",
    "qemu_binary",
    "qemu_destination",
    "qemu_source",
    "stdlib_send",
    "stdlib_sink",
]

QEMU_BINARY = "qemu-system-x86_64"
# 640 KiB - 1 MiB holds VGA memory and BIOS shadows, which differ between two
# QEMUs even after a perfect load (qemu-interop.md, "A guest-RAM check").
RAM_HOLE = (640 * 1024, 1024 * 1024)
# max-bandwidth for every migration the harness starts: the 7.2 default of
# 128 MiB/s would throttle everything (qemu-interop.md).  Bytes per second.
UNLIMITED_BANDWIDTH = 1 << 40


class QMPError(Exception):
    """A QMP command answered with an error, or QMP could not be reached in time."""


def qemu_binary() -> str:
    """Path of ``qemu-system-x86_64``; raises so a test needing it fails rather than skips."""
    path = shutil.which(QEMU_BINARY)
    if path is None:
        raise RuntimeError(
            f"{QEMU_BINARY} is not installed (Debian: apt-get install qemu-system-x86); "
            "the qemu tests need it"
        )
    return path


def fill_random(path: Path, size: int, *, seed: int | None = None) -> None:
    """Write *size* pseudo-random bytes to *path* (1 MiB at a time, bounded memory)."""
    rng = random.Random(seed)
    chunk = 1 << 20
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(chunk, left)
            f.write(rng.randbytes(n))
            left -= n


class QMPClient:
    """A minimal blocking QMP client over a UNIX socket.

    :meth:`connect` retries until QEMU has created the socket (bounded by
    *timeout*) and negotiates ``qmp_capabilities``.  :meth:`execute` returns
    the ``return`` member of the answer; asynchronous events that arrive in
    between are kept in :attr:`events` and otherwise skipped.  Not thread-safe.
    """

    def __init__(self, path: Path, *, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self._sock: socket.socket | None = None
        self._buf = b""

    def connect(self, *, alive: Any = None) -> None:
        """Connect and negotiate; *alive* (a callable) lets a dead QEMU fail fast."""
        deadline = time.monotonic() + self.timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if alive is not None and not alive():
                raise QMPError(f"QEMU exited before its QMP socket {self.path} answered")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(self.timeout)
            try:
                s.connect(str(self.path))
            except OSError as e:
                s.close()
                last = e
                time.sleep(0.01)  # bounded retry until QEMU's QMP socket exists
                continue
            self._sock = s
            greeting = self._read_message(deadline)
            if "QMP" not in greeting:
                raise QMPError(f"unexpected QMP greeting {greeting!r}")
            self.execute("qmp_capabilities")
            return
        raise QMPError(f"QMP socket {self.path} did not answer in {self.timeout} s: {last}")

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run *command*; returns its ``return`` value, raises :class:`QMPError` on ``error``."""
        if self._sock is None:
            raise QMPError("QMP is not connected")
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        deadline = time.monotonic() + self.timeout
        try:
            self._sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as e:
            raise QMPError(f"QMP {command}: {e}") from e
        while True:
            answer = self._read_message(deadline)
            if "event" in answer:
                self.events.append(answer)
                continue
            if "error" in answer:
                err = answer["error"]
                raise QMPError(f"QMP {command}: {err.get('class')}: {err.get('desc')}")
            if "return" in answer:
                return answer["return"]
            raise QMPError(f"QMP {command}: unexpected answer {answer!r}")

    def _read_message(self, deadline: float) -> dict[str, Any]:
        assert self._sock is not None
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QMPError(f"QMP {self.path}: no answer in {self.timeout} s")
            self._sock.settimeout(left)
            try:
                data = self._sock.recv(65536)
            except (TimeoutError, OSError) as e:
                raise QMPError(f"QMP {self.path}: {e}") from e
            if not data:
                raise QMPError(f"QMP {self.path}: connection closed by QEMU")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        result: dict[str, Any] = json.loads(line)
        return result

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


@dataclass
class QemuVM:
    """One QEMU process started by the harness, and its QMP connection.

    Only the process started here is ever signalled, by its PID.
    """

    name: str
    proc: subprocess.Popen[bytes]
    qmp: QMPClient
    workdir: Path
    log_path: Path
    ram_mib: int
    uuid: str
    ram_path: Path | None = None  # the source's memory-backend-file
    incoming_port: int | None = None
    _log_file: Any = field(default=None, repr=False)

    @property
    def ram_size(self) -> int:
        return self.ram_mib << 20

    # -- QMP helpers ----------------------------------------------------------------

    def set_capabilities(self, **caps: bool) -> None:
        """``migrate-set-capabilities``; names use ``_`` for ``-`` (``multifd=True``).

        ``events`` is always enabled (it costs nothing and makes logs useful).
        """
        caps.setdefault("events", True)
        self.qmp.execute(
            "migrate-set-capabilities",
            {
                "capabilities": [
                    {"capability": k.replace("_", "-"), "state": v} for k, v in caps.items()
                ]
            },
        )

    def set_parameters(self, **params: Any) -> None:
        """``migrate-set-parameters``; ``max-bandwidth`` is always raised (default throttles)."""
        args = {k.replace("_", "-"): v for k, v in params.items()}
        args.setdefault("max-bandwidth", UNLIMITED_BANDWIDTH)
        self.qmp.execute("migrate-set-parameters", args)

    def migrate(self, uri: str) -> None:
        self.qmp.execute("migrate", {"uri": uri})

    def query_migrate(self) -> dict[str, Any]:
        result: dict[str, Any] = self.qmp.execute("query-migrate")
        return result

    def wait_migration(self, timeout: float = 60.0, *, poll: float = 0.02) -> dict[str, Any]:
        """Poll ``query-migrate`` until ``completed``/``failed``/``cancelled``; bounded.

        Works on both ends.  A destination that exits (a failed load exits
        QEMU with status 1) is reported as ``{"status": "exited", ...}`` with
        its log, rather than as a QMP error.
        """
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return {"status": "exited", "returncode": self.proc.returncode, "log": self.log()}
            try:
                last = self.query_migrate()
            except QMPError:
                if self.proc.poll() is not None:
                    continue
                raise
            if last.get("status") in ("completed", "failed", "cancelled"):
                return last
            time.sleep(poll)  # bounded poll of query-migrate (deadline above)
        raise TimeoutError(f"{self.name}: migration not finished after {timeout} s: {last}")

    def migrate_incoming(self, uri: str = "tcp:127.0.0.1:0") -> int:
        """``migrate-incoming`` on a ``-incoming defer`` destination; returns its port."""
        self.qmp.execute("migrate-incoming", {"uri": uri})
        deadline = time.monotonic() + self.qmp.timeout
        while time.monotonic() < deadline:
            info = self.query_migrate()
            for addr in info.get("socket-address", []):
                if addr.get("type") == "inet" and addr.get("port") is not None:
                    # 7.2 reports the port as a string.
                    self.incoming_port = int(addr["port"])
                    return self.incoming_port
            time.sleep(0.01)  # bounded poll (deadline above)
        raise QMPError(f"{self.name}: query-migrate never showed the listening port")

    def query_status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.qmp.execute("query-status")
        return result

    def pmemsave(self, path: Path, size: int | None = None, *, timeout: float = 60.0) -> None:
        """Dump guest-physical memory ``[0, size)`` to *path* (QEMU writes it itself)."""
        size = self.ram_size if size is None else size
        old = self.qmp.timeout
        self.qmp.timeout = timeout
        try:
            self.qmp.execute("pmemsave", {"val": 0, "size": size, "filename": str(path)})
        finally:
            self.qmp.timeout = old

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # -- teardown -------------------------------------------------------------------

    def stop(self, *, grace: float = 3.0) -> int | None:
        """``quit`` over QMP, then SIGKILL by PID if still alive after *grace* seconds."""
        if self.proc.poll() is None:
            old = self.qmp.timeout
            self.qmp.timeout = min(old, 1.0)
            with contextlib.suppress(QMPError, OSError):
                self.qmp.execute("quit")
            self.qmp.timeout = old
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10.0)
        self.qmp.close()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return self.proc.returncode


def _start(
    name: str,
    workdir: Path,
    args: list[str],
    *,
    ram_mib: int,
    vm_uuid: str,
    ram_path: Path | None,
    qmp_timeout: float,
) -> QemuVM:
    workdir.mkdir(parents=True, exist_ok=True)
    qmp_path = workdir / f"{name}.qmp"
    log_path = workdir / f"{name}.log"
    log_file = open(log_path, "wb")  # closed by QemuVM.stop
    cmd = [qemu_binary(), "-name", name, *args, "-qmp", f"unix:{qmp_path},server=on,wait=off"]
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT
    )
    vm = QemuVM(
        name=name,
        proc=proc,
        qmp=QMPClient(qmp_path, timeout=qmp_timeout),
        workdir=workdir,
        log_path=log_path,
        ram_mib=ram_mib,
        uuid=vm_uuid,
        ram_path=ram_path,
        _log_file=log_file,
    )
    try:
        vm.qmp.connect(alive=lambda: proc.poll() is None)
    except BaseException as e:
        vm.stop()
        raise QMPError(f"{name}: {e}\n{vm.log()}") from e
    return vm


def _tls_args(tls_dir: Path | None, endpoint: str) -> list[str]:
    if tls_dir is None:
        return []
    return ["-object", f"tls-creds-x509,id=tls0,endpoint={endpoint},dir={tls_dir}"]


@contextlib.contextmanager
def qemu_source(
    workdir: Path,
    *,
    ram_mib: int = 64,
    uuid: str | None = None,
    tls_dir: Path | None = None,
    seed: int | None = None,
    fill: str = "random",
    name: str = "src",
    qmp_timeout: float = 10.0,
) -> Iterator[QemuVM]:
    """A paused (``-S``) source whose RAM file in ``/dev/shm`` is random; stopped on exit.

    ``fill="zero"`` leaves the RAM zero instead (every page then travels as a
    zero-page record on the main channel, even with multifd).

    The RAM file has a unique name per call and is removed on exit.  *tls_dir*
    adds ``tls-creds-x509,id=tls0,endpoint=client`` (set ``tls_creds="tls0"``
    with :meth:`QemuVM.set_parameters` to use it).
    """
    vm_uuid = uuid or str(uuidlib.uuid4())
    ram_path = Path("/dev/shm") / f"qiot-{os.getpid()}-{uuidlib.uuid4().hex}-ram.bin"
    vm: QemuVM | None = None
    try:
        if fill == "random":
            fill_random(ram_path, ram_mib << 20, seed=seed)
        elif fill == "zero":
            with open(ram_path, "wb") as f:
                f.truncate(ram_mib << 20)
        else:
            raise ValueError(f"fill must be 'random' or 'zero', not {fill!r}")
        args = [
            "-machine", "pc,memory-backend=pc.ram", "-accel", "tcg", "-m", str(ram_mib),
            "-object",
            f"memory-backend-file,id=pc.ram,size={ram_mib}M,mem-path={ram_path},share=on",
            "-display", "none", "-nodefaults", "-S", "-uuid", vm_uuid,
            *_tls_args(tls_dir, "client"),
        ]  # fmt: skip
        vm = _start(
            name, workdir, args, ram_mib=ram_mib, vm_uuid=vm_uuid, ram_path=ram_path,
            qmp_timeout=qmp_timeout,
        )  # fmt: skip
        yield vm
    finally:
        if vm is not None:
            vm.stop()
        with contextlib.suppress(FileNotFoundError):
            ram_path.unlink()


@contextlib.contextmanager
def qemu_destination(
    workdir: Path,
    *,
    ram_mib: int = 64,
    uuid: str | None = None,
    tls_dir: Path | None = None,
    name: str = "dst",
    qmp_timeout: float = 10.0,
) -> Iterator[QemuVM]:
    """A ``-incoming defer`` destination with a plain ``-m``; stopped on exit.

    Set capabilities/parameters, then call :meth:`QemuVM.migrate_incoming`.
    For multifd, *uuid* must equal the source's (qemu-interop.md trap 5).
    """
    vm_uuid = uuid or str(uuidlib.uuid4())
    args = [
        "-machine", "pc", "-accel", "tcg", "-m", str(ram_mib),
        "-display", "none", "-nodefaults", "-uuid", vm_uuid,
        *_tls_args(tls_dir, "server"),
        "-incoming", "defer",
    ]  # fmt: skip
    vm = _start(
        name, workdir, args, ram_mib=ram_mib, vm_uuid=vm_uuid, ram_path=None,
        qmp_timeout=qmp_timeout,
    )  # fmt: skip
    try:
        yield vm
    finally:
        vm.stop()


def check_ram(dst: QemuVM, src_ram_path: Path | None, *, dump_path: Path | None = None) -> None:
    """``pmemsave`` the destination and compare with the source's RAM file.

    Takes ``src.ram_path`` as it is (only sources have one: ``None`` is an
    error).  Skips 640 KiB - 1 MiB (VGA/BIOS).  Raises :class:`AssertionError`
    naming the first differing offset.  The dump is removed afterwards.
    """
    if src_ram_path is None:
        raise AssertionError("check_ram needs a source's RAM file (src.ram_path)")
    size = src_ram_path.stat().st_size
    dump = dump_path or dst.workdir / f"{dst.name}-pmemsave.bin"
    dst.pmemsave(dump, size)
    try:
        chunk = 1 << 20
        with open(src_ram_path, "rb") as a, open(dump, "rb") as b:
            offset = 0
            while offset < size:
                x = a.read(chunk)
                y = b.read(chunk)
                if len(y) != len(x):
                    raise AssertionError(f"pmemsave dump is short at offset {offset:#x}")
                if x != y:
                    for i in range(len(x)):
                        pos = offset + i
                        if RAM_HOLE[0] <= pos < RAM_HOLE[1]:
                            continue
                        if x[i] != y[i]:
                            raise AssertionError(
                                f"guest RAM differs at offset {pos:#x} "
                                f"(source {x[i]:#04x}, destination {y[i]:#04x})"
                            )
                offset += len(x)
    finally:
        with contextlib.suppress(FileNotFoundError):
            dump.unlink()


# -- stdlib socket peers ------------------------------------------------------------------


@dataclass
class Sink:
    """What :func:`stdlib_sink` yields: its port and the files it wrote, in accept order."""

    port: int
    directory: Path
    files: list[Path] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    closed: int = 0
    errors: list[str] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition, repr=False)

    def wait_connections_closed(self, count: int, timeout: float = 60.0) -> None:
        """Block until *count* connections were accepted and reached EOF (bounded)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.closed < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"sink: {self.closed}/{count} connections closed after {timeout} s"
                    )
                self._cond.wait(left)


@contextlib.contextmanager
def stdlib_sink(
    directory: Path,
    port: int = 0,
    *,
    max_connections: int = 16,
    chunk: int = 1 << 20,
    prefix: str = "chan",
) -> Iterator[Sink]:
    """A plain-socket server on 127.0.0.1 storing each accepted connection to its own file.

    Connection *i* (accept order; the main channel is always first, since
    QEMU 7.2 connects it first) goes to ``directory/{prefix}-{i}.bin``.  One
    thread accepts and one thread per connection reads with ``recv_into`` into
    a reused buffer: this is the baseline a recorder is measured against.
    Nothing is ever written back (a byte back would make a 7.2 source RST).
    On exit the listener is closed and the threads are joined (bounded).
    """
    directory.mkdir(parents=True, exist_ok=True)
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", port))
    lsock.listen(max_connections)
    lsock.settimeout(0.1)
    sink = Sink(port=lsock.getsockname()[1], directory=directory)
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def reader(conn: socket.socket, path: Path, index: int) -> None:
        total = 0
        buf = bytearray(chunk)
        view = memoryview(buf)
        try:
            conn.settimeout(1.0)
            with open(path, "wb", buffering=0) as f:
                while not stop.is_set():
                    try:
                        n = conn.recv_into(buf)
                    except TimeoutError:
                        continue
                    if n == 0:
                        break
                    f.write(view[:n])
                    total += n
        except OSError as e:
            with sink._cond:
                sink.errors.append(f"{path.name}: {e}")
        finally:
            conn.close()
            with sink._cond:
                sink.sizes[index] = total
                sink.closed += 1
                sink._cond.notify_all()

    def acceptor() -> None:
        accepted = 0
        while not stop.is_set() and accepted < max_connections:
            try:
                conn, _ = lsock.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            conn.setblocking(True)
            path = directory / f"{prefix}-{accepted}.bin"
            with sink._cond:
                sink.files.append(path)
                sink.sizes.append(0)
            t = threading.Thread(
                target=reader, args=(conn, path, accepted), name=f"sink-{accepted}", daemon=True
            )
            threads.append(t)
            t.start()
            accepted += 1

    acc = threading.Thread(target=acceptor, name="sink-accept", daemon=True)
    acc.start()
    try:
        yield sink
    finally:
        stop.set()
        acc.join(5.0)
        lsock.close()
        for t in list(threads):
            t.join(5.0)


def stdlib_send(
    port: int,
    main: Path,
    multifd: Sequence[Path] = (),
    *,
    host: str = "127.0.0.1",
    chunk: int = 1 << 20,
    timeout: float = 60.0,
) -> None:
    """Replay a recording with plain sockets: main first, then every multifd channel at once.

    QEMU 7.2 does not peek, so the main connection is opened and its first
    chunk written before any multifd channel connects (trap 3); the multifd
    channels are fed concurrently, one thread each (trap 4).  Each socket is
    closed after its file is sent.  Raises the first error any sender hit.
    """
    errors: list[BaseException] = []

    def send(sock: socket.socket, path: Path, skip: int) -> None:
        try:
            with open(path, "rb") as f:
                f.seek(skip)
                while data := f.read(chunk):
                    sock.sendall(data)
        except BaseException as e:  # reported to the caller below
            errors.append(e)
        finally:
            sock.close()

    main_sock = socket.create_connection((host, port), timeout=timeout)
    with open(main, "rb") as f:
        first = f.read(chunk)
    main_sock.sendall(first)
    threads = [threading.Thread(target=send, args=(main_sock, main, len(first)), daemon=True)]
    for path in multifd:
        s = socket.create_connection((host, port), timeout=timeout)
        threads.append(threading.Thread(target=send, args=(s, path, 0), daemon=True))
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in threads):
        raise TimeoutError(f"stdlib_send: not finished after {timeout} s")
    if errors:
        raise errors[0]
