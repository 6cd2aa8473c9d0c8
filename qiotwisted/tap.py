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
        for key in ("min-free-space", "min-rate"):
            if isinstance(self[key], str):  # the default is not coerced
                self[key] = _size(self[key])
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        if self["tls-authz"] and not self["tls-creds"]:
            raise usage.UsageError("--tls-authz needs --tls-creds")
        if self["no-verify-peer"] and self["tls-authz"]:
            raise usage.UsageError("--tls-authz needs client certificates: drop --no-verify-peer")


def _seconds(text: str) -> float:
    value = float(text)
    if value < 0:
        raise ValueError(f"must not be negative: {text}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"must not be negative: {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"must be at least 1: {text}")
    return value


def _size(text: str) -> int:
    from .migration.limits import parse_size

    return parse_size(text)


# Limits every service applies, with safe defaults (see qiotwisted/migration/limits.py).
# 0 turns a limit off.  Coercers run at parse time, so a bad value is a usage error.
_LIMIT_PARAMETERS: list[list[Any]] = [
    [
        "handshake-timeout",
        None,
        10.0,
        "Seconds a new connection has to identify itself: its TLS handshake, then (timed "
        "separately) its first bytes, the migration magic (multifd: its 64-byte init "
        "packet). A connection that stays silent is closed. 0: no limit.",
        _seconds,
    ],
    [
        "idle-timeout",
        None,
        60.0,
        "Seconds a channel may send nothing before it is closed; its session is then "
        "filed incomplete with that reason. 0: no limit.",
        _seconds,
    ],
    [
        "max-connections",
        None,
        256,
        "Connections open at once, all peers together; more are closed at once "
        "(nothing is written to them) with a log line. 0: no limit.",
        _count,
    ],
    [
        "max-connections-per-peer",
        None,
        64,
        "Connections open at once from one address (a multifd migration uses 1 + "
        "multifd-channels). 0: no limit.",
        _count,
    ],
    [
        "max-sessions",
        None,
        8,
        "Migrations recorded at once (proxy: by --record); channels of a further one "
        "are refused. 0: no limit.",
        _count,
    ],
    [
        "min-free-space",
        None,
        "1G",
        "Free space to keep on the output filesystem (bytes, or with K/M/G/T): below it "
        "no session starts, and running ones are stopped and filed incomplete "
        "('disk nearly full'). Checked at each session start and every 5 s. 0: no check.",
        _size,
    ],
    [
        "min-rate",
        None,
        "1K",
        "Bytes per second a session (all its channels) must average over each minute, or "
        "it is stopped and filed incomplete: a source trickling a byte a second cannot "
        "hold a session slot. A real migration sends far more. 0: no minimum.",
        _size,
    ],
    [
        "workers",
        None,
        8,
        "Worker threads for the service's disk writes, hashing and connects.",
        _positive,
    ],
    [
        "max-queued-jobs",
        None,
        1024,
        "Jobs that may wait for a worker thread; beyond that work is refused with an "
        "error (the session it belongs to is filed incomplete) instead of queued "
        "without end. 0: no limit.",
        _count,
    ],
]

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
            None,
            "Deprecated: seconds a connection may take to send its migration magic, "
            "overriding --handshake-timeout for that step only.",
            _seconds,
        ],
        *_TLS_PARAMETERS,
        *_LIMIT_PARAMETERS,
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
        *_LIMIT_PARAMETERS,
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
    """Starts TLS credential loads and the target; on stop, ends what is in flight.

    At start the target (recorder or proxy) takes its output directory and
    files what a killed predecessor left there (``.incoming-*`` sessions, as
    incomplete); failing that (another recorder holds the directory) stops
    the process with a critical log line.  At stop (SIGTERM) the target
    closes every open session as incomplete before the reactor stops.
    """

    log = Logger()

    def __init__(self, what: str, target: Any, upgrades: list[Any], reactor: Any) -> None:
        self.what = what
        self.target = target
        self.upgrades = upgrades
        self.reactor = reactor

    def startService(self) -> None:
        super().startService()
        for up in self.upgrades:
            up.start().addErrback(self._fatal, "cannot load TLS credentials")
        self.target.start().addErrback(self._fatal, "cannot start")
        # Logged once the reactor runs (and twistd's signal handlers are in place).
        self.reactor.callWhenRunning(self.log.info, "qio {what}", what=self.what)

    def _fatal(self, failure: Any, what: str) -> None:
        self.log.critical("{what}: {error}", what=what, error=failure.value)
        from twisted.internet.error import ReactorNotRunning

        try:
            self.reactor.stop()
        except ReactorNotRunning:
            pass  # already stopping

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        result: Deferred[None] = self.target.stop()
        return result


def _limits(opts: usage.Options) -> Any:
    from .migration.limits import Limits

    return Limits(
        handshake_timeout=opts["handshake-timeout"],
        idle_timeout=opts["idle-timeout"],
        max_connections=opts["max-connections"],
        max_connections_per_peer=opts["max-connections-per-peer"],
        max_sessions=opts["max-sessions"],
        min_free_space=opts["min-free-space"],
        min_rate=opts["min-rate"],
    )


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
        handshake_timeout=opts["handshake-timeout"] or None,
        reactor=reactor,
    )


def makeService(options: Options) -> service.IService:
    # Imported here, not at module level: twistd imports this module while
    # parsing options, before --reactor has installed the reactor.
    from twisted.internet import reactor

    from ._pool import ThreadWorkerPool
    from .listener import NetListener, NetListenerService
    from .migration.recorder import Recorder

    sub = options.subOptions
    command = options.subCommand or "record"
    if sub is None:
        sub = RecordOptions()
        sub.parseOptions([])
    top = service.MultiService()
    limits = _limits(sub)
    # One bounded pool for the service's disk, hashing and connect work: a
    # flood of work is refused (WorkerPoolFullError) rather than queued without end.
    pool = ThreadWorkerPool(reactor, size=sub["workers"], max_queued=sub["max-queued-jobs"] or None)
    server_tls = _server_tls(sub, reactor)
    upgrades = [u for u in [server_tls] if u is not None]
    if command == "record":
        target: Any = Recorder(
            Path(sub["output"]),
            classify_timeout=sub["classify-timeout"],
            tls=server_tls,
            limits=limits,
            pool=pool,
        )
        what = f"record ready: sessions go to {target.output}"
    else:
        from dataclasses import replace

        from .migration._tlsup import TLSUpgrade
        from .migration.proxy import Proxy

        client_tls = None
        if sub["to-tls-creds"]:
            from .migration.replay import _host_of

            client_tls = TLSUpgrade(
                Path(sub["to-tls-creds"]),
                endpoint="client",
                hostname=sub["to-tls-hostname"] or _host_of(sub["to"]),
                handshake_timeout=sub["handshake-timeout"] or None,
                reactor=reactor,
            )
            upgrades.append(client_tls)
        recorder = None
        if sub["record"]:
            # The proxy admits connections; its tap sees each one once more.
            tap_limits = replace(limits, max_connections=0, max_connections_per_peer=0)
            recorder = Recorder(Path(sub["record"]), limits=tap_limits, pool=pool)
        target = Proxy(
            sub["to"],
            server_tls=server_tls,
            client_tls=client_tls,
            recorder=recorder,
            limits=limits,
            pool=pool,
        )
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
