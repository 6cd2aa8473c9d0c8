"""The packaging promises: twistd finds the `qio` plugin in the environment `make run`
builds, and the wheel ships the dropin without shadowing Twisted's own package."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from twisted.application.service import IService, IServiceMaker
from twisted.plugin import IPlugin, getPlugins
from zope.interface.verify import verifyObject

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_plugin_discovered_and_builds_a_service(tmp_path: Path) -> None:
    makers = {p.tapname: p for p in getPlugins(IServiceMaker)}
    qio = makers["qio"]
    verifyObject(IServiceMaker, qio)
    verifyObject(IPlugin, qio)
    opts = qio.options()
    opts.parseOptions(
        ["record", "--listen", "tcp:0:interface=127.0.0.1", "--output", str(tmp_path)]
    )
    assert opts.subCommand == "record"
    assert IService.providedBy(qio.makeService(opts))


def test_default_subcommand_is_record_on_loopback() -> None:
    from qiotwisted.tap import DEFAULT_LISTEN, Options

    opts = Options()
    opts.parseOptions([])
    assert opts.subCommand == "record"
    assert opts.subOptions["listen"] == [DEFAULT_LISTEN]
    assert "interface=127.0.0.1" in DEFAULT_LISTEN


def test_twistd_help_lists_qio() -> None:
    out = subprocess.run(
        [str(BIN / "twistd"), "--help"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert any(line.split()[:1] == ["qio"] for line in out.splitlines()), out


def test_twistd_qio_help_runs() -> None:
    proc = subprocess.run(
        [str(BIN / "twistd"), "-n", "--pidfile=", "qio", "record", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--listen" in proc.stdout and "--output" in proc.stdout


def test_wheel_ships_the_dropin_and_no_twisted_init(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path), str(ROOT)],
        capture_output=True,
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("qiotwisted-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "twisted/plugins/qiotwisted_plugin.py" in names
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names
    assert "qiotwisted/py.typed" in names
    assert "qiotwisted/task.py" in names


def test_twistd_qio_starts_listens_and_stops_on_sigterm(tmp_path: Path) -> None:
    """The `make run` job: twistd -n qio starts, listens on loopback, exits cleanly on SIGTERM."""
    log = tmp_path / "twistd.log"
    proc = subprocess.Popen(
        [
            str(BIN / "twistd"),
            "-n",
            "--pidfile=",
            "--logfile",
            str(log),
            "qio",
            "record",
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--output",
            str(tmp_path / "rec"),
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if log.exists() and "qio record ready" in log.read_text():
                break
            assert proc.poll() is None, log.read_text() if log.exists() else "twistd exited"
            time.sleep(0.1)  # bounded poll of another process's log file
        text = log.read_text()
        assert "listening on" in text and "127.0.0.1" in text, text
        proc.send_signal(signal.SIGTERM)
        # twistd shuts down cleanly, then re-raises the signal so its exit
        # status says it was terminated (Twisted's own behaviour).
        assert proc.wait(timeout=10) == -signal.SIGTERM
        assert "Server Shut Down." in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
