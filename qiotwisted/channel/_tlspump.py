"""The TLS record pump: a pyOpenSSL ``Connection`` over two memory BIOs, with no I/O.

:class:`TLSPump` is the sans-IO core of :class:`~qiotwisted.channel.tls.TLSChannel`
(the role ``crypto/tlssession.c`` plays for QEMU's ``QIOChannelTLS``).  The caller
owns the transport, the scheduling and the time:

* ciphertext in: :meth:`TLSPump.feed` (``b""`` means the transport reached
  end-of-file, and nothing may be fed after it);
* ciphertext out: :meth:`TLSPump.take_output` (``b""``: nothing to send);
* :meth:`TLSPump.handshake` drives the handshake: True once complete, False
  when it needs more ciphertext (send :meth:`take_output` first, always);
* :meth:`TLSPump.decrypt` appends plaintext records to a list, up to a byte
  count, and says why it stopped (:attr:`TLSPump.needs_input`,
  :attr:`TLSPump.eof`); :meth:`TLSPump.encrypt` turns plaintext into records;
* :meth:`TLSPump.close_notify` queues the closure alert.

Every OpenSSL failure is raised as :class:`TLSError` carrying OpenSSL's reasons;
an end-of-file without close_notify is not an exception here but
``eof is EOFKind.PREMATURE`` (QEMU's ``PREMATURE_TERMINATION``), because
whether it is an error depends on the caller (``RELAXED_EOF``).

Certificate checks: OpenSSL verifies the peer's chain against the context's
trust store during the handshake.  The verify callback of a
:class:`~qiotwisted.crypto.TLSCreds` context reports the first failure to the
connection's app data (:attr:`TLSPump.verify_failure`) so that the channel can
report it the way QEMU does ("The certificate has expired", ...).

Not thread-safe; one pump belongs to one channel in the reactor thread.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Sequence
from typing import Any, Final

from OpenSSL import SSL

__all__ = ["MAX_RECORD", "EOFKind", "TLSError", "TLSPump", "VerifyFailure", "openssl_reasons"]

#: The largest plaintext a TLS record carries (RFC 8446 §5.1); one ``SSL_read``
#: returns at most one record, so asking for more only wastes an allocation.
MAX_RECORD: Final = 16384
#: Bytes of ciphertext one ``bio_read`` asks for when draining output.
_DRAIN: Final = 256 * 1024


class EOFKind(enum.Enum):
    """How the peer's stream ended."""

    CLEAN = "close_notify"
    PREMATURE = "premature"


class TLSError(Exception):
    """OpenSSL refused something; ``str()`` is OpenSSL's reason(s)."""


class VerifyFailure:
    """The first certificate verification error OpenSSL reported for a connection."""

    __slots__ = ("depth", "errnum", "subject")

    def __init__(self, errnum: int, depth: int, subject: str) -> None:
        self.errnum = errnum
        self.depth = depth
        self.subject = subject

    def __repr__(self) -> str:
        return f"VerifyFailure(errnum={self.errnum}, depth={self.depth}, subject={self.subject!r})"


class _AppData:
    """The connection's app data: where the context's verify callback reports a failure.

    :class:`~qiotwisted.crypto.TLSCreds` contexts carry that callback (one
    per context: a per-connection one would cost a cffi callback per
    handshake).  Held by the Connection only, so no reference cycle.
    """

    __slots__ = ("verify_failure",)

    def __init__(self) -> None:
        self.verify_failure: VerifyFailure | None = None

    def note_verify_failure(self, errnum: int, depth: int, cert: Any) -> None:
        if self.verify_failure is None:
            try:
                subject = cert.to_cryptography().subject.rfc4514_string()
            except Exception:
                subject = "?"
            self.verify_failure = VerifyFailure(errnum, depth, subject)


def openssl_reasons(exc: BaseException) -> str:
    """OpenSSL's reason strings from an ``SSL.Error``, joined, or the exception text."""
    args: tuple[Any, ...] = tuple(getattr(exc, "args", ()))
    if args and isinstance(args[0], list):
        parts = [str(e[-1]) for e in args[0] if isinstance(e, tuple) and e]
        if parts:
            return "; ".join(parts)
    if isinstance(exc, SSL.SysCallError) and len(args) >= 2:
        return str(args[1])
    return str(exc) or type(exc).__name__


class TLSPump:
    """One TLS session over memory BIOs.  See the module docstring.

    :param context: the endpoint's ``SSL.Context`` (shared, not modified).
    :param server: accept (server) or connect (client) state.
    :param server_name: a client sends it as SNI unless it is an IP literal.
    """

    __slots__ = ("_app", "_conn", "eof", "eof_fed", "needs_input")

    def __init__(
        self, context: SSL.Context, *, server: bool, server_name: str | None = None
    ) -> None:
        conn = SSL.Connection(context, None)
        self._app = _AppData()
        conn.set_app_data(self._app)
        if server:
            conn.set_accept_state()
        else:
            if server_name and not _is_ip(server_name):
                conn.set_tlsext_host_name(server_name.encode("idna"))
            conn.set_connect_state()
        self._conn = conn
        #: True once ``decrypt`` stopped because the fed ciphertext holds no
        #: complete record; cleared by ``feed``.
        self.needs_input = True
        #: How the peer's stream ended, once ``decrypt`` found out.
        self.eof: EOFKind | None = None
        #: True once ``feed(b"")`` was called.
        self.eof_fed = False

    @property
    def connection(self) -> SSL.Connection:
        """The pyOpenSSL connection (for queries: version, cipher, certificates)."""
        return self._conn

    @property
    def verify_failure(self) -> VerifyFailure | None:
        return self._app.verify_failure

    # ---- ciphertext ------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Give ciphertext from the transport; ``b""`` is the transport's end-of-file."""
        if self.eof_fed:
            if data:
                raise TLSError("ciphertext fed after end-of-file")
            return
        if data:
            self._conn.bio_write(data)
        else:
            self._conn.bio_shutdown()
            self.eof_fed = True
        self.needs_input = False

    def take_output(self, size_hint: int = 0) -> bytes:
        """All ciphertext waiting to be sent, or ``b""``.

        *size_hint*: how much there probably is; one ``bio_read`` of that size
        (plus slack) then takes it all without joining pieces.
        """
        conn = self._conn
        want = size_hint + 1024 if size_hint > _DRAIN else _DRAIN
        try:
            first = conn.bio_read(want)
        except SSL.WantReadError:
            return b""
        if len(first) < want:
            return first
        parts = [first]
        for _ in range(1 << 16):  # bounded: each round takes _DRAIN bytes
            try:
                parts.append(conn.bio_read(_DRAIN))
            except SSL.WantReadError:
                break
        return b"".join(parts)

    # ---- handshake -------------------------------------------------------------------

    def handshake(self) -> bool:
        """One handshake step: True when complete, False when more ciphertext is needed.

        Raises :class:`TLSError`; an end-of-file during the handshake is a
        TLSError too ("The TLS connection was non-properly terminated.").
        """
        try:
            self._conn.do_handshake()
        except SSL.WantReadError:
            if self.eof_fed:
                raise TLSError("The TLS connection was non-properly terminated.") from None
            self.needs_input = True
            return False
        except SSL.SysCallError as exc:
            if self.eof_fed:
                raise TLSError("The TLS connection was non-properly terminated.") from None
            raise TLSError(openssl_reasons(exc)) from None
        except SSL.Error as exc:
            raise TLSError(openssl_reasons(exc)) from None
        return True

    # ---- plaintext -------------------------------------------------------------------

    def pending(self) -> int:
        """Decrypted bytes buffered in OpenSSL (the rest of the current record)."""
        return int(self._conn.pending())

    def decrypt(self, out: list[bytes], nbytes: int) -> int:
        """Append up to *nbytes* of plaintext to *out*; return how many were appended.

        Stops early when the fed ciphertext has no complete record left
        (:attr:`needs_input` turns True) or at the end of the stream
        (:attr:`eof` is set).  Raises :class:`TLSError` on a bad record or a
        fatal alert from the peer.
        """
        if self.eof is not None:
            return 0  # OpenSSL reports an ended stream only once
        recv = self._conn.recv
        got = 0
        while got < nbytes:
            want = nbytes - got
            try:
                data = recv(want if want < MAX_RECORD else MAX_RECORD)
            except SSL.WantReadError:
                if self.eof_fed:
                    # An empty BIO at EOF reads as WANT_READ with some OpenSSL
                    # builds: the stream ended inside a record or without one.
                    self.eof = EOFKind.PREMATURE
                else:
                    self.needs_input = True
                break
            except SSL.ZeroReturnError:
                self.eof = EOFKind.CLEAN
                break
            except SSL.SysCallError as exc:
                if self.eof_fed:
                    self.eof = EOFKind.PREMATURE
                    break
                raise TLSError(openssl_reasons(exc)) from None
            except SSL.Error as exc:
                raise TLSError(openssl_reasons(exc)) from None
            out.append(data)
            got += len(data)
        return got

    def encrypt(self, data: bytes | bytearray | memoryview) -> int:
        """Encrypt all of *data* into records (taken by :meth:`take_output`)."""
        send = self._conn.send
        total = len(data) if not isinstance(data, memoryview) else data.nbytes
        try:
            # pyOpenSSL turns on SSL_MODE_ENABLE_PARTIAL_WRITE, so each
            # SSL_write stops after one record even though a memory BIO
            # never blocks: loop (once per 16 KiB record).
            sent = send(data)
            if sent < total:
                view = memoryview(data).cast("B")
                for _ in range(total // MAX_RECORD + 1):
                    sent += send(view[sent:])
                    if sent >= total:
                        break
        except SSL.Error as exc:
            raise TLSError(openssl_reasons(exc)) from None
        return int(sent)

    def encrypt_chunks(self, chunks: Sequence[bytes | bytearray | memoryview], limit: int) -> int:
        """Encrypt a prefix of *chunks* of at most *limit* bytes; return its length.

        Small chunks are joined first so that records are full-size (one
        record per 4 KiB iovec would cost a header, a tag and a Python call
        each, on both ends).
        """
        if len(chunks) == 1:
            view = chunks[0] if isinstance(chunks[0], memoryview) else memoryview(chunks[0])
            if view.nbytes > limit:
                view = view.cast("B")[:limit]
            return self.encrypt(view)
        parts: list[bytes | bytearray | memoryview] = []
        total = 0
        for c in chunks:
            n = len(c) if not isinstance(c, memoryview) else c.nbytes
            if not n:
                continue
            if total + n > limit:
                view = (c if isinstance(c, memoryview) else memoryview(c)).cast("B")
                parts.append(view[: limit - total])
                total = limit
                break
            parts.append(c)
            total += n
            if total >= limit:
                break
        if not total:
            return 0
        return self.encrypt(parts[0] if len(parts) == 1 else b"".join(parts))

    def close_notify(self) -> None:
        """Queue our close_notify alert (``SSL_shutdown``); it leaves with :meth:`take_output`."""
        try:
            self._conn.shutdown()
        except SSL.Error as exc:
            raise TLSError(openssl_reasons(exc)) from None

    # ---- queries -----------------------------------------------------------------------

    def peer_certificate(self) -> Any:
        """The peer's ``cryptography`` certificate, or ``None``."""
        return self._conn.get_peer_certificate(as_cryptography=True)

    @property
    def protocol_version(self) -> str:
        """``"TLSv1.3"``, ``"TLSv1.2"``... (``"Unknown"`` before the handshake)."""
        return str(self._conn.get_protocol_version_name())

    @property
    def cipher(self) -> str | None:
        name = self._conn.get_cipher_name()
        return None if name is None else str(name)


def _is_ip(host: str) -> bool:
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(bare)
    except ValueError:
        return False
    return True
