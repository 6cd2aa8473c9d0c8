"""``TLSCreds``: QEMU's ``tls-creds-x509`` object on ``cryptography`` and pyOpenSSL.

Loading follows ``crypto/tlscredsx509.c`` and ``crypto/tlscreds.c`` of QEMU 7.2
(the version our interop tests run against), with its messages:

==========  ====================================  ======================================
endpoint    required in ``dir``                   optional
==========  ====================================  ======================================
server      ``ca-cert.pem``, ``server-cert.pem``, ``ca-crl.pem``, ``dh-params.pem``
            ``server-key.pem``
client      ``ca-cert.pem``                       ``client-cert.pem``, ``client-key.pem``
                                                  (the pair is used only if both exist)
==========  ====================================  ======================================

``verify-peer`` does not change which files are needed (QEMU 7.2 checked: a
client with only ``ca-cert.pem`` loads with ``verify-peer=on``; a server always
needs its certificate and key).  A missing required file fails with
``Unable to access credentials DIR/NAME: No such file or directory``; no
directory at all with ``Missing 'dir' property value``.

With ``sanity_check`` (QEMU's ``sanity-check``, on by default) the
certificates are checked when loaded, in QEMU's order and with its messages:
the leaf (if there is one), then every CA certificate, then the leaf against
the CAs.  For each certificate: validity dates; basicConstraints (always); the
keyUsage (only when the extension is critical: a CA needs keyCertSign, a leaf
digitalSignature); for a leaf the extKeyUsage (only when critical: serverAuth
or anyExtendedKeyUsage for a server, clientAuth for a client).  The tests hold
every verdict and message against a real QEMU 7.2 (``qemu-interop.md`` trap 11).

Loading reads files and parses keys, so :meth:`TLSCreds.load` runs it as a
:class:`~qiotwisted.task.Task` in a worker thread; :meth:`TLSCreds.load_sync`
is the blocking version for code already in a worker.

The loaded object holds what a TLS channel needs: the ``cryptography``
certificates and key, and a ready :class:`OpenSSL.SSL.Context`
(:attr:`TLSCreds.context`).  The *priority* string picks the protocol versions
and ciphers; see :func:`parse_priority`.

**Trap** (``qemu-interop.md`` trap 1): a TLS 1.3 server sends session tickets
after the handshake (158 bytes here, with ``OP_NO_TICKET`` and with or without
a session cache), and a QEMU 7.2 migration source never reads them, so its
kernel resets the connection at close and the tail of the stream is lost
(measured: 1.3 to 3.5 MB of a 64 MiB stream, ``ECONNRESET``, while QEMU
reports ``completed``).  pyOpenSSL 26 exposes no ``SSL_CTX_set_num_tickets``
(neither does its cffi binding), so a server that *receives* from QEMU 7.2
must be capped at TLS 1.2: ``priority="@QIO-TLS1.2"``
(:data:`PRIORITY_QEMU_RECEIVER`), or QEMU's own spelling
``"NORMAL:-VERS-TLS1.3"``.  It then writes nothing after the handshake, and
the same migration arrives whole and ends with a FIN.
"""

from __future__ import annotations

import datetime
import enum
import errno
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import SSL, crypto
from twisted.logger import Logger

from ..errors import QIOError
from ..task import Task
from ._dn import dn_string
from .pki import CA_CERT, CA_CRL, CLIENT_CERT, CLIENT_KEY, DH_PARAMS, SERVER_CERT, SERVER_KEY

__all__ = [
    "DEFAULT_PRIORITY",
    "PRIORITY_QEMU_RECEIVER",
    "Endpoint",
    "TLSCreds",
    "TLSCredsError",
    "TLSPriority",
    "check_hostname",
    "parse_priority",
]

PrivateKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
    | dsa.DSAPrivateKey
)

# QEMU's gnutls_x509_crt_list_import() is given room for 16 CA certificates.
_MAX_CA_CERTS = 16

DEFAULT_PRIORITY = "NORMAL"
"""QEMU's default ``priority`` (its ``tls_priority`` build option)."""
PRIORITY_QEMU_RECEIVER = "@QIO-TLS1.2"
"""TLS 1.2 only: for a server that a QEMU 7.2 migration source connects to (trap 1)."""


class TLSCredsError(QIOError):
    """Loading or checking TLS credentials failed; the message is QEMU's where it has one."""


class Endpoint(enum.StrEnum):
    SERVER = "server"
    CLIENT = "client"


# ---- priority strings ------------------------------------------------------------


@dataclass(frozen=True)
class TLSPriority:
    """What a priority string means for OpenSSL.

    ``cipher_list`` is for TLS 1.2 (``None``: OpenSSL's default, which has only
    forward-secret AEAD and CBC-SHA2 suites in OpenSSL 3+), ``ciphersuites``
    for TLS 1.3 (``None``: OpenSSL's default, all three AEADs).
    """

    text: str
    min_version: int
    max_version: int
    cipher_list: str | None = None
    ciphersuites: str | None = None
    server_preference: bool = False

    @property
    def versions(self) -> tuple[str, ...]:
        return tuple(
            n for v, n in _VERSION_NAMES.items() if self.min_version <= v <= self.max_version
        )


_VERSION_NAMES = {SSL.TLS1_2_VERSION: "TLS1.2", SSL.TLS1_3_VERSION: "TLS1.3"}
_VERSION_KEYWORDS = {"TLS1.2": SSL.TLS1_2_VERSION, "TLS1.3": SSL.TLS1_3_VERSION}
_NEVER_ENABLED = {"TLS1.0", "TLS1.1", "SSL3.0", "DTLS-ALL", "DTLS1.0", "DTLS1.2", "DTLS0.9"}

_FS_AEAD = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"
_FS_AEAD_256 = "ECDHE+AES256+AESGCM:ECDHE+CHACHA20:DHE+AES256+AESGCM:DHE+CHACHA20"
_TLS13_256 = "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
# GnuTLS base keywords -> (TLS 1.2 cipher list, TLS 1.3 suites); None = OpenSSL default.
_BASES: dict[str, tuple[str | None, str | None]] = {
    "NORMAL": (None, None),
    "PERFORMANCE": (None, None),
    "@SYSTEM": (None, None),
    "PFS": (_FS_AEAD, None),
    "SECURE128": (_FS_AEAD, None),
    "SECURE192": (_FS_AEAD_256, _TLS13_256),
    "SECURE256": (_FS_AEAD_256, _TLS13_256),
}
_ALIASES = {PRIORITY_QEMU_RECEIVER.upper(): "NORMAL:-VERS-TLS1.3"}


def parse_priority(text: str | None) -> TLSPriority:
    """Map a GnuTLS priority string (QEMU's ``priority`` property) onto OpenSSL settings.

    OpenSSL cannot run GnuTLS priority strings, so qiotwisted understands the
    part of the syntax that matters here and refuses the rest with a clear
    error rather than silently doing something else:

    * ``None`` means ``"NORMAL"``, QEMU's default.
    * Base keywords: ``NORMAL``, ``PERFORMANCE``, ``@SYSTEM`` (TLS 1.2 and 1.3,
      OpenSSL's default ciphers); ``PFS`` and ``SECURE128`` (TLS 1.2 limited
      to forward-secret AEAD suites); ``SECURE192`` and ``SECURE256`` (256-bit
      AEAD only, in TLS 1.2 and 1.3).
    * Version elements after a ``:``: ``-VERS-TLS1.3``, ``-VERS-TLS1.2``,
      ``-VERS-ALL``, ``+VERS-TLS1.2``, ``+VERS-TLS1.3``.  Removing TLS 1.1 or
      older is accepted and changes nothing (they are never enabled); adding
      them is refused: the minimum is TLS 1.2.
    * ``%SERVER_PRECEDENCE``: the server's cipher order wins.
    * ``@QIO-TLS1.2`` (:data:`PRIORITY_QEMU_RECEIVER`): qiotwisted's name for
      ``NORMAL:-VERS-TLS1.3``, TLS 1.2 only, for a server that receives from a
      QEMU 7.2 source (trap 1 in the module docstring).

    So ``"NORMAL:-VERS-TLS1.3"``, which QEMU users already write for the same
    reason, works as it does in QEMU.  Raises :class:`TLSCredsError`.
    """
    original = DEFAULT_PRIORITY if text is None else text
    spec = _ALIASES.get(original.strip().upper(), original.strip())
    elements = [e.strip() for e in spec.split(":")]
    base = elements[0].upper()
    if base not in _BASES:
        raise TLSCredsError(
            f"Unsupported TLS priority {original!r}: it must start with one of "
            f"{', '.join(sorted(_BASES))} or be {PRIORITY_QEMU_RECEIVER}"
        )
    cipher_list, ciphersuites = _BASES[base]
    versions = set(_VERSION_KEYWORDS.values())
    server_preference = False
    for element in elements[1:]:
        upper = element.upper()
        m = re.fullmatch(r"([+-])VERS-(.+)", upper)
        if m:
            sign, name = m.groups()
            if name == "ALL":
                versions = set(_VERSION_KEYWORDS.values()) if sign == "+" else set()
            elif name in _VERSION_KEYWORDS:
                (versions.add if sign == "+" else versions.discard)(_VERSION_KEYWORDS[name])
            elif name in _NEVER_ENABLED and sign == "-":
                pass
            elif name in _NEVER_ENABLED:
                raise TLSCredsError(
                    f"TLS priority {original!r} enables {name}: the minimum is TLS 1.2"
                )
            else:
                raise TLSCredsError(
                    f"Unknown protocol version {name!r} in TLS priority {original!r}"
                )
        elif upper == "%SERVER_PRECEDENCE":
            server_preference = True
        elif element:
            raise TLSCredsError(
                f"Unsupported element {element!r} in TLS priority {original!r} (qiotwisted "
                "understands +/-VERS-TLS1.2, +/-VERS-TLS1.3, -VERS-ALL and %SERVER_PRECEDENCE)"
            )
    if not versions:
        raise TLSCredsError(f"TLS priority {original!r} enables no protocol version")
    return TLSPriority(
        text=original,
        min_version=min(versions),
        max_version=max(versions),
        cipher_list=cipher_list,
        ciphersuites=ciphersuites,
        server_preference=server_preference,
    )


# ---- file access, as qcrypto_tls_creds_get_path ----------------------------------


def _get_path(directory: Path | None, name: str, required: bool) -> Path | None:
    if directory is None:
        if required:
            raise TLSCredsError("Missing 'dir' property value")
        return None
    path = directory / name
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ENOENT and not required:
            TLSCreds.log.debug(
                "qcrypto_tls_creds_get_path {filename} <none>", event="qcrypto_tls_creds_get_path",
                filename=name,
            )  # fmt: skip
            return None
        raise TLSCredsError(
            f"Unable to access credentials {path}: {os.strerror(exc.errno or errno.EIO)}"
        ) from None
    TLSCreds.log.debug(
        "qcrypto_tls_creds_get_path {filename} {path}", event="qcrypto_tls_creds_get_path",
        filename=name, path=str(path),
    )  # fmt: skip
    return path


def _read(path: Path, fmt: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TLSCredsError(fmt.format(path=path, reason=exc.strerror or exc)) from None


_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.DOTALL)


def _pem_blocks(data: bytes, *labels: bytes) -> list[bytes]:
    return [m.group(0) for m in _PEM_BLOCK.finditer(data) if m.group(1) in labels]


def _load_certs(data: bytes) -> list[x509.Certificate]:
    """Every PEM certificate in *data*; ValueError if one is corrupt.

    cryptography decodes some fields only when they are first read (the
    names, the public key), and OpenSSL parses each certificate again when a
    context is built: both happen here, so a corrupt certificate fails the
    load with its file's name instead of escaping later as another exception.
    """
    certs = []
    for block in _pem_blocks(data, b"CERTIFICATE", b"X509 CERTIFICATE"):
        try:
            cert = x509.load_pem_x509_certificate(block)
            # cryptography parses these lazily, and OpenSSL parses the
            # certificate again when a context is built: touch them all here so
            # a corrupt certificate fails now, as a TLSCredsError (found by fuzzing).
            _ = (cert.subject, cert.issuer, cert.signature_hash_algorithm)
            cert.public_key()
            crypto.X509.from_cryptography(cert)
        except (
            x509.InvalidVersion,
            TypeError,
            ValueError,
            UnsupportedAlgorithm,
            crypto.Error,
        ) as exc:
            raise ValueError(_openssl_reason(exc)) from None
        certs.append(cert)
    return certs


# ---- the sanity checks (qcrypto_tls_creds_x509_sanity_check) -------------------


def _what(is_server: bool) -> str:
    return "server" if is_server else "client"


def _check_times(
    cert: x509.Certificate, path: Path, is_server: bool, is_ca: bool, now: datetime.datetime
) -> None:
    kind = "CA" if is_ca else _what(is_server)
    if cert.not_valid_after_utc < now:
        raise TLSCredsError(f"The {kind} certificate {path} has expired")
    if cert.not_valid_before_utc > now:
        raise TLSCredsError(f"The {kind} certificate {path} is not yet active")


def _extension(cert: x509.Certificate, cls: type[Any], path: Path, what: str) -> Any:
    """The extension of type *cls*, or None; a malformed extension list is QEMU's query error."""
    try:
        return cert.extensions.get_extension_for_class(cls)
    except x509.ExtensionNotFound:
        return None
    except (ValueError, x509.DuplicateExtension, UnsupportedAlgorithm) as exc:
        raise TLSCredsError(f"Unable to query certificate {path} {what}: {exc}") from None


def _check_basic_constraints(
    cert: x509.Certificate, path: Path, is_server: bool, is_ca: bool
) -> None:
    ext = _extension(cert, x509.BasicConstraints, path, "basic constraints")
    if ext is None:
        if is_ca:
            raise TLSCredsError(f"The certificate {path} is missing basic constraints for a CA")
    elif ext.value.ca:
        if not is_ca:
            # QEMU's wording, odd as it is: the leaf claims to be a CA.
            raise TLSCredsError(
                f"The certificate {path} basic constraints show a CA, "
                f"but we need one for a {_what(is_server)}"
            )
    elif is_ca:
        raise TLSCredsError(f"The certificate {path} basic constraints do not show a CA")


def _check_key_usage(cert: x509.Certificate, path: Path, is_ca: bool) -> None:
    ext = _extension(cert, x509.KeyUsage, path, "key usage")
    if ext is None or not ext.critical:
        return  # QEMU assumes the right usage when absent, and ignores it when not critical
    usage: x509.KeyUsage = ext.value
    if is_ca:
        if not usage.key_cert_sign:
            raise TLSCredsError(f"Certificate {path} usage does not permit certificate signing")
        return
    # QEMU 7.2 no longer demands keyEncipherment (older QEMU and libvirt did):
    # its binary lacks that message, and it accepts an ECDSA leaf whose
    # critical keyUsage is digitalSignature alone.
    if not usage.digital_signature:
        raise TLSCredsError(f"Certificate {path} usage does not permit digital signature")


def _check_key_purpose(cert: x509.Certificate, path: Path, is_server: bool) -> None:
    ext = _extension(cert, x509.ExtendedKeyUsage, path, "key purpose")
    if ext is None or not ext.critical:
        return
    purposes = set(ext.value)
    any_purpose = ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in purposes or not purposes
    if is_server and not (any_purpose or ExtendedKeyUsageOID.SERVER_AUTH in purposes):
        raise TLSCredsError(f"Certificate {path} purpose does not allow use with a TLS server")
    if not is_server and not (any_purpose or ExtendedKeyUsageOID.CLIENT_AUTH in purposes):
        raise TLSCredsError(f"Certificate {path} purpose does not allow use with a TLS client")


def _check_cert(
    cert: x509.Certificate, path: Path, is_server: bool, is_ca: bool, now: datetime.datetime
) -> None:
    _check_times(cert, path, is_server, is_ca, now)
    _check_basic_constraints(cert, path, is_server, is_ca)
    _check_key_usage(cert, path, is_ca)
    if not is_ca:
        _check_key_purpose(cert, path, is_server)


def _check_pair(
    cert: x509.Certificate,
    path: Path,
    cas: Sequence[x509.Certificate],
    ca_path: Path,
    is_server: bool,
) -> None:
    """``gnutls_x509_crt_list_verify(cert, CAs)`` as QEMU reports it.

    Like GnuTLS, a CA is a candidate issuer when its subject is the
    certificate's issuer and, if both carry key identifiers, the certificate's
    authorityKeyIdentifier is the CA's subjectKeyIdentifier.  No candidate:
    "hasn't got a known issuer"; candidates whose signature does not verify:
    "is not trusted".
    """
    aki = _extension(cert, x509.AuthorityKeyIdentifier, path, "authority key identifier")
    aki_id = aki.value.key_identifier if aki is not None else None

    def may_have_issued(ca: x509.Certificate) -> bool:
        if ca.subject != cert.issuer:
            return False
        ski = _extension(ca, x509.SubjectKeyIdentifier, ca_path, "subject key identifier")
        return aki_id is None or ski is None or ski.value.digest == aki_id

    issuers = [ca for ca in cas if may_have_issued(ca)]
    reason = None
    if not issuers:
        reason = "The certificate hasn't got a known issuer"
    else:
        for ca in issuers:
            try:
                cert.verify_directly_issued_by(ca)
                break
            except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
                continue
        else:
            reason = "The certificate is not trusted"
    if reason is None and isinstance(cert.signature_hash_algorithm, hashes.MD5):
        reason = "The certificate uses an insecure algorithm"
    if reason is not None:
        raise TLSCredsError(
            f"Our own certificate {path} failed validation against {ca_path}: {reason}"
        )


def _sanity_check(
    is_server: bool, ca_path: Path, cert_path: Path | None, now: datetime.datetime
) -> None:
    """QEMU's ``qcrypto_tls_creds_x509_sanity_check``: unreadable files are skipped here."""
    cert = None
    if cert_path is not None and os.access(cert_path, os.R_OK):
        data = _read(cert_path, "Cannot load CA cert list {path}: {reason}")
        try:
            certs = _load_certs(data)
            if not certs:
                raise ValueError("no PEM certificate found")
        except ValueError as exc:
            raise TLSCredsError(
                f"Unable to import {_what(is_server)} certificate {cert_path}: {exc}"
            ) from None
        cert = certs[0]
    cas: list[x509.Certificate] = []
    if os.access(ca_path, os.R_OK):
        data = _read(ca_path, "Cannot load CA cert list {path}: {reason}")
        try:
            cas = _load_certs(data)
        except ValueError:
            cas = []
        if not cas or len(cas) > _MAX_CA_CERTS:
            raise TLSCredsError(f"Unable to import CA certificate list {ca_path}")
    if cert is not None and cert_path is not None:
        _check_cert(cert, cert_path, is_server, False, now)
    for ca in cas:
        _check_cert(ca, ca_path, is_server, True, now)
    if cert is not None and cert_path is not None and cas:
        _check_pair(cert, cert_path, cas, ca_path, is_server)


# ---- hostname check (qcrypto_tls_session_check_certificate, client side) --------


def check_hostname(cert: x509.Certificate, hostname: str) -> None:
    """Raise ``Certificate does not match the hostname NAME`` unless *cert* is valid for it.

    Like ``gnutls_x509_crt_check_hostname``: IP literals match IP SANs, names
    match DNS SANs (with ``*`` wildcards in the first label), and a certificate
    without DNS SANs falls back to its CN.  Case-insensitive.
    """
    import ipaddress

    from service_identity import CertificateError, VerificationError
    from service_identity.cryptography import (
        verify_certificate_hostname,
        verify_certificate_ip_address,
    )

    bare = hostname[1:-1] if hostname.startswith("[") and hostname.endswith("]") else hostname
    try:
        try:
            ip = ipaddress.ip_address(bare)
        except ValueError:
            ip = None
        if ip is not None:
            verify_certificate_ip_address(cert, str(ip))
        else:
            try:
                verify_certificate_hostname(cert, bare)
            except CertificateError:
                # No SAN at all: GnuTLS then compares the CN.
                cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
                if not any(str(a.value).lower() == bare.lower() for a in cns):
                    raise VerificationError(errors=[]) from None
    except (VerificationError, CertificateError, ValueError):
        raise TLSCredsError(f"Certificate does not match the hostname {hostname}") from None


# ---- TLSCreds ---------------------------------------------------------------------


class TLSCreds:
    """Loaded x509 credentials for one endpoint; immutable after loading.

    Build one with :meth:`load` (in a worker thread, as a Task) or
    :meth:`load_sync`.  Attributes:

    ``directory``, ``endpoint`` (:class:`Endpoint`), ``verify_peer``,
    ``priority`` (the string), ``tls_priority`` (:class:`TLSPriority`),
    ``ca_certs`` (the trusted CAs), ``cert_chain`` (own certificate first, then
    any extra ones from the same file, as GnuTLS sends them), ``cert`` and
    ``private_key`` (``None`` for a client without a key pair), ``crls`` (server
    only, from ``ca-crl.pem``), ``dh_params`` (path of ``dh-params.pem`` or
    ``None``).

    :attr:`context` is a pyOpenSSL context built at load time, shared by all
    connections; :meth:`make_context` builds a fresh one.  Thread-safe to read.
    """

    log = Logger()

    def __init__(
        self,
        *,
        directory: Path,
        endpoint: Endpoint,
        verify_peer: bool,
        priority: TLSPriority,
        ca_certs: Sequence[x509.Certificate],
        cert_chain: Sequence[x509.Certificate],
        private_key: PrivateKey | None,
        crls: Sequence[x509.CertificateRevocationList] = (),
        dh_params: Path | None = None,
    ) -> None:
        self.directory = directory
        self.endpoint = endpoint
        self.verify_peer = verify_peer
        self.tls_priority = priority
        self.priority = priority.text
        self.ca_certs: tuple[x509.Certificate, ...] = tuple(ca_certs)
        self.cert_chain: tuple[x509.Certificate, ...] = tuple(cert_chain)
        self.private_key = private_key
        self.crls: tuple[x509.CertificateRevocationList, ...] = tuple(crls)
        self.dh_params = dh_params
        self._context: SSL.Context | None = None
        self._lock = threading.Lock()

    @property
    def is_server(self) -> bool:
        return self.endpoint is Endpoint.SERVER

    @property
    def cert(self) -> x509.Certificate | None:
        """Our own certificate (the first of :attr:`cert_chain`), or ``None``."""
        return self.cert_chain[0] if self.cert_chain else None

    @property
    def identity(self) -> str | None:
        """Our certificate's DN as a peer QEMU's authz sees it, or ``None``."""
        return dn_string(self.cert_chain[0]) if self.cert_chain else None

    def __repr__(self) -> str:
        return (
            f"<TLSCreds {self.endpoint.value} dir={str(self.directory)!r} "
            f"verify_peer={self.verify_peer} priority={self.priority!r}>"
        )

    # ---- loading ------------------------------------------------------------------

    @classmethod
    def load_sync(
        cls,
        directory: str | os.PathLike[str] | None,
        endpoint: Endpoint | str = "server",
        verify_peer: bool = True,
        priority: str | None = None,
        *,
        sanity_check: bool = True,
        password: bytes | None = None,
        now: datetime.datetime | None = None,
    ) -> TLSCreds:
        """Load and check the credentials in *directory*; blocks (file I/O, key parsing).

        :param endpoint: ``"server"`` or ``"client"``.
        :param verify_peer: server: require a client certificate signed by our
            CA; client: verify the server's certificate against our CA (the
            hostname check belongs to the channel, see :func:`check_hostname`).
        :param priority: see :func:`parse_priority` (default ``"NORMAL"``).
        :param sanity_check: QEMU's ``sanity-check`` (see the module docstring).
        :param password: for an encrypted private key (QEMU's ``passwordid``).
        :param now: the time the validity checks use (default: now).
        :raises TLSCredsError: with QEMU's message where QEMU has one.
        """
        try:
            ep = Endpoint(endpoint)
        except ValueError:
            raise TLSCredsError(
                f"Parameter 'endpoint' does not accept value {str(endpoint)!r}"
            ) from None
        prio = parse_priority(priority)
        is_server = ep is Endpoint.SERVER
        dir_path = Path(directory) if directory is not None and os.fspath(directory) else None
        cls.log.debug(
            "qcrypto_tls_creds_x509_load dir={dir}", event="qcrypto_tls_creds_x509_load",
            dir=str(dir_path) if dir_path else "<nodir>", thread_id=threading.get_ident(),
        )  # fmt: skip

        # The order matters: the first missing file is the one reported.
        ca_path = _get_path(dir_path, CA_CERT, True)
        crl_path = dh_path = None
        if is_server:
            crl_path = _get_path(dir_path, CA_CRL, False)
            cert_path = _get_path(dir_path, SERVER_CERT, True)
            key_path = _get_path(dir_path, SERVER_KEY, True)
            dh_path = _get_path(dir_path, DH_PARAMS, False)
        else:
            cert_path = _get_path(dir_path, CLIENT_CERT, False)
            key_path = _get_path(dir_path, CLIENT_KEY, False)
        assert ca_path is not None and dir_path is not None

        moment = now or datetime.datetime.now(datetime.UTC)
        if sanity_check:
            _sanity_check(is_server, ca_path, cert_path, moment)

        data = _read(ca_path, "Cannot load CA certificate '{path}': {reason}")
        try:
            ca_certs = _load_certs(data)
        except ValueError as exc:
            raise TLSCredsError(f"Cannot load CA certificate '{ca_path}': {exc}") from None
        if not ca_certs:
            # GnuTLS accepts a trust file without certificates (sanity-check=off);
            # then no peer can be verified.
            cls.log.warn("No CA certificate in {path}: no peer can be verified", path=str(ca_path))

        chain: list[x509.Certificate] = []
        key: PrivateKey | None = None
        if cert_path is not None and key_path is not None:
            chain, key = _load_key_pair(cert_path, key_path, password)
        elif cert_path is not None:
            # QEMU 7.2 silently ignores a client certificate without its key.
            cls.log.warn(
                "{cert} has no {key} next to it: no client certificate will be sent",
                cert=str(cert_path), key=CLIENT_KEY,
            )  # fmt: skip

        crls: list[x509.CertificateRevocationList] = []
        if crl_path is not None:
            data = _read(crl_path, "Cannot load CRL '{path}': {reason}")
            try:
                crls = [x509.load_pem_x509_crl(block) for block in _pem_blocks(data, b"X509 CRL")]
                if not crls:
                    raise ValueError("no PEM CRL found")
            except ValueError as exc:
                raise TLSCredsError(f"Cannot load CRL '{crl_path}': {exc}") from None

        if dh_path is not None:
            data = _read(dh_path, "Unable to load DH parameters from {path}: {reason}")
            # OpenSSL parses them when the context is built (cryptography's DH
            # loader warns that finite-field DH is deprecated).
            if not _pem_blocks(data, b"DH PARAMETERS"):
                raise TLSCredsError(
                    f"Unable to load DH parameters from {dh_path}: no PEM DH parameters found"
                )

        creds = cls(
            directory=dir_path,
            endpoint=ep,
            verify_peer=verify_peer,
            priority=prio,
            ca_certs=ca_certs,
            cert_chain=chain,
            private_key=key,
            crls=crls,
            dh_params=dh_path,
        )
        # Build the context now, in the loading thread: OpenSSL's own checks
        # (key/certificate match, DH file) then fail the load, not a handshake.
        creds._context = creds.make_context()
        return creds

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str] | None,
        endpoint: Endpoint | str = "server",
        verify_peer: bool = True,
        priority: str | None = None,
        *,
        sanity_check: bool = True,
        password: bytes | None = None,
        reactor: Any = None,
        pool: Any = None,
    ) -> Task[TLSCreds]:
        """Load in a worker thread; returns the running :class:`~qiotwisted.task.Task`.

        Call it in the reactor thread.  ``await task`` (or ``task.deferred``)
        gives the :class:`TLSCreds`, or fails with :class:`TLSCredsError`, in
        the reactor thread.  The task's source is the directory.  Cancelling
        it drops the result (the files are only read).  Arguments as for
        :meth:`load_sync`.
        """

        def worker(task: Task[TLSCreds], _opaque: object) -> None:
            task.set_result(
                cls.load_sync(
                    directory,
                    endpoint,
                    verify_peer,
                    priority,
                    sanity_check=sanity_check,
                    password=password,
                )
            )

        source = os.fspath(directory) if directory is not None else None
        task: Task[TLSCreds] = Task(source, reactor=reactor, pool=pool)
        task.run_in_thread(worker)
        return task

    # ---- pyOpenSSL ---------------------------------------------------------------------

    @property
    def context(self) -> SSL.Context:
        """The :class:`OpenSSL.SSL.Context` for this endpoint (built once, then shared).

        Do not modify it: pyOpenSSL freezes a context once a connection used it.
        """
        if self._context is None:
            with self._lock:
                if self._context is None:
                    self._context = self.make_context()
        return self._context

    def make_context(self) -> SSL.Context:
        """A new context: versions and ciphers from the priority, our key pair, CA trust.

        * TLS 1.2 at least, whatever the priority says.
        * server: our certificate chain and key; with ``verify_peer`` a client
          certificate is required (``VERIFY_PEER | VERIFY_FAIL_IF_NO_PEER_CERT``)
          and the CA names are sent in the certificate request; the CRLs of
          ``ca-crl.pem`` are checked for the client's certificate.
          ``dh-params.pem``, if present, gives the DHE parameters; without it
          OpenSSL (3 and later) picks its own, as QEMU generates some.
        * client: our key pair if we have one; with ``verify_peer`` the
          server's chain must lead to one of our CAs.
        * Session tickets off (``OP_NO_TICKET``; TLS 1.3 servers still send
          tickets, see the priority ``@QIO-TLS1.2``), no compression, no
          renegotiation.
        * When peers are verified, a verify callback that keeps OpenSSL's
          verdict and tells the connection's app data why a certificate was
          refused (:func:`_note_verify_failure`), so a TLS channel can say it
          QEMU's way; set once here, since a per-connection callback costs a
          cffi callback per handshake.
        """
        prio = self.tls_priority
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD if self.is_server else SSL.TLS_CLIENT_METHOD)
        ctx.set_min_proto_version(max(prio.min_version, SSL.TLS1_2_VERSION))
        ctx.set_max_proto_version(prio.max_version)
        options = SSL.OP_NO_TICKET | SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION
        if prio.server_preference:
            options |= SSL.OP_CIPHER_SERVER_PREFERENCE
        ctx.set_options(options)
        try:
            if prio.cipher_list is not None:
                ctx.set_cipher_list(prio.cipher_list.encode())
            if prio.ciphersuites is not None:
                ctx.set_tls13_ciphersuites(prio.ciphersuites.encode())
        except SSL.Error as exc:
            raise TLSCredsError(
                f"TLS priority {self.priority!r} selects no cipher: {exc}"
            ) from None

        store = ctx.get_cert_store()
        assert store is not None
        for ca in self.ca_certs:
            store.add_cert(crypto.X509.from_cryptography(ca))

        if self.cert_chain and self.private_key is not None:
            try:
                ctx.use_certificate(self.cert_chain[0])
                for extra in self.cert_chain[1:]:
                    ctx.add_extra_chain_cert(extra)
                ctx.use_privatekey(self.private_key)
                ctx.check_privatekey()
            except (SSL.Error, crypto.Error, TypeError, ValueError) as exc:
                raise TLSCredsError(
                    f"Cannot load certificate '{self.directory / self._cert_name}' & key "
                    f"'{self.directory / self._key_name}': {_openssl_reason(exc)}"
                ) from None

        if self.is_server:
            if self.verify_peer:
                ctx.set_verify(
                    SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, _note_verify_failure
                )
                for ca in self.ca_certs:
                    ctx.add_client_ca(ca)
            else:
                ctx.set_verify(SSL.VERIFY_NONE)
            if self.crls:
                for crl in self.crls:
                    store.add_crl(crl)
                store.set_flags(crypto.X509StoreFlags.CRL_CHECK)
            if self.dh_params is not None:
                try:
                    ctx.load_tmp_dh(os.fspath(self.dh_params))
                except (SSL.Error, crypto.Error) as exc:
                    reason = _openssl_reason(exc)
                    raise TLSCredsError(
                        f"Unable to load DH parameters from {self.dh_params}: {reason}"
                    ) from None
        elif self.verify_peer:
            ctx.set_verify(SSL.VERIFY_PEER, _note_verify_failure)
        else:
            ctx.set_verify(SSL.VERIFY_NONE)
        return ctx

    @property
    def _cert_name(self) -> str:
        return SERVER_CERT if self.is_server else CLIENT_CERT

    @property
    def _key_name(self) -> str:
        return SERVER_KEY if self.is_server else CLIENT_KEY


def _note_verify_failure(
    conn: SSL.Connection, cert: crypto.X509, errnum: int, depth: int, ok: int
) -> bool:
    """The contexts' verify callback: OpenSSL's verdict stands; a failure is reported.

    The report goes to ``conn.get_app_data().note_verify_failure(errnum, depth,
    cert)`` when the app data has that method (``qiotwisted.channel.tls`` sets
    one).  It must never raise: pyOpenSSL would re-raise the error from the
    next call on *any* connection of the context.
    """
    if not ok:
        note = getattr(conn.get_app_data(), "note_verify_failure", None)
        if note is not None:
            try:
                note(errnum, depth, cert)
            except Exception:
                TLSCreds.log.failure("note_verify_failure raised")
    return bool(ok)


def _openssl_reason(exc: BaseException) -> str:
    if isinstance(exc, SSL.Error | crypto.Error) and exc.args and isinstance(exc.args[0], list):
        parts = [str(e[-1]) for e in exc.args[0] if isinstance(e, tuple) and e]
        if parts:
            return "; ".join(parts)
    return str(exc) or type(exc).__name__


def _load_key_pair(
    cert_path: Path, key_path: Path, password: bytes | None
) -> tuple[list[x509.Certificate], PrivateKey]:
    """``gnutls_certificate_set_x509_key_file2``: the chain in the cert file, and its key."""

    def fail(reason: object) -> TLSCredsError:
        return TLSCredsError(f"Cannot load certificate '{cert_path}' & key '{key_path}': {reason}")

    try:
        cert_data, key_data = cert_path.read_bytes(), key_path.read_bytes()
    except OSError as exc:
        raise fail(exc.strerror or exc) from None
    try:
        chain = _load_certs(cert_data)
        if not chain:
            raise ValueError("no PEM certificate found")
    except ValueError as exc:
        raise fail(exc) from None
    try:
        key = serialization.load_pem_private_key(key_data, password=password)
    except TypeError as exc:  # encrypted without a password, or the reverse
        raise fail(exc) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise fail(exc) from None
    if not isinstance(
        key,
        rsa.RSAPrivateKey
        | ec.EllipticCurvePrivateKey
        | ed25519.Ed25519PrivateKey
        | ed448.Ed448PrivateKey
        | dsa.DSAPrivateKey,
    ):
        raise fail(f"unsupported key type {type(key).__name__}")
    if key.public_key() != chain[0].public_key():
        raise fail("The certificate and the given key do not match.")
    return chain, key
