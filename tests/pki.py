"""A test PKI in QEMU's ``tls-creds-x509`` layout, made once per test session.

Use the session fixture from any test module::

    from tests.pki import TestPKI, pki_fixture  # noqa: F401  (provides the fixture "pki")

    def test_something(pki: TestPKI) -> None:
        creds = TLSCreds.load_sync(pki.server_dir, endpoint="server")

or, outside pytest (benchmarks, examples), :func:`get_test_pki` with a directory.

Everything is synchronous and generated with ``cryptography`` (ECDSA P-256, so
it takes a few milliseconds).  Directories, all under one session temp dir:

``full_dir``        ca-cert.pem + server-cert/key + client-cert/key (QEMU accepts it
                    as either endpoint with ``sanity-check=on``, ``verify-peer=on``)
``server_dir``      ca-cert.pem + server-cert/key (what a QEMU destination needs)
``client_dir``      ca-cert.pem + client-cert/key (what a QEMU source needs)
``other_dir``       an unrelated second CA with its own valid server and client:
                    each side refuses the other's certificates
``expired_dir``     full layout whose server and client certificates expired yesterday
``not_yet_valid_dir`` full layout whose leaves become valid tomorrow

The server certificate has SANs ``localhost``, ``127.0.0.1`` and ``::1``; the
client's subject is ``C=UK,O=qiotwisted,CN=qemu-client`` (:data:`CLIENT_DN`,
the identity QEMU's authz sees).  :meth:`TestPKI.issue` and
:meth:`TestPKI.make_dir` build more (bad) certificates from the same CAs.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import os
import signal
import subprocess
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
from cryptography import x509

from qiotwisted.crypto import pki as _pki
from qiotwisted.crypto._dn import parse_dn
from tests.qemu import QMPClient, QMPError, qemu_binary

__all__ = [
    "CLIENT_DN",
    "SERVER_DN",
    "SERVER_HOSTNAMES",
    "TestPKI",
    "bare_qemu",
    "get_test_pki",
    "gnutls_get_dn",
    "pki_fixture",
]

CLIENT_DN = "C=UK,O=qiotwisted,CN=qemu-client"
SERVER_DN = "C=UK,O=qiotwisted,CN=localhost"
SERVER_HOSTNAMES = ("localhost", "127.0.0.1", "::1")
CA_DN = "C=UK,O=qiotwisted,CN=qiotwisted test CA"
OTHER_CA_DN = "C=UK,O=elsewhere,CN=unrelated test CA"

Endpoint = Literal["server", "client"]


@dataclass
class TestPKI:
    """The session's CAs and directories (see the module docstring)."""

    __test__ = False  # not a test class, despite its name

    root: Path
    ca_cert: x509.Certificate
    ca_key: _pki.PrivateKey
    other_ca_cert: x509.Certificate
    other_ca_key: _pki.PrivateKey
    server_cert: x509.Certificate
    server_key: _pki.PrivateKey
    client_cert: x509.Certificate
    client_key: _pki.PrivateKey
    full_dir: Path = field(init=False)
    server_dir: Path = field(init=False)
    client_dir: Path = field(init=False)
    other_dir: Path = field(init=False)
    expired_dir: Path = field(init=False)
    not_yet_valid_dir: Path = field(init=False)
    client_dn: str = CLIENT_DN
    server_dn: str = SERVER_DN
    _names: Iterator[int] = field(default_factory=itertools.count, repr=False)

    def __post_init__(self) -> None:
        self.full_dir = self.root / "full"
        self.server_dir = self.root / "server"
        self.client_dir = self.root / "client"
        self.other_dir = self.root / "other"
        self.expired_dir = self.root / "expired"
        self.not_yet_valid_dir = self.root / "not-yet-valid"

    # ---- building more -----------------------------------------------------------

    def issue(
        self,
        endpoint: Endpoint,
        *,
        subject: str | None = None,
        issuer: Literal["ca", "other"] = "ca",
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        extensions: Iterable[_pki.ExtensionSpec] | None = None,
        key: _pki.PrivateKey | None = None,
    ) -> tuple[x509.Certificate, _pki.PrivateKey]:
        """A leaf from one of the CAs; *extensions* replaces the normal leaf extensions."""
        ca, ca_key = (
            (self.ca_cert, self.ca_key)
            if issuer == "ca"
            else (self.other_ca_cert, self.other_ca_key)
        )
        key = key or _pki.new_private_key("ecdsa")
        now = datetime.datetime.now(datetime.UTC)
        if subject is None:
            subject = SERVER_DN if endpoint == "server" else CLIENT_DN
        if extensions is None:
            extensions = _pki.leaf_extensions(
                key.public_key(),
                ca,
                endpoint=endpoint,
                hostnames=SERVER_HOSTNAMES if endpoint == "server" else (),
            )
        cert = _pki.build_certificate(
            parse_dn(subject),
            key.public_key(),
            issuer_name=ca.subject,
            issuer_key=ca_key,
            not_before=not_before or now - datetime.timedelta(hours=1),
            not_after=not_after or now + datetime.timedelta(days=30),
            extensions=extensions,
        )
        return cert, key

    def make_dir(
        self, name: str | None, files: Mapping[str, bytes | x509.Certificate | object]
    ) -> Path:
        """A fresh directory under the session root holding *files*.

        Values are raw bytes, a certificate (written as PEM) or a private key
        (PKCS#8 PEM, mode 0600).  A ``None`` name picks a unique one.
        """
        d = self.root / "made" / (name or f"d{next(self._names)}")
        d.mkdir(parents=True, exist_ok=False)
        out: dict[str, tuple[bytes, int]] = {}
        for fname, value in files.items():
            if isinstance(value, bytes):
                out[fname] = (value, 0o644)
            elif isinstance(value, x509.Certificate):
                out[fname] = (_pki.cert_pem(value), 0o644)
            else:
                out[fname] = (_pki.key_pem(value), 0o600)  # type: ignore[arg-type]  # the remaining case is a key
        _pki.write_pem_files(d, out)
        return d

    def ca_pem(self) -> bytes:
        return _pki.cert_pem(self.ca_cert)


def _ca(dn: str, now: datetime.datetime) -> tuple[x509.Certificate, _pki.PrivateKey]:
    key = _pki.new_private_key("ecdsa")
    name = parse_dn(dn)
    cert = _pki.build_certificate(
        name,
        key.public_key(),
        issuer_name=name,
        issuer_key=key,
        not_before=now - datetime.timedelta(days=1),
        not_after=now + datetime.timedelta(days=365),
        extensions=_pki.ca_extensions(key.public_key()),
    )
    return cert, key


def _write_layout(
    d: Path,
    ca: x509.Certificate,
    server: tuple[x509.Certificate, _pki.PrivateKey] | None,
    client: tuple[x509.Certificate, _pki.PrivateKey] | None,
) -> None:
    files: dict[str, tuple[bytes, int]] = {_pki.CA_CERT: (_pki.cert_pem(ca), 0o644)}
    if server is not None:
        files[_pki.SERVER_CERT] = (_pki.cert_pem(server[0]), 0o644)
        files[_pki.SERVER_KEY] = (_pki.key_pem(server[1]), 0o600)
    if client is not None:
        files[_pki.CLIENT_CERT] = (_pki.cert_pem(client[0]), 0o644)
        files[_pki.CLIENT_KEY] = (_pki.key_pem(client[1]), 0o600)
    _pki.write_pem_files(d, files)


def make_test_pki(root: Path) -> TestPKI:
    """Generate the whole test PKI under *root* (which should be empty)."""
    now = datetime.datetime.now(datetime.UTC)
    ca, ca_key = _ca(CA_DN, now)
    other, other_key = _ca(OTHER_CA_DN, now)
    # Placeholders for the leaves, replaced right below (issue() needs the CAs).
    t = TestPKI(root, ca, ca_key, other, other_key, ca, ca_key, ca, ca_key)
    t.server_cert, t.server_key = server = t.issue("server")
    t.client_cert, t.client_key = client = t.issue("client")
    _write_layout(t.full_dir, ca, server, client)
    _write_layout(t.server_dir, ca, server, None)
    _write_layout(t.client_dir, ca, None, client)
    _write_layout(
        t.other_dir,
        other,
        t.issue("server", issuer="other", subject="C=UK,O=elsewhere,CN=localhost"),
        t.issue("client", issuer="other", subject="C=UK,O=elsewhere,CN=intruder"),
    )
    past = (now - datetime.timedelta(days=10), now - datetime.timedelta(days=1))
    future = (now + datetime.timedelta(days=1), now + datetime.timedelta(days=10))
    for d, (nb, na) in ((t.expired_dir, past), (t.not_yet_valid_dir, future)):
        _write_layout(
            d,
            ca,
            t.issue("server", not_before=nb, not_after=na),
            t.issue("client", not_before=nb, not_after=na),
        )
    return t


_cache: dict[Path, TestPKI] = {}
_cache_lock = threading.Lock()


def get_test_pki(root: Path) -> TestPKI:
    """The test PKI under *root*, generated on first use (thread-safe, once per root)."""
    with _cache_lock:
        t = _cache.get(root)
        if t is None:
            t = _cache[root] = make_test_pki(root)
        return t


@pytest.fixture(scope="session", name="pki")
def pki_fixture(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    """The session's :class:`TestPKI` as the fixture ``pki`` (sync; generated once).

    Import ``pki_fixture`` into a test module (or a conftest) to use it.
    """
    return get_test_pki(tmp_path_factory.mktemp("pki"))


# ---- the real GnuTLS, for comparisons ---------------------------------------------


def gnutls_get_dn(cert: x509.Certificate, *, issuer: bool = False) -> str:
    """``gnutls_x509_crt_get_dn()`` (QEMU's call) of *cert*, from the installed libgnutls.

    Raises ``OSError`` when ``libgnutls.so.30`` is missing (QEMU depends on it,
    so the tests that use this fail rather than skip).
    """
    import ctypes

    from cryptography.hazmat.primitives import serialization

    lib = ctypes.CDLL("libgnutls.so.30")

    class Datum(ctypes.Structure):
        _fields_ = [("data", ctypes.c_char_p), ("size", ctypes.c_uint)]

    der = cert.public_bytes(serialization.Encoding.DER)
    crt = ctypes.c_void_p()
    if lib.gnutls_x509_crt_init(ctypes.byref(crt)) != 0:
        raise RuntimeError("gnutls_x509_crt_init failed")
    try:
        datum = Datum(der, len(der))
        ret = lib.gnutls_x509_crt_import(crt, ctypes.byref(datum), 0)  # GNUTLS_X509_FMT_DER
        if ret != 0:
            raise RuntimeError(f"gnutls_x509_crt_import failed: {ret}")
        size = ctypes.c_size_t(0)
        get = lib.gnutls_x509_crt_get_issuer_dn if issuer else lib.gnutls_x509_crt_get_dn
        get(crt, None, ctypes.byref(size))  # asks for the size
        buf = ctypes.create_string_buffer(size.value + 1)
        ret = get(crt, buf, ctypes.byref(size))
        if ret != 0:
            raise RuntimeError(f"gnutls_x509_crt_get_dn failed: {ret}")
        return buf.raw[: size.value].decode("utf-8")
    finally:
        lib.gnutls_x509_crt_deinit(crt)


# ---- a bare QEMU for credential checks ----------------------------------------------


@contextlib.contextmanager
def bare_qemu(workdir: Path, *args: str, name: str = "q") -> Iterator[tuple[QMPClient, Path]]:
    """``qemu-system-x86_64 -machine none`` with QMP, plus *args*; yields ``(qmp, log_path)``.

    Enough for ``object-add`` of credentials and for TLS migration handshakes
    (a machine with no devices migrates a few hundred bytes).  Fails (does not
    skip) when QEMU is missing; stopped with ``quit``, then SIGKILL by PID.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    qmp_path = workdir / f"{name}.qmp"
    log_path = workdir / f"{name}.log"
    cmd = [
        qemu_binary(), "-machine", "none", "-nodefaults", "-display", "none",
        *args, "-qmp", f"unix:{qmp_path},server=on,wait=off",
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    qmp = QMPClient(qmp_path, timeout=10.0)
    try:
        qmp.connect(alive=lambda: proc.poll() is None)
        yield qmp, log_path
    finally:
        if proc.poll() is None:
            with contextlib.suppress(QMPError, OSError):
                qmp.timeout = 1.0
                qmp.execute("quit")
            try:
                proc.wait(timeout=3.0)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10.0)
        qmp.close()
