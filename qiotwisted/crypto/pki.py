"""Make TLS credentials in QEMU's ``tls-creds-x509`` layout: a CA, a server and a client.

:func:`generate_pki` runs in a worker thread as a :class:`~qiotwisted.task.Task`
(key generation is slow enough to stall a reactor); :func:`generate_pki_sync`
is the same work for code that is already in a worker, or has no reactor.
``qio pki DIR`` (:func:`main`) is the command line over it.

What is written, so that QEMU 7.2 accepts it with ``sanity-check=on`` and
``verify-peer=on`` on both endpoints (the tests prove it with a real QEMU)::

    DIR/ca-cert.pem      CA: basicConstraints CA:TRUE (critical),
                         keyUsage keyCertSign+cRLSign (critical)
    DIR/server-cert.pem  basicConstraints CA:FALSE (critical), keyUsage digitalSignature
                         (+keyEncipherment for RSA) (critical), extKeyUsage serverAuth,
                         SAN from the hostnames
    DIR/server-key.pem   mode 0600
    DIR/client-cert.pem  as the server's, with extKeyUsage clientAuth and the subject --client-dn
    DIR/client-key.pem   mode 0600

An ECDSA leaf has no keyEncipherment (RFC 5480); QEMU 7.2 does not ask for it
(older QEMU releases did, for a critical keyUsage).  The extKeyUsage is not
critical, as is usual; QEMU checks it only when it is (``qemu-interop.md``
trap 11), OpenSSL and GnuTLS enforce it during the handshake either way.  A
server certificate's hostnames become DNS SANs, and IP literals IP SANs (QEMU
checks the URI host, so ``127.0.0.1`` needs one).  A QEMU source needs only
``ca-cert.pem``, ``client-cert.pem`` and ``client-key.pem``; a destination
only ``ca-cert.pem``, ``server-cert.pem`` and ``server-key.pem``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import ipaddress
import os
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from ..errors import QIOError
from ..task import Task
from ._dn import dn_string, parse_dn

__all__ = [
    "CA_CERT",
    "CA_CRL",
    "CLIENT_CERT",
    "CLIENT_KEY",
    "DEFAULT_CA_DN",
    "DEFAULT_CLIENT_DN",
    "DEFAULT_DAYS",
    "DEFAULT_HOSTNAMES",
    "DH_PARAMS",
    "SERVER_CERT",
    "SERVER_KEY",
    "GeneratedPKI",
    "KeyType",
    "PKIError",
    "build_certificate",
    "ca_extensions",
    "generate_pki",
    "generate_pki_sync",
    "leaf_extensions",
    "main",
    "new_private_key",
    "san_for_hostnames",
    "write_pem_files",
]

# QEMU's file names (include/crypto/tlscredsx509.h, include/crypto/tlscreds.h).
CA_CERT = "ca-cert.pem"
CA_CRL = "ca-crl.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"
DH_PARAMS = "dh-params.pem"

DEFAULT_HOSTNAMES: tuple[str, ...] = ("localhost", "127.0.0.1")
DEFAULT_CLIENT_DN = "C=UK,O=qiotwisted,CN=qemu-client"
DEFAULT_CA_DN = "C=UK,O=qiotwisted,CN=qiotwisted CA"
DEFAULT_DAYS = 365
RSA_BITS = 3072

KeyType = Literal["ecdsa", "rsa"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
ExtensionSpec = tuple[x509.ExtensionType, bool]
"""An extension and its ``critical`` flag."""

# Certificates start a little in the past, so a peer whose clock is a bit
# behind does not see them as "not yet active".
_BACKDATE = datetime.timedelta(minutes=5)


class PKIError(QIOError):
    """Generating or writing credentials failed; nothing was half-written."""


@dataclass(frozen=True)
class GeneratedPKI:
    """What :func:`generate_pki` wrote.

    ``client_dn`` is the client's identity exactly as QEMU's ``authz-simple``
    compares it (``identity=`` must equal it), and ``server_dn`` likewise.
    """

    directory: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    ca_dn: str
    server_dn: str
    client_dn: str
    hostnames: tuple[str, ...]
    key_type: KeyType
    not_after: datetime.datetime


# ---- building blocks (also used by the tests' fixture PKI) ------------------------


def new_private_key(key_type: KeyType = "ecdsa") -> PrivateKey:
    """A fresh ECDSA P-256 or RSA-3072 key.  Slow for RSA: call it in a worker thread."""
    if key_type == "ecdsa":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    raise PKIError(f"unknown key type {key_type!r} (use 'ecdsa' or 'rsa')")


def san_for_hostnames(hostnames: Iterable[str]) -> x509.SubjectAlternativeName:
    """DNS SANs for names, IP SANs for IPv4/IPv6 literals (``[::1]`` brackets allowed)."""
    names: list[x509.GeneralName] = []
    for host in hostnames:
        host = host.strip()
        bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(bare)))
            continue
        except ValueError:
            pass
        if not host or not host.isascii() or any(c.isspace() for c in host) or "/" in host:
            raise PKIError(f"invalid hostname {host!r} (use an ASCII DNS name or an IP address)")
        names.append(x509.DNSName(host.lower()))
    if not names:
        raise PKIError("a server certificate needs at least one hostname")
    return x509.SubjectAlternativeName(names)


def ca_extensions(public_key: Any) -> list[ExtensionSpec]:
    """A CA that QEMU's sanity check accepts (basicConstraints and keyUsage, critical)."""
    return [
        (x509.BasicConstraints(ca=True, path_length=None), True),
        (
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            True,
        ),
        (x509.SubjectKeyIdentifier.from_public_key(public_key), False),
    ]


def leaf_extensions(
    public_key: Any,
    issuer: x509.Certificate | None,
    *,
    endpoint: Literal["server", "client"],
    hostnames: Iterable[str] = (),
) -> list[ExtensionSpec]:
    """A server or client leaf (see the module docstring)."""
    purpose = (
        ExtendedKeyUsageOID.SERVER_AUTH if endpoint == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
    )
    exts: list[ExtensionSpec] = [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            True,
        ),
        (x509.ExtendedKeyUsage([purpose]), False),
        (x509.SubjectKeyIdentifier.from_public_key(public_key), False),
    ]
    hostnames = list(hostnames)
    if hostnames:
        exts.append((san_for_hostnames(hostnames), False))
    if issuer is not None:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        exts.append((x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), False))
    return exts


def build_certificate(
    subject: x509.Name,
    public_key: Any,
    *,
    issuer_name: x509.Name,
    issuer_key: PrivateKey,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
    extensions: Iterable[ExtensionSpec] = (),
    serial: int | None = None,
) -> x509.Certificate:
    """Sign a certificate with SHA-256 (any dates and extensions: tests build bad ones too)."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(public_key)
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(issuer_key, hashes.SHA256())


def key_pem(key: PrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM (``BEGIN PRIVATE KEY``), which GnuTLS and OpenSSL both read."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def write_pem_files(
    directory: Path, files: Mapping[str, tuple[bytes, int]], *, overwrite: bool = False
) -> None:
    """Write ``{name: (data, mode)}`` into *directory* (created 0700 if missing).

    Without *overwrite*, refuses (:class:`PKIError`) before writing anything if
    any of the files exists.  Each file is written to a temporary name with its
    final mode from the start, then renamed into place, so a key is never
    readable by others and a crash never leaves a half-written file.
    """
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise PKIError(f"Cannot create directory {directory}: {exc.strerror or exc}") from None
    if not overwrite:
        existing = [name for name in files if (directory / name).exists()]
        if existing:
            raise PKIError(
                f"{', '.join(str(directory / n) for n in existing)} already exist(s); "
                "refusing to overwrite (use --force)"
            )
    for name, (data, mode) in files.items():
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
        try:
            os.fchmod(fd, mode)  # mkstemp makes 0600; certificates become 0644
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, directory / name)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise PKIError(f"Cannot write {directory / name}: {exc.strerror or exc}") from None


# ---- the whole PKI ---------------------------------------------------------------


def generate_pki_sync(
    directory: str | os.PathLike[str],
    *,
    hostnames: Sequence[str] = DEFAULT_HOSTNAMES,
    client_dn: str = DEFAULT_CLIENT_DN,
    server_dn: str | None = None,
    ca_dn: str = DEFAULT_CA_DN,
    key_type: KeyType = "ecdsa",
    days: int = DEFAULT_DAYS,
    overwrite: bool = False,
    now: datetime.datetime | None = None,
) -> GeneratedPKI:
    """Generate and write a CA, a server and a client (blocking; see :func:`generate_pki`).

    :param hostnames: the server certificate's SANs (IP literals become IP
        SANs); the first one is also its CN unless *server_dn* is given.
    :param client_dn: the client subject, ``"C=UK,O=X,CN=Y"`` in the order QEMU
        prints DNs (:func:`~qiotwisted.crypto.parse_dn`).
    :param days: validity of all three certificates.
    :param overwrite: replace existing files (default: refuse, write nothing).
    :raises PKIError: bad arguments, or the files could not be written.
    """
    directory = Path(directory)
    if days < 1:
        raise PKIError(f"days must be at least 1, not {days}")
    if key_type not in ("ecdsa", "rsa"):
        raise PKIError(f"unknown key type {key_type!r} (use 'ecdsa' or 'rsa')")
    hostnames = tuple(hostnames)
    san_for_hostnames(hostnames)  # validate before any slow work
    try:
        ca_name = parse_dn(ca_dn)
        client_name = parse_dn(client_dn)
        first = hostnames[0].strip("[]")
        server_name = parse_dn(server_dn or f"C=UK,O=qiotwisted,CN={_escape_value(first)}")
    except ValueError as exc:
        raise PKIError(str(exc)) from None

    start = (now or datetime.datetime.now(datetime.UTC)) - _BACKDATE
    end = start + _BACKDATE + datetime.timedelta(days=days)

    ca_key = new_private_key(key_type)
    ca = build_certificate(
        ca_name,
        ca_key.public_key(),
        issuer_name=ca_name,
        issuer_key=ca_key,
        not_before=start,
        not_after=end,
        extensions=ca_extensions(ca_key.public_key()),
    )
    leaves: dict[str, tuple[x509.Certificate, PrivateKey]] = {}
    for endpoint, name in (("server", server_name), ("client", client_name)):
        key = new_private_key(key_type)
        leaves[endpoint] = (
            build_certificate(
                name,
                key.public_key(),
                issuer_name=ca_name,
                issuer_key=ca_key,
                not_before=start,
                not_after=end,
                extensions=leaf_extensions(
                    key.public_key(),
                    ca,
                    endpoint="server" if endpoint == "server" else "client",
                    hostnames=hostnames if endpoint == "server" else (),
                ),
            ),
            key,
        )
    server, server_key = leaves["server"]
    client, client_key = leaves["client"]
    write_pem_files(
        directory,
        {
            CA_CERT: (cert_pem(ca), 0o644),
            SERVER_CERT: (cert_pem(server), 0o644),
            SERVER_KEY: (key_pem(server_key), 0o600),
            CLIENT_CERT: (cert_pem(client), 0o644),
            CLIENT_KEY: (key_pem(client_key), 0o600),
        },
        overwrite=overwrite,
    )
    return GeneratedPKI(
        directory=directory,
        ca_cert=directory / CA_CERT,
        server_cert=directory / SERVER_CERT,
        server_key=directory / SERVER_KEY,
        client_cert=directory / CLIENT_CERT,
        client_key=directory / CLIENT_KEY,
        ca_dn=dn_string(ca),
        server_dn=dn_string(server),
        client_dn=dn_string(client),
        hostnames=hostnames,
        key_type=key_type,
        not_after=end,
    )


def _escape_value(value: str) -> str:
    return "".join("\\" + c if c in ',+"\\<>;=' else c for c in value)


def _qemu_opt(value: object) -> str:
    """A value for QEMU's ``-object a=b,c=d`` syntax, where a literal comma is doubled."""
    return str(value).replace(",", ",,")


def generate_pki(
    directory: str | os.PathLike[str],
    *,
    hostnames: Sequence[str] = DEFAULT_HOSTNAMES,
    client_dn: str = DEFAULT_CLIENT_DN,
    server_dn: str | None = None,
    ca_dn: str = DEFAULT_CA_DN,
    key_type: KeyType = "ecdsa",
    days: int = DEFAULT_DAYS,
    overwrite: bool = False,
    reactor: Any = None,
    pool: Any = None,
) -> Task[GeneratedPKI]:
    """Generate the PKI in a worker thread; returns the running :class:`~qiotwisted.task.Task`.

    Call it in the reactor thread.  ``await task`` (or ``task.deferred``) gives
    the :class:`GeneratedPKI`, delivered in the reactor thread, or fails with
    :class:`PKIError`.  Keys are generated and files written in the worker;
    cancelling the task while it runs does not stop the worker, which then
    still writes its files (they are complete: each file is renamed into place).
    Arguments as for :func:`generate_pki_sync`.
    """
    kwargs: dict[str, Any] = dict(
        hostnames=tuple(hostnames),
        client_dn=client_dn,
        server_dn=server_dn,
        ca_dn=ca_dn,
        key_type=key_type,
        days=days,
        overwrite=overwrite,
    )

    def worker(task: Task[GeneratedPKI], _opaque: object) -> None:
        task.set_result(generate_pki_sync(directory, **kwargs))

    task: Task[GeneratedPKI] = Task(os.fspath(directory), reactor=reactor, pool=pool)
    task.run_in_thread(worker)
    return task


# ---- qio pki ---------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qio pki",
        description=(
            "Generate a CA plus server and client TLS credentials in the directory layout of "
            "QEMU's tls-creds-x509 object (ca-cert.pem, server-cert.pem, server-key.pem, "
            "client-cert.pem, client-key.pem)."
        ),
    )
    p.add_argument("directory", metavar="DIR", help="where to write the files (created if missing)")
    p.add_argument(
        "--hostname",
        action="append",
        metavar="NAME",
        help="a name the server certificate is valid for; repeatable; IP addresses become IP "
        f"SANs (default: {' '.join(DEFAULT_HOSTNAMES)})",
    )
    p.add_argument(
        "--client-dn",
        default=DEFAULT_CLIENT_DN,
        metavar="DN",
        help=f"client certificate subject, in QEMU's order (default: {DEFAULT_CLIENT_DN})",
    )
    p.add_argument("--server-dn", default=None, metavar="DN", help="server certificate subject")
    p.add_argument("--ca-dn", default=DEFAULT_CA_DN, metavar="DN", help="CA certificate subject")
    p.add_argument(
        "--key-type", choices=("ecdsa", "rsa"), default="ecdsa",
        help="ECDSA P-256 (default) or RSA-3072",
    )  # fmt: skip
    p.add_argument("--days", type=int, default=DEFAULT_DAYS, help="validity in days (default 365)")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``qio pki DIR [--hostname NAME]... [--client-dn DN] [--key-type ecdsa|rsa] [--days N]``.

    Returns the exit status (0 ok, 1 failure, 2 usage error).  A command line
    has no reactor to keep responsive, so this calls :func:`generate_pki_sync`
    directly.
    """
    parser = _parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # argparse exits on --help and on usage errors
        return int(exc.code or 0) if isinstance(exc.code, int | None) else 2
    try:
        pki = generate_pki_sync(
            args.directory,
            hostnames=tuple(args.hostname or DEFAULT_HOSTNAMES),
            client_dn=args.client_dn,
            server_dn=args.server_dn,
            ca_dn=args.ca_dn,
            key_type=args.key_type,
            days=args.days,
            overwrite=args.force,
        )
    except PKIError as exc:
        print(f"qio pki: error: {exc}", file=sys.stderr)
        return 1
    d = pki.directory
    print(f"wrote {pki.key_type} credentials valid until {pki.not_after:%Y-%m-%d} to {d}/")
    for path in (pki.ca_cert, pki.server_cert, pki.server_key, pki.client_cert, pki.client_key):
        print(f"  {path.name}")
    print(f"server names:  {', '.join(pki.hostnames)}")
    print(f"server DN:     {pki.server_dn}")
    print(f"client DN:     {pki.client_dn}")
    print("QEMU destination (server):")
    print(f"  -object tls-creds-x509,id=tls0,endpoint=server,dir={_qemu_opt(d)},verify-peer=on")
    print(f"  -object authz-simple,id=auth0,identity={_qemu_opt(pki.client_dn)}")
    print("  then: migrate-set-parameters tls-creds=tls0 tls-authz=auth0")
    print("QEMU source (client):")
    print(f"  -object tls-creds-x509,id=tls0,endpoint=client,dir={_qemu_opt(d)}")
    return 0
