"""``twistd qio``: options and service construction.

``twistd -n qio`` runs the default subcommand, ``record``: listen on
``tcp:4444:interface=127.0.0.1`` and file each incoming QEMU migration under
``./qio-recordings``.  ``twistd -n qio proxy --to HOST:PORT`` forwards
migrations to a QEMU destination.  Nothing listens beyond loopback unless asked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python import usage

__all__ = [
    "DEFAULT_LISTEN",
    "DEFAULT_OUTPUT",
    "Options",
    "ProxyOptions",
    "RecordOptions",
    "makeService",
]

DEFAULT_LISTEN = "tcp:4444:interface=127.0.0.1"
DEFAULT_OUTPUT = "./qio-recordings"


class _ServerOptions(usage.Options):
    """Options shared by every subcommand that accepts migrations."""

    optFlags = [
        ["no-verify-peer", None, "With --tls-creds: do not require a client certificate."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["tls-authz"] = []

    def opt_listen(self, description: str) -> None:
        """Twisted server endpoint to listen on (repeatable), e.g. tcp:4444:interface=127.0.0.1,
        tcp6:4444:interface=\\:\\:1, unix:/run/qio.sock [default: tcp:4444:interface=127.0.0.1]"""
        self["listen"].append(description)

    opt_l = opt_listen

    def opt_tls_authz(self, glob: str) -> None:
        """With --tls-creds: allow client certificates whose DN matches this glob (repeatable;
        GnuTLS's DN form, e.g. 'C=UK,O=Example,CN=src*'). Given at all, anything else is denied."""
        self["tls-authz"].append(glob)

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        if self["tls-authz"] and not self["tls-creds"]:
            raise usage.UsageError("--tls-authz needs --tls-creds")
        if self["no-verify-peer"] and self["tls-authz"]:
            raise usage.UsageError("--tls-authz needs client certificates: drop --no-verify-peer")


_TLS_PARAMETERS: list[list[Any]] = [
    [
        "tls-creds",
        None,
        None,
        "Accept TLS only, with server credentials from this directory in QEMU's layout "
        "(ca-cert.pem, server-cert.pem, server-key.pem).",
    ],
    [
        "tls-priority",
        None,
        None,
        "GnuTLS-style priority for the TLS server [default: @QIO-TLS1.2, TLS 1.2 only: "
        "a TLS 1.3 server's session tickets make a QEMU 7.2 source lose the end of its stream].",
    ],
    ["handshake-timeout", None, 10.0, "Seconds a TLS handshake may take.", float],
]


class RecordOptions(_ServerOptions):
    synopsis = "[--listen ENDPOINT]... [--output DIR] [--tls-creds DIR]"
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
        *_TLS_PARAMETERS,
    ]


class ProxyOptions(_ServerOptions):
    synopsis = "--to ADDRESS [--listen ENDPOINT]... [--tls-creds DIR] [--to-tls-creds DIR]"
    longdesc = (
        "Forward every channel of incoming QEMU migrations to a QEMU destination "
        "(started with -incoming), one upstream connection per channel, terminating "
        "TLS on either side as asked, optionally recording a copy (--record DIR)."
    )
    optParameters = [
        ["to", None, None, "Destination address: HOST:PORT, tcp:HOST:PORT or unix:PATH."],
        ["to-tls-creds", None, None, "Client credentials directory for TLS to the destination."],
        ["to-tls-hostname", None, None, "Name to verify in the destination's certificate."],
        ["record", None, None, "Also record each migration as a session in this directory."],
        *_TLS_PARAMETERS,
    ]

    def postOptions(self) -> None:
        super().postOptions()
        if not self["to"]:
            raise usage.UsageError("--to is required")
        if self["to-tls-hostname"] and not self["to-tls-creds"]:
            raise usage.UsageError("--to-tls-hostname needs --to-tls-creds")


class Options(usage.Options):
    synopsis = "[record|proxy] [options]"
    longdesc = "Record or proxy QEMU live migrations. Subcommands take --help."
    subCommands = [
        ["record", None, RecordOptions, "Record incoming migrations to disk (the default)."],
        ["proxy", None, ProxyOptions, "Forward migrations to a QEMU destination."],
    ]
    defaultSubCommand = "record"


class _StopService(service.Service):
    """Starts TLS credential loads; on stop, ends what is in flight before the process exits."""

    log = Logger()

    def __init__(self, what: str, target: Any, upgrades: list[Any], reactor: Any) -> None:
        self.what = what
        self.target = target
        self.upgrades = upgrades
        self.reactor = reactor

    def startService(self) -> None:
        super().startService()
        for up in self.upgrades:
            up.start().addErrback(self._fatal)
        # Logged once the reactor runs (and twistd's signal handlers are in place).
        self.reactor.callWhenRunning(self.log.info, "qio {what}", what=self.what)

    def _fatal(self, failure: Any) -> None:
        self.log.critical("cannot load TLS credentials: {error}", error=failure.value)
        from twisted.internet.error import ReactorNotRunning

        try:
            self.reactor.stop()
        except ReactorNotRunning:
            pass  # already stopping

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        result: Deferred[None] = self.target.stop()
        return result


def _server_tls(opts: usage.Options, reactor: Any) -> Any:
    if not opts["tls-creds"]:
        return None
    from .crypto import PRIORITY_QEMU_RECEIVER
    from .migration._tlsup import TLSUpgrade

    return TLSUpgrade(
        Path(opts["tls-creds"]),
        endpoint="server",
        verify_peer=not opts["no-verify-peer"],
        priority=opts["tls-priority"] or PRIORITY_QEMU_RECEIVER,
        authz_globs=opts["tls-authz"],
        handshake_timeout=opts["handshake-timeout"],
        reactor=reactor,
    )


def makeService(options: Options) -> service.IService:
    # Imported here, not at module level: twistd imports this module while
    # parsing options, before --reactor has installed the reactor.
    from twisted.internet import reactor

    from .listener import NetListener, NetListenerService
    from .migration.recorder import Recorder

    sub = options.subOptions
    command = options.subCommand or "record"
    if sub is None:
        sub = RecordOptions()
        sub.parseOptions([])
    top = service.MultiService()
    server_tls = _server_tls(sub, reactor)
    upgrades = [u for u in [server_tls] if u is not None]
    if command == "record":
        target: Any = Recorder(
            Path(sub["output"]), classify_timeout=sub["classify-timeout"], tls=server_tls
        )
        what = f"record ready: sessions go to {target.output}"
    else:
        from .migration._tlsup import TLSUpgrade
        from .migration.proxy import Proxy

        client_tls = None
        if sub["to-tls-creds"]:
            from .migration.replay import _host_of

            client_tls = TLSUpgrade(
                Path(sub["to-tls-creds"]),
                endpoint="client",
                hostname=sub["to-tls-hostname"] or _host_of(sub["to"]),
                handshake_timeout=sub["handshake-timeout"],
                reactor=reactor,
            )
            upgrades.append(client_tls)
        recorder = Recorder(Path(sub["record"])) if sub["record"] else None
        target = Proxy(sub["to"], server_tls=server_tls, client_tls=client_tls, recorder=recorder)
        what = f"proxy ready: forwarding to {sub['to']}" + (
            f", recording to {sub['record']}" if recorder is not None else ""
        )
    # Children stop in reverse order: the listener first (no new clients),
    # then the recorder or proxy (close what is in flight).
    _StopService(what, target, upgrades, reactor).setServiceParent(top)
    listener = NetListener(name=f"qio-{command}")
    listener.set_client_func(target.client_func)
    NetListenerService(listener, sub["listen"]).setServiceParent(top)
    return top
