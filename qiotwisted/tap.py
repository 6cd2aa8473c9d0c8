"""``twistd qio``: options and service construction.

``twistd -n qio`` runs the default subcommand, ``record``: listen on
``tcp:4444:interface=127.0.0.1`` and file each incoming QEMU migration under
``./qio-recordings``.  Nothing listens beyond loopback unless asked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python import usage

__all__ = ["DEFAULT_LISTEN", "DEFAULT_OUTPUT", "Options", "RecordOptions", "makeService"]

DEFAULT_LISTEN = "tcp:4444:interface=127.0.0.1"
DEFAULT_OUTPUT = "./qio-recordings"


class _ListenMixin(usage.Options):
    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description: str) -> None:
        """Twisted server endpoint to listen on (repeatable), e.g. tcp:4444:interface=127.0.0.1,
        tcp6:4444:interface=\\:\\:1, unix:/run/qio.sock [default: tcp:4444:interface=127.0.0.1]"""
        self["listen"].append(description)

    opt_l = opt_listen


class RecordOptions(_ListenMixin):
    synopsis = "[--listen ENDPOINT]... [--output DIR]"
    longdesc = (
        "Record every incoming QEMU live migration into its own session directory: "
        "main.bin (and multifd-<id>.bin), plus manifest.json saying whether the stream "
        "is complete. Point a QEMU source at it with: migrate tcp:127.0.0.1:4444"
    )
    optParameters = [
        ["output", "o", DEFAULT_OUTPUT, "Directory that receives the sessions."],
        [
            "classify-timeout",
            None,
            60.0,
            "Seconds a new connection may take to send its first 4 bytes.",
            float,
        ],
    ]

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]


class Options(usage.Options):
    synopsis = "[record] [options]"
    longdesc = "Record QEMU live migrations. Subcommands take --help."
    subCommands = [
        ["record", None, RecordOptions, "Record incoming migrations to disk (the default)."],
    ]
    defaultSubCommand = "record"


class RecorderService(service.Service):
    """Owns a :class:`~qiotwisted.migration.recorder.Recorder`; stopping it files
    in-flight sessions as ``incomplete`` before the process exits."""

    log = Logger()

    def __init__(self, recorder: Any) -> None:
        self.recorder = recorder

    def startService(self) -> None:
        super().startService()
        # Logged once the reactor runs (and twistd's signal handlers are in place).
        self.recorder.reactor.callWhenRunning(
            self.log.info,
            "qio record ready: sessions go to {output}",
            output=str(self.recorder.output),
        )

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        result: Deferred[None] = self.recorder.stop()
        return result


def makeService(options: Options) -> service.IService:
    # Imported here, not at module level: twistd imports this module while
    # parsing options, before --reactor has installed the reactor.
    from .listener import NetListener, NetListenerService
    from .migration.recorder import Recorder

    sub = options.subOptions
    top = service.MultiService()
    if options.subCommand in (None, "record"):
        if sub is None:
            sub = RecordOptions()
            sub.parseOptions([])
        recorder = Recorder(Path(sub["output"]), classify_timeout=sub["classify-timeout"])
        # Children stop in reverse order: the listener first (no new clients),
        # then the recorder (close what is in flight).
        RecorderService(recorder).setServiceParent(top)
        listener = NetListener(name="qio-record")
        listener.set_client_func(recorder.client_func)
        NetListenerService(listener, sub["listen"]).setServiceParent(top)
    return top
