"""TLSChannel: QEMU's QIOChannelTLS over any channel, with pyOpenSSL memory BIOs.

A :class:`TLSChannel` wraps a *master* channel (a socket, an in-memory pair, a
command, another TLS channel...) and speaks TLS over it through the master's
non-blocking primitives (``read_nowait``/``write_nowait``), a pending
``read()`` and ``wait(OUT)``; the master belongs to the TLS channel from then
on.  The TLS engine is the sans-IO :class:`~qiotwisted.channel._tlspump.TLSPump`; this
module only moves bytes between it and the master and decides when.

Life of a channel, as in QEMU::

    tls = TLSChannel.new_server(sock, creds, authz)    # or new_client(sock, creds, "host")
    await tls.handshake()                              # a Task; func/opaque/destroy also work
    data = await tls.read(65536)                       # any Channel method from here on
    await tls.bye()                                    # close_notify (optional)
    await tls.close()                                  # closes the master too

QEMU's rules, kept here:

* The handshake is a :class:`~qiotwisted.task.Task` whose source is the TLS
  channel.  It is driven by readiness of the master (no thread) and completes
  in the reactor thread, possibly inside :meth:`TLSChannel.handshake` when it
  fails at once.  After the TLS handshake the credentials are checked
  (``qcrypto_tls_session_check_credentials``): with ``verify-peer`` a server
  requires a client certificate signed by its CA and asks its *authz* about
  the client's DN (``TLS x509 authz check for C=UK,CN=qemu is denied``); a
  client checks the server's certificate against *hostname* (``Certificate
  does not match the hostname NAME``).  Certificate failures use QEMU's
  words: "The certificate has expired", "The certificate is not yet
  activated", "The certificate hasn't got a known issuer", "The certificate
  is not trusted".  A failed handshake makes every later read and write
  raise its error, so a refused peer's bytes are never delivered.  With
  TLS 1.3 a client's handshake completes before the server has checked the
  client's certificate (as with GnuTLS): a refusal reaches the client as an
  alert on its first read.
* Not in QEMU: a handshake timeout (default :data:`DEFAULT_HANDSHAKE_TIMEOUT`,
  ``handshake_timeout=`` on the constructors or ``timeout=`` on
  :meth:`~TLSChannel.handshake`; ``None`` disables it).  A peer that stalls
  fails the task with "TLS handshake timed out after N s".  (QEMU 7.2 waits
  forever: ``qemu-interop.md`` trap 12.)
* Reads and writes before the handshake has completed wait for it; before it
  has *started* they raise.
* A read after the peer closed the transport without close_notify
  (``PREMATURE_TERMINATION``) is end-of-file when :attr:`TLSChannel.relaxed_eof`
  is true (the default: QEMU 7.2 never sends close_notify, trap 2) or the read
  side was shut down, else :class:`~qiotwisted.errors.ChannelError` "Cannot
  read from TLS channel: The TLS connection was non-properly terminated."
* :meth:`~TLSChannel.bye` sends close_notify (``qio_channel_tls_bye``) as a
  Task; :meth:`~Channel.shutdown` records the direction(s) and shuts the
  master; :meth:`~Channel.close` closes the master (no close_notify, as QEMU).

Readiness and memory.  ``IN`` holds while decrypted or not-yet-decrypted
records are buffered (``Connection.pending()`` and whole records still in the
memory BIO) or the master is readable; ``OUT`` holds when no ciphertext is
waiting for the master and the master is writable.  Ciphertext is pulled from
the master only when OpenSSL needs more to make progress (a pending
``master.read()``, so a socket master hands each chunk over directly), so the
input side holds at most one master chunk beyond what the master itself
buffers, and the master's own high-water mark keeps applying.  A write
encrypts at most :data:`MAX_WRITE` bytes, and only when the master can take
data; ciphertext the master refuses is kept in a single buffer that is
flushed as soon as the master is writable (even if nobody writes again), and
no plaintext is accepted until it has gone.  A read returns what has been
decrypted up to the size asked for, joined into one ``bytes``.

TLS versions: the creds' ``priority`` (see :func:`qiotwisted.crypto.parse_priority`)
decides, with TLS 1.2 as the floor.  **Session tickets** (``qemu-interop.md``
trap 1): a TLS 1.3 server sends two NewSessionTicket messages right after the
handshake even with ``OP_NO_TICKET`` (measured: OpenSSL's default
``num_tickets`` is 2 and pyOpenSSL 26 cannot change it), and a QEMU 7.2
source that never reads its socket then loses the end of its stream.  A
server that receives from QEMU 7.2 must therefore use credentials loaded with
``priority=PRIORITY_QEMU_RECEIVER`` (TLS 1.2 only), which writes nothing after
its Finished; ``tests/test_channel_tls.py`` counts the NewSessionTicket
messages a stdlib client receives from both kinds of server.

Trace events (QEMU's names, debug level, with ``thread_id``), gated like the
task events (:func:`qiotwisted.task.set_trace_enabled`, ``QIOTWISTED_TRACE``):
``qio_channel_tls_new_server``, ``_new_client``, ``_handshake_start``,
``_handshake_pending``, ``_handshake_complete``, ``_handshake_fail``,
``_handshake_cancel``, ``_credentials_allow``, ``_credentials_deny``,
``_bye_start``, ``_bye_pending``, ``_bye_complete``, ``_bye_fail``,
``_bye_cancel``.

Thread contract: reactor thread only, like every channel; handshake and bye
completion functions run in the reactor thread.
"""

from __future__ import annotations

import enum
import threading
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from time import perf_counter
from typing import Any, Final

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from ..crypto import Authz, TLSCreds, check_hostname, dn_string
from ..errors import ChannelError, QIOError
from ..task import Task, trace_enabled
from ._base import (
    _CONDITIONS,
    WOULD_BLOCK,
    Buffer,
    Channel,
    Condition,
    Feature,
    Shutdown,
    WouldBlock,
)
from ._tlspump import MAX_RECORD, EOFKind, TLSError, TLSPump, VerifyFailure
from .socket import SocketChannel

__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "MAX_WRITE",
    "TURN_BYTES",
    "TLSChannel",
    "TLSHandshakeError",
]

DEFAULT_HANDSHAKE_TIMEOUT: Final = 10.0
#: Plaintext bytes one write encrypts at most: sixteen full records.  It bounds
#: the one ciphertext buffer a TLS channel keeps when its master is full.
MAX_WRITE: Final = 256 * 1024
#: Ciphertext one reactor turn takes in per TLS channel: the master's read
#: size and, for a socket master, its ``read_burst``.  Decryption runs in the
#: reactor thread: about 1 ms per MiB on an idle core here, 3 ms while a
#: migration's source shares the two cores.  At 1 MiB, four busy channels
#: served in one poll iteration held a 10 ms timer back by 20-40 ms; 256 KiB
#: keeps a channel's turn near 1 ms at the same throughput
#: (``benchmarks/load_latency.py --attribute``).
TURN_BYTES: Final = 256 * 1024
_FEED: Final = TURN_BYTES
#: Handshake work (public-key crypto: about 1 ms per server handshake here)
#: one reactor turn does before further handshake steps wait for the next
#: turn, first come first served.  A burst of 100 ClientHellos then costs
#: the reactor a few ms per turn instead of 20-30 ms in one.
HANDSHAKE_TURN_BUDGET: Final = 0.002
#: Bounds on the inner loops; each iteration moves data, so these are never
#: reached unless a master misbehaves (then work continues on the next turn).
_MAX_FEEDS: Final = 256
_MAX_STEPS: Final = 64
_MAX_FLUSHES: Final = 64

_IN, _OUT, _ERR, _HUP = (
    int(c) for c in (Condition.IN, Condition.OUT, Condition.ERR, Condition.HUP)
)
_IN_HUP_ERR: Final = _IN | _HUP | _ERR
#: More than a record adds to its plaintext (TLS 1.2 GCM: 29 bytes, 1.3: 22;
#: CBC-SHA384 with padding: under 70): sizes the ciphertext read in one go.
_RECORD_OVERHEAD: Final = 96
_SHUT_RD: Final = int(Shutdown.READ)
_SHUT_WR: Final = int(Shutdown.WRITE)

_PREMATURE: Final = "The TLS connection was non-properly terminated."

# OpenSSL X509_V_ERR_* codes (stable numbers) -> QEMU's reason and OpenSSL's own words.
_VERIFY_REASONS: Final = {
    2: ("The certificate hasn't got a known issuer", "unable to get issuer certificate"),
    7: ("The certificate is not trusted", "certificate signature failure"),
    9: ("The certificate is not yet activated", "certificate is not yet valid"),
    10: ("The certificate has expired", "certificate has expired"),
    18: ("The certificate hasn't got a known issuer", "self-signed certificate"),
    19: ("The certificate hasn't got a known issuer", "self-signed certificate in chain"),
    20: (
        "The certificate hasn't got a known issuer",
        "unable to get local issuer certificate",
    ),
    21: ("The certificate hasn't got a known issuer", "unable to verify the first certificate"),
    23: ("The certificate has been revoked", "certificate revoked"),
    24: ("The certificate is not trusted", "invalid CA certificate"),
    26: ("The certificate is not trusted", "unsuitable certificate purpose"),
    27: ("The certificate is not trusted", "certificate not trusted"),
    28: ("The certificate is not trusted", "certificate rejected"),
}


class TLSHandshakeError(ChannelError):
    """The TLS handshake or the credentials check after it failed (QEMU's message)."""


class _Unset(enum.Enum):
    """Marker: "use the channel's ``handshake_timeout``"."""

    UNSET = "unset"


_UNSET: Final = _Unset.UNSET


class _State(enum.Enum):
    NEW = "new"  # constructed; handshake() not called yet
    HANDSHAKING = "handshaking"
    OPEN = "open"  # handshake and credentials check passed
    FAILED = "failed"  # the handshake failed; I/O raises its error


class _Status(enum.IntEnum):
    """``QCryptoTLSSessionHandshakeStatus`` / ``...ByeStatus``, for the traces."""

    COMPLETE = 0
    SENDING = 1
    RECVING = 2


def _verify_message(failure: VerifyFailure) -> str:
    reason, words = _VERIFY_REASONS.get(
        failure.errnum, ("The certificate is not trusted", f"X509 error {failure.errnum}")
    )
    return f"{reason} ({words}: {failure.subject}, depth {failure.depth})"


class TLSChannel(Channel):
    """A TLS session over a master channel (``QIOChannelTLS``).  See the module docstring.

    Build one with :meth:`new_server` or :meth:`new_client`, then call
    :meth:`handshake`.  The master belongs to the TLS channel from then on:
    do not read, write or wait on it directly.

    :attr:`relaxed_eof` may be changed at any time.
    """

    def __init__(
        self,
        master: Channel,
        creds: TLSCreds,
        *,
        server: bool,
        hostname: str | None = None,
        authz: Authz | None = None,
        handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
        relaxed_eof: bool = True,
        reactor: IReactorTime | None = None,
        name: str | None = None,
    ) -> None:
        """Use :meth:`new_server` / :meth:`new_client`, which check the credentials' endpoint."""
        super().__init__(reactor=reactor if reactor is not None else master._reactor_arg, name=name)
        self.master = master
        if isinstance(master, SocketChannel) and master.read_burst > TURN_BYTES:
            master.read_burst = TURN_BYTES
        self.creds = creds
        self.hostname = hostname
        self.authz = authz
        self.is_server = server
        self.handshake_timeout = handshake_timeout
        self.relaxed_eof = relaxed_eof
        if master.has_feature(Feature.SHUTDOWN):
            self.features = Feature.SHUTDOWN
        self._pump = TLSPump(creds.context, server=server, server_name=hostname)
        self._state = _State.NEW
        self._error: ChannelError | None = None  # why the handshake failed
        self._read_error: ChannelError | None = None  # sticky: a fatal alert or bad record
        self._write_error: ChannelError | None = None  # sticky: the master refused ciphertext
        self._feed_error: BaseException | None = None  # reading ciphertext from the master failed
        # Ciphertext the master has not taken yet (at most one buffer).
        self._out: bytes | memoryview | None = None
        # The pending master.read() (a Deferred), the pending master.wait(OUT)
        # (a Deferred, or a DelayedCall when the master was writable at once),
        # and a wake-up put on the next reactor turn.
        self._rd_wait: Deferred[bytes] | None = None
        self._wr_wait: Any = None
        self._kick_call: Any = None
        self._hs_task: Task[TLSChannel] | None = None
        self._hs_timer: Any = None
        self._hs_call: Any = None
        self._hs_queued = False  # waiting in _HandshakeTurns for a reactor turn
        self._bye_task: Task[None] | None = None
        self._bye_started = False
        # Shutdown bits as plain ints: tested on every read and write, and
        # IntFlag arithmetic builds a new enum member each time.
        self._shut = 0
        self._master_shut_pending = 0

    # ---- constructors -----------------------------------------------------------------

    @classmethod
    def new_server(
        cls,
        master: Channel,
        creds: TLSCreds,
        authz: Authz | None = None,
        *,
        handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
        relaxed_eof: bool = True,
        reactor: IReactorTime | None = None,
        name: str | None = None,
    ) -> TLSChannel:
        """``qio_channel_tls_new_server``: the server end of TLS over *master*.

        *creds* must be server credentials.  With ``creds.verify_peer`` (the
        default) the client must present a certificate from one of our CAs,
        and *authz*, if given, must allow its DN (QEMU's ``tls-authz``;
        ``None``: any client the CA vouches for).  Raises :class:`ChannelError`
        for client credentials.
        """
        _check_endpoint(creds, server=True)
        tls = cls(
            master,
            creds,
            server=True,
            authz=authz,
            handshake_timeout=handshake_timeout,
            relaxed_eof=relaxed_eof,
            reactor=reactor,
            name=name,
        )
        tls._trace(
            "qio_channel_tls_new_server",
            "qio_channel_tls_new_server ioc={ioc!r} master={master!r} creds={creds!r} "
            "authz={authz!r}",
            master=master,
            creds=creds,
            authz=authz,
        )
        return tls

    @classmethod
    def new_client(
        cls,
        master: Channel,
        creds: TLSCreds,
        hostname: str | None,
        *,
        handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
        relaxed_eof: bool = True,
        reactor: IReactorTime | None = None,
        name: str | None = None,
    ) -> TLSChannel:
        """``qio_channel_tls_new_client``: the client end of TLS over *master*.

        *creds* must be client credentials.  With ``creds.verify_peer`` the
        server's certificate must chain to one of our CAs and match
        *hostname* (a DNS name or an IP literal); a ``None`` hostname then
        fails the handshake ("No hostname for certificate validation"), as
        in QEMU.  A DNS name is also sent as SNI.
        """
        _check_endpoint(creds, server=False)
        tls = cls(
            master,
            creds,
            server=False,
            hostname=hostname,
            handshake_timeout=handshake_timeout,
            relaxed_eof=relaxed_eof,
            reactor=reactor,
            name=name,
        )
        tls._trace(
            "qio_channel_tls_new_client",
            "qio_channel_tls_new_client ioc={ioc!r} master={master!r} creds={creds!r} "
            "hostname={hostname}",
            master=master,
            creds=creds,
            hostname=hostname,
        )
        return tls

    # ---- session information -------------------------------------------------------------

    @property
    def handshake_complete(self) -> bool:
        """True once the handshake and the credentials check have passed."""
        return self._state is _State.OPEN

    @property
    def protocol_version(self) -> str:
        """The negotiated version, e.g. ``"TLSv1.3"``."""
        return self._pump.protocol_version

    @property
    def cipher(self) -> str | None:
        return self._pump.cipher

    def get_peer_certificate(self) -> Any:
        """The peer's certificate (``cryptography.x509.Certificate``), or ``None``."""
        return self._pump.peer_certificate()

    def get_peer_dn(self) -> str | None:
        """The peer certificate's DN as QEMU's authz sees it (e.g. ``C=UK,CN=qemu``)."""
        cert = self._pump.peer_certificate()
        return None if cert is None else dn_string(cert)

    @property
    def buffered_output(self) -> int:
        """Ciphertext accepted but not yet taken by the master (at most about one write's worth)."""
        return 0 if self._out is None else len(self._out)

    @property
    def ssl_connection(self) -> Any:
        """The pyOpenSSL ``Connection`` (QEMU's ``qio_channel_tls_get_session``); read-only use."""
        return self._pump.connection

    # ---- handshake (qio_channel_tls_handshake) -----------------------------------------

    def handshake(
        self,
        func: Callable[[Task[Any], Any], object] | None = None,
        opaque: Any = None,
        destroy: Callable[[Any], object] | None = None,
        *,
        timeout: float | _Unset | None = _UNSET,
    ) -> Task[TLSChannel]:
        """Start the handshake; return its Task (source: this channel).

        ``func(task, opaque)`` runs in the reactor thread when the handshake
        and the credentials check are over (``task.propagate_error()`` tells
        how); ``destroy(opaque)`` after it.  ``await task`` (or
        ``task.deferred``) gives this channel or raises
        :class:`TLSHandshakeError`.  Like QEMU's, the completion may run
        inside this call when the handshake fails at once.  *timeout*
        (seconds, ``None`` = never) overrides the channel's
        ``handshake_timeout``.  Cancelling the task stops the handshake; the
        channel then fails every I/O.  Call it once.
        """
        if self._state is not _State.NEW:
            raise ChannelError("TLS handshake already started on this channel")
        self._check_open()
        limit = self.handshake_timeout if isinstance(timeout, _Unset) else timeout
        task: Task[TLSChannel] = Task(
            self, self._handshake_done, (func, opaque), _destroy_pair(destroy)
        )
        self._hs_task = task
        self._state = _State.HANDSHAKING
        self._trace(
            "qio_channel_tls_handshake_start", "qio_channel_tls_handshake_start ioc={ioc!r}"
        )
        if limit is not None:
            self._hs_timer = self.reactor.callLater(limit, self._handshake_timed_out, limit)
        if (
            self.is_server
            and not int(self.master.condition()) & _IN_HUP_ERR
            and not self._arm_read()
        ):
            # A server speaks second: nothing to do until the ClientHello comes.
            self._trace_pending(_Status.RECVING)
        else:
            _handshake_turns(self.reactor).step(self)
        return task

    def _handshake_step(self) -> None:
        self._hs_call = None
        if self._state is not _State.HANDSHAKING or self._closed:
            return
        pump = self._pump
        try:
            for _ in range(_MAX_STEPS):
                if not self._flush_out():
                    self._trace_pending(_Status.SENDING)
                    return
                done = pump.handshake()
                out = pump.take_output()
                if out:
                    self._queue_out(out)
                if done:
                    if not self._flush_out():
                        self._trace_pending(_Status.SENDING)
                        return
                    self._handshake_finished()
                    return
                if self._feed():
                    continue
                if not self._flush_out():
                    self._trace_pending(_Status.SENDING)
                    return
                if self._arm_read():
                    continue  # the master had something after all
                self._trace_pending(_Status.RECVING)
                return
        except TLSError as exc:
            self._handshake_failed(self._translate_handshake_error(exc), send_alert=True)
            return
        except ChannelError as exc:
            self._handshake_failed(TLSHandshakeError(f"TLS handshake failed: {exc}"))
            return
        # Much data arrived at once: go on next turn rather than hog the reactor.
        self._hs_call = self.reactor.callLater(0, self._handshake_step)

    def _translate_handshake_error(self, exc: TLSError) -> TLSHandshakeError:
        failure = self._pump.verify_failure
        if failure is not None:
            return TLSHandshakeError(_verify_message(failure))
        reason = str(exc)
        if "peer did not return a certificate" in reason:
            return TLSHandshakeError(
                f"No certificate peers: the client sent no certificate and verify-peer "
                f"requires one (TLS handshake failed: {reason})"
            )
        return TLSHandshakeError(f"TLS handshake failed: {reason}")

    def _handshake_finished(self) -> None:
        self._trace(
            "qio_channel_tls_handshake_complete", "qio_channel_tls_handshake_complete ioc={ioc!r}"
        )
        try:
            self._check_credentials()
        except QIOError as exc:
            self._trace(
                "qio_channel_tls_credentials_deny", "qio_channel_tls_credentials_deny ioc={ioc!r}"
            )
            self._handshake_failed(TLSHandshakeError(str(exc)), traced=True)
            return
        self._trace(
            "qio_channel_tls_credentials_allow", "qio_channel_tls_credentials_allow ioc={ioc!r}"
        )
        self._state = _State.OPEN
        task = self._hs_task
        self._hs_cleanup()
        if task is not None and not task.completed:
            task.set_result(self)
            task.complete()
        # Application records may have come with the last handshake flight.
        self._ready_changed()

    def _check_credentials(self) -> None:
        """``qcrypto_tls_session_check_credentials`` for x509 (OpenSSL verified the chain)."""
        if not self.creds.verify_peer:
            return
        if self.is_server:
            # OpenSSL already refused a client without a certificate
            # (VERIFY_FAIL_IF_NO_PEER_CERT) or with an untrusted one; only
            # authz needs to look at it (fetching it costs a DER round trip).
            if self.authz is not None:
                self.authz.require(dn_string(self._peer_certificate()))
        elif self.hostname:
            check_hostname(self._peer_certificate(), self.hostname)
        else:
            raise ChannelError("No hostname for certificate validation")

    def _peer_certificate(self) -> Any:
        cert = self._pump.peer_certificate()
        if cert is None:
            raise ChannelError("No certificate peers")
        return cert

    def _handshake_failed(
        self, error: TLSHandshakeError, *, send_alert: bool = False, traced: bool = False
    ) -> None:
        if send_alert:
            # Tell the peer why (OpenSSL queued an alert); best effort only.
            try:
                out = self._pump.take_output()
                if out:
                    self._queue_out(out)
                self._flush_out(arm=False)
            except (ChannelError, TLSError):
                pass
            self._out = None
        if not traced:
            self._trace(
                "qio_channel_tls_handshake_fail",
                "qio_channel_tls_handshake_fail ioc={ioc!r} error={error}",
                error=str(error),
            )
        self._state = _State.FAILED
        self._error = error
        task = self._hs_task
        self._hs_cleanup()
        self._cancel_master_waits()
        if task is not None and not task.completed:
            task.set_error(error)
            task.complete()
        self._ready_changed()

    def _handshake_timed_out(self, limit: float) -> None:
        self._hs_timer = None
        if self._state is _State.HANDSHAKING:
            self._handshake_failed(TLSHandshakeError(f"TLS handshake timed out after {limit:g} s"))

    def _handshake_done(self, task: Task[Any], data: tuple[Any, Any]) -> None:
        """The Task's completion function: tidy up, then the user's func (reactor thread)."""
        if self._state is _State.HANDSHAKING:
            # Completed from outside: the task (or its Deferred) was cancelled.
            self._trace(
                "qio_channel_tls_handshake_cancel", "qio_channel_tls_handshake_cancel ioc={ioc!r}"
            )
            self._state = _State.FAILED
            self._error = TLSHandshakeError("TLS handshake was cancelled")
            self._hs_cleanup()
            self._cancel_master_waits()
            self._ready_changed()
        self._hs_task = None
        func, opaque = data
        if func is not None:
            func(task, opaque)

    def _hs_cleanup(self) -> None:
        timer, self._hs_timer = self._hs_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        call, self._hs_call = self._hs_call, None
        if call is not None and call.active():
            call.cancel()

    def _trace_pending(self, status: _Status) -> None:
        self._trace(
            "qio_channel_tls_handshake_pending",
            "qio_channel_tls_handshake_pending ioc={ioc!r} status={status}",
            status=int(status),
        )

    # ---- bye (qio_channel_tls_bye) ---------------------------------------------------------

    def bye(
        self,
        func: Callable[[Task[Any], Any], object] | None = None,
        opaque: Any = None,
        destroy: Callable[[Any], object] | None = None,
    ) -> Task[None]:
        """Send close_notify; return the Task that completes once it has left.

        Runs in the background like QEMU's: the completion (reactor thread)
        may run inside this call when the master takes the alert at once.
        After it, writes raise; reads still work until the peer's end.
        Fails (the task) before a completed handshake.
        """
        task: Task[None] = Task(self, func, opaque, destroy)
        self._trace("qio_channel_tls_bye_start", "qio_channel_tls_bye_start ioc={ioc!r}")
        try:
            self._check_open()
            if self._state is not _State.OPEN:
                raise ChannelError("Cannot terminate TLS session: the handshake has not completed")
            if self._bye_started:
                raise ChannelError("Cannot terminate TLS session: bye already sent")
            self._bye_started = True
            self._pump.close_notify()
            self._queue_out(self._pump.take_output())
            flushed = self._flush_out()
        except (ChannelError, TLSError) as exc:
            self._bye_fail(task, exc)
            return task
        if flushed:
            self._trace("qio_channel_tls_bye_complete", "qio_channel_tls_bye_complete ioc={ioc!r}")
            task.complete()
        else:
            self._trace(
                "qio_channel_tls_bye_pending",
                "qio_channel_tls_bye_pending ioc={ioc!r} status={status}",
                status=int(_Status.SENDING),
            )
            self._bye_task = task
        return task

    def _bye_fail(self, task: Task[None], exc: BaseException) -> None:
        message = str(exc)
        if not isinstance(exc, ChannelError):
            message = f"Cannot terminate TLS session: {message}"
        self._trace(
            "qio_channel_tls_bye_fail", "qio_channel_tls_bye_fail ioc={ioc!r} error={error}",
            error=message,
        )  # fmt: skip
        task.set_error(ChannelError(message))
        task.complete()

    def _bye_progress(self) -> None:
        task = self._bye_task
        if task is None:
            return
        if self._write_error is not None:
            self._bye_task = None
            self._bye_fail(task, self._write_error)
        elif self._out is None:
            self._bye_task = None
            self._trace("qio_channel_tls_bye_complete", "qio_channel_tls_bye_complete ioc={ioc!r}")
            task.complete()

    # ---- the Channel contract ---------------------------------------------------------------

    def _io_read(self, nbytes: int, *, peek: bool = False) -> bytes | WouldBlock:
        if self._state is not _State.OPEN:
            return self._not_open("read")
        if self._read_error is not None:
            raise self._read_error
        pump = self._pump
        parts: list[bytes] = []
        got = 0
        try:
            for _ in range(_MAX_FEEDS):
                if not pump.needs_input or pump.eof_fed:
                    got += pump.decrypt(parts, nbytes - got)
                    if got >= nbytes or pump.eof is not None:
                        break
                # Whoever gets WOULD_BLOCK will wait: arm the master so it
                # wakes us (unless it answers at once; returning data needs no arm).
                if not self._feed() and (got or not self._arm_read()):
                    break
            else:
                # The master keeps trickling partial records: go on next turn.
                self._kick()
        except TLSError as exc:
            self._read_error = ChannelError(f"Cannot read from TLS channel: {exc}")
            self._flush_quietly()  # the alert OpenSSL may have queued
            if parts:
                return b"".join(parts)  # the error surfaces on the next read
            raise self._read_error from None
        except ChannelError as exc:
            if parts:
                return b"".join(parts)
            raise ChannelError(f"Cannot read from TLS channel: {exc}") from exc
        if got:
            return parts[0] if len(parts) == 1 else b"".join(parts)
        eof = pump.eof
        if eof is None:
            return WOULD_BLOCK
        if eof is EOFKind.CLEAN or self.relaxed_eof or self._shut & _SHUT_RD:
            return b""
        raise ChannelError(f"Cannot read from TLS channel: {_PREMATURE}")

    def _feed(self) -> bool:
        """Move one chunk of ciphertext from the master into the pump; False if none.

        Raises the master's :class:`ChannelError`, also one that a background
        read (:meth:`_arm_read`) met.
        """
        pump = self._pump
        if pump.eof_fed:
            return False
        if self._feed_error is not None:
            err = self._feed_error
            raise err if isinstance(err, ChannelError) else ChannelError(str(err))
        data = self.master.read_nowait(_FEED)
        if data is WOULD_BLOCK:
            return False
        pump.feed(data)
        return True

    def _io_write(self, chunks: Sequence[Buffer], fds: Sequence[int]) -> int | WouldBlock:
        if self._state is not _State.OPEN:
            return self._not_open("write")
        if self._write_error is not None:
            raise self._write_error
        if self._bye_started:
            raise ChannelError("Cannot write to TLS channel: the session was terminated (bye)")
        if self._shut & _SHUT_WR:
            raise ChannelError("Cannot write to TLS channel: Broken pipe")
        if self._out is not None and not self._flush_out():
            return WOULD_BLOCK
        # Encrypt only what the master can take now: plaintext accepted while
        # the master is full would pile up here as ciphertext.
        if not int(self.master.condition()) & _OUT:
            self._arm_write()
            return WOULD_BLOCK
        pump = self._pump
        try:
            n = pump.encrypt_chunks(chunks, MAX_WRITE)
            data = pump.take_output(n + _RECORD_OVERHEAD * (n // MAX_RECORD + 1))
        except TLSError as exc:
            self._write_error = ChannelError(f"Cannot write to TLS channel: {exc}")
            raise self._write_error from None
        self._queue_out(data)
        self._flush_out()
        return n

    def _not_open(self, what: str) -> WouldBlock:
        if self._state is _State.HANDSHAKING:
            return WOULD_BLOCK  # woken by _ready_changed() when it ends
        where = "from" if what == "read" else "to"
        if self._state is _State.NEW:
            raise ChannelError(
                f"Cannot {what} {where} TLS channel: the handshake has not been started"
            )
        raise ChannelError(f"Cannot {what} {where} TLS channel: {self._error}")

    def _io_condition(self) -> Condition:
        state = self._state
        if state is not _State.OPEN:
            if state is _State.HANDSHAKING:
                return _CONDITIONS[0]  # the handshake drives the master meanwhile
            return _CONDITIONS[_IN | _OUT | _ERR]  # I/O raises: let waiters find out
        master = self.master
        mcond = int(master.condition())
        pump = self._pump
        bits = mcond & (_HUP | _ERR)
        if (
            mcond & _IN_HUP_ERR
            or not pump.needs_input
            or pump.eof_fed
            or self._read_error is not None
            or self._feed_error is not None
            # Somebody is asking whether to wait: make sure we learn when the
            # master has ciphertext (a no-op if a read is pending already).
            or self._arm_read()
        ):
            bits |= _IN
        if (
            self._write_error is not None
            or self._bye_started
            or self._shut & _SHUT_WR
            or (self._out is None and mcond & _OUT)
        ):
            bits |= _OUT
        else:
            self._arm_write()
        return _CONDITIONS[bits]

    def _io_shutdown(self, how: Shutdown) -> None:
        self._shut |= int(how)
        master_how = int(how)
        if master_how & _SHUT_WR and self._out is not None:
            # Shut the master's write side only once our ciphertext has left.
            self._master_shut_pending |= _SHUT_WR
            master_how &= ~_SHUT_WR
        if master_how:
            self.master.shutdown(Shutdown(master_how))

    def _io_set_delay(self, enabled: bool) -> None:
        self.master.set_delay(enabled)

    def _io_set_cork(self, enabled: bool) -> None:
        self.master.set_cork(enabled)

    def _io_close(self) -> Deferred[None] | None:
        self._hs_cleanup()
        self._cancel_master_waits()
        if self._hs_task is not None and not self._hs_task.completed:
            self._trace(
                "qio_channel_tls_handshake_cancel", "qio_channel_tls_handshake_cancel ioc={ioc!r}"
            )
            self._state = _State.FAILED
            self._error = TLSHandshakeError("TLS handshake aborted: the channel was closed")
            task, self._hs_task = self._hs_task, None
            task.set_error(self._error)
            task.complete()
        if self._bye_task is not None:
            self._trace("qio_channel_tls_bye_cancel", "qio_channel_tls_bye_cancel ioc={ioc!r}")
            task2, self._bye_task = self._bye_task, None
            task2.set_error(ChannelError("Cannot terminate TLS session: the channel was closed"))
            task2.complete()
        if self._out is not None and not self.master.closed:
            return Deferred.fromCoroutine(self._flush_then_close())
        return self.master.close()

    async def _flush_then_close(self) -> None:
        """Close, after handing the master the ciphertext it could not take yet."""
        master = self.master
        for _ in range(1 << 16):  # bounded; each round waits for the master to drain
            try:
                if self._flush_out(arm=False):
                    break
                await master.wait(Condition.OUT)
            except ChannelError:
                break
        self._out = None
        await master.close()

    # ---- moving ciphertext ------------------------------------------------------------------

    def _queue_out(self, data: bytes) -> None:
        if not data:
            return
        out = self._out
        self._out = data if out is None else bytes(out) + data

    def _flush_out(self, *, arm: bool = True) -> bool:
        """Hand pending ciphertext to the master; True when none is left.

        Raises :class:`ChannelError` if the master fails (also kept in
        ``_write_error``).  When the master is full and *arm*, a wait for
        OUT is armed so the rest leaves as soon as it can, whoever writes next.
        """
        out = self._out
        if out is None:
            return True
        master = self.master
        try:
            for _ in range(_MAX_FLUSHES):
                n = master.write_nowait(out)
                if n is WOULD_BLOCK:
                    break
                if n >= len(out):
                    self._out = None
                    return True
                out = memoryview(out)[n:]
        except ChannelError as exc:
            self._out = None
            self._write_error = ChannelError(f"Cannot write to TLS channel: {exc}")
            raise self._write_error from exc
        self._out = out
        if arm:
            self._arm_write()
        return False

    def _flush_quietly(self) -> None:
        try:
            out = self._pump.take_output()
            if out:
                self._queue_out(out)
                self._flush_out()
        except (ChannelError, TLSError):
            pass  # kept in _write_error; the next write reports it

    # ---- waiting on the master ----------------------------------------------------------------

    def _arm_read(self) -> bool:
        """Ask the master for ciphertext in the background; True if it answered at once.

        A pending ``master.read()`` rather than a wait: a socket master hands
        a parked read its chunk directly, one Deferred per wake-up.  At most
        one read is pending, and one is armed only when OpenSSL needs more
        (someone got WOULD_BLOCK or asked whether to wait), so the pump holds
        at most one master chunk.  An immediate answer (data, EOF or an
        error) is fed or recorded here and no wake-up is sent: the caller is
        about to look again.
        """
        if (
            self._rd_wait is not None
            or self._closed
            or self._feed_error is not None
            or self._pump.eof_fed
        ):
            return False
        d = self.master.read(_FEED)
        if not d.called:
            self._rd_wait = d
            d.addCallbacks(self._on_master_data, self._on_master_read_failed)
            return False
        box: list[object] = []
        d.addBoth(box.append)
        outcome = box[0]
        if isinstance(outcome, Failure):
            self._feed_error = outcome.value
        else:
            assert isinstance(outcome, bytes)
            self._pump.feed(outcome)
        return True

    def _arm_write(self) -> None:
        if self._wr_wait is not None or self._closed or self._write_error is not None:
            return
        d = self.master.wait(Condition.OUT)
        if not d.called:
            self._wr_wait = d
            d.addCallbacks(self._on_master_writable, self._on_master_write_failed)
            return
        box: list[object] = []
        d.addBoth(box.append)
        if isinstance(box[0], Failure):
            self._write_error = ChannelError(f"Cannot write to TLS channel: {box[0].value}")
        else:
            # Writable at once: act on the next turn, never re-entrantly.
            self._wr_wait = self.reactor.callLater(0, self._on_master_writable, box[0])

    def _kick(self) -> None:
        """Re-check readiness on the next reactor turn."""
        if self._kick_call is None and not self._closed:
            self._kick_call = self.reactor.callLater(0, self._kicked)

    def _kicked(self) -> None:
        self._kick_call = None
        if not self._closed:
            self._ready_changed()

    def _cancel_master_waits(self) -> None:
        kick, self._kick_call = self._kick_call, None
        if kick is not None and kick.active():
            kick.cancel()
        rd, self._rd_wait = self._rd_wait, None
        if rd is not None:
            rd.cancel()
        wr, self._wr_wait = self._wr_wait, None
        if wr is not None and (isinstance(wr, Deferred) or wr.active()):
            wr.cancel()

    def _on_master_data(self, data: bytes) -> None:
        self._rd_wait = None
        if self._closed:
            return
        self._pump.feed(data)
        if self._state is _State.HANDSHAKING:
            _handshake_turns(self.reactor).step(self)
        else:
            self._ready_changed()

    def _on_master_read_failed(self, failure: Failure) -> None:
        if failure.check(CancelledError):
            return  # we cancelled it
        self._rd_wait = None
        if self._closed:
            return
        self._feed_error = failure.value
        if self._state is _State.HANDSHAKING:
            self._handshake_failed(
                TLSHandshakeError(f"TLS handshake failed: {failure.getErrorMessage()}")
            )
        else:
            self._ready_changed()

    def _on_master_writable(self, _: object) -> None:
        self._wr_wait = None
        if self._closed:
            return
        try:
            flushed = self._flush_out()
        except ChannelError as exc:
            if self._state is _State.HANDSHAKING:
                self._handshake_failed(TLSHandshakeError(f"TLS handshake failed: {exc}"))
                return
            flushed = False
        if self._state is _State.HANDSHAKING:
            _handshake_turns(self.reactor).step(self)
            return
        if flushed and self._master_shut_pending:
            how, self._master_shut_pending = self._master_shut_pending, 0
            try:
                self.master.shutdown(Shutdown(how))
            except ChannelError as exc:
                self.log.error(
                    "deferred shutdown of {master!r} failed: {error}", master=self.master,
                    error=str(exc),
                )  # fmt: skip
        self._bye_progress()
        self._ready_changed()

    def _on_master_write_failed(self, failure: Failure) -> None:
        if failure.check(CancelledError):
            return  # we cancelled it
        self._wr_wait = None
        if self._closed:
            return
        error = ChannelError(f"Cannot write to TLS channel: {failure.getErrorMessage()}")
        if self._state is _State.HANDSHAKING:
            self._handshake_failed(TLSHandshakeError(f"TLS handshake failed: {error}"))
            return
        if self._write_error is None:
            self._write_error = error
        self._bye_progress()
        self._ready_changed()

    # ---- tracing --------------------------------------------------------------------------------

    def _trace(self, event: str, fmt: str, **fields: Any) -> None:
        if trace_enabled():
            self.log.debug(fmt, event=event, ioc=self, thread_id=threading.get_ident(), **fields)


def _destroy_pair(
    destroy: Callable[[Any], object] | None,
) -> Callable[[tuple[Any, Any]], object] | None:
    if destroy is None:
        return None

    def destroy_opaque(data: tuple[Any, Any]) -> object:
        return destroy(data[1])

    return destroy_opaque


def _check_endpoint(creds: TLSCreds, *, server: bool) -> None:
    """``qcrypto_tls_creds_check_endpoint``."""
    if creds.is_server != server:
        want = "server" if server else "client"
        raise ChannelError(f"Expected TLS credentials for a {want} endpoint")


class _HandshakeTurns:
    """Runs one reactor's TLS handshake steps, at most :data:`HANDSHAKE_TURN_BUDGET` per turn.

    A step runs at once while the turn's budget lasts; after that it waits
    in a FIFO, and a ``callLater(0)`` starts a new turn (timers and I/O run
    in between) that spends a fresh budget on the queue.  One step is never
    split, so a turn may overrun the budget by one step.
    """

    def __init__(self, reactor: IReactorTime) -> None:
        self._reactor = reactor
        self._spent = 0.0
        self._queue: deque[TLSChannel] = deque()
        self._turn: Any = None

    def step(self, channel: TLSChannel) -> None:
        if self._queue or self._spent >= HANDSHAKE_TURN_BUDGET:
            if not channel._hs_queued:
                channel._hs_queued = True
                self._queue.append(channel)
            self._next_turn()
            return
        self._run(channel)

    def _run(self, channel: TLSChannel) -> None:
        t0 = perf_counter()
        try:
            channel._handshake_step()
        finally:
            self._spent += perf_counter() - t0
            self._next_turn()

    def _next_turn(self) -> None:
        if self._turn is None:
            self._turn = self._reactor.callLater(0, self._new_turn)

    def _new_turn(self) -> None:
        self._turn = None
        self._spent = 0.0
        queue = self._queue
        for _ in range(len(queue)):  # at least one step per turn, whatever the budget
            channel = queue.popleft()
            channel._hs_queued = False
            self._run(channel)
            if self._spent >= HANDSHAKE_TURN_BUDGET:
                break


_turns: weakref.WeakKeyDictionary[IReactorTime, _HandshakeTurns] = weakref.WeakKeyDictionary()


def _handshake_turns(reactor: IReactorTime) -> _HandshakeTurns:
    turns = _turns.get(reactor)
    if turns is None:
        turns = _turns[reactor] = _HandshakeTurns(reactor)
    return turns
