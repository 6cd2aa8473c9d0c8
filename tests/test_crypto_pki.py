"""generate_pki / ``qio pki``: what is written, how, and that QEMU 7.2, certtool and
openssl all accept it."""

from __future__ import annotations

import datetime
import ipaddress
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from qiotwisted.crypto import (
    GeneratedPKI,
    PKIError,
    TLSCreds,
    TLSCredsError,
    dn_string,
    generate_pki,
    generate_pki_sync,
)
from qiotwisted.crypto import pki as P
from qiotwisted.testing import MemoryWorkerPool
from tests.pki import bare_qemu

_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem")


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _ext(cert: x509.Certificate, cls: type[Any]) -> x509.Extension[Any]:
    return cert.extensions.get_extension_for_class(cls)


def test_generate_round_trip(tmp_path: Path) -> None:
    d = tmp_path / "tls"
    pki = generate_pki_sync(d, hostnames=("localhost", "127.0.0.1", "::1"))
    assert isinstance(pki, GeneratedPKI) and pki.directory == d
    assert sorted(p.name for p in d.iterdir()) == sorted(_FILES)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for name in _FILES:
        mode = stat.S_IMODE((d / name).stat().st_mode)
        assert mode == (0o600 if name.endswith("-key.pem") else 0o644), name

    ca, server, client = (
        _cert(d / n) for n in ("ca-cert.pem", "server-cert.pem", "client-cert.pem")
    )
    assert pki.client_dn == dn_string(client) == "C=UK,O=qiotwisted,CN=qemu-client"
    assert pki.server_dn == dn_string(server) == "C=UK,O=qiotwisted,CN=localhost"
    assert pki.ca_dn == dn_string(ca) == "C=UK,O=qiotwisted,CN=qiotwisted CA"
    key = server.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert key.curve.name == "secp256r1"

    bc = _ext(ca, x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = _ext(ca, x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign
    san = _ext(server, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert list(_ext(server, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert list(_ext(client, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    for leaf in (server, client):
        assert not _ext(leaf, x509.BasicConstraints).value.ca
        assert _ext(leaf, x509.KeyUsage).value.digital_signature
        leaf.verify_directly_issued_by(ca)
    with pytest.raises(x509.ExtensionNotFound):
        _ext(client, x509.SubjectAlternativeName)

    # Our own loader takes it as either endpoint, with every check on.
    server_creds = TLSCreds.load_sync(d, "server")
    client_creds = TLSCreds.load_sync(d, "client")
    assert server_creds.identity == pki.server_dn and client_creds.identity == pki.client_dn


def test_validity_days(tmp_path: Path) -> None:
    now = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
    pki = generate_pki_sync(tmp_path / "d", days=10, now=now)
    for name in ("ca-cert.pem", "server-cert.pem", "client-cert.pem"):
        cert = _cert(tmp_path / "d" / name)
        assert cert.not_valid_before_utc == now - datetime.timedelta(minutes=5)
        assert cert.not_valid_after_utc == now + datetime.timedelta(days=10)
    assert pki.not_after == now + datetime.timedelta(days=10)


def test_rsa_keys(tmp_path: Path) -> None:
    pki = generate_pki_sync(tmp_path / "rsa", key_type="rsa")
    server = _cert(pki.server_cert)
    key = server.public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    assert key.key_size == 3072
    ku = _ext(server, x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment  # RSA may need both
    TLSCreds.load_sync(pki.directory, "server")


def test_custom_names_and_hostnames(tmp_path: Path) -> None:
    pki = generate_pki_sync(
        tmp_path / "d",
        hostnames=("[::1]", "Migration.Example", "10.0.0.7"),
        client_dn="C=DE,ST=Bayern,O=A\\, B,CN=source-vm",
    )
    assert pki.client_dn == "C=DE,ST=Bayern,O=A\\, B,CN=source-vm"
    assert pki.server_dn == "C=UK,O=qiotwisted,CN=::1"
    san = _ext(_cert(pki.server_cert), x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["migration.example"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["::1", "10.0.0.7"]


def test_refuses_to_overwrite_and_writes_nothing(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "server-key.pem").write_bytes(b"precious")
    with pytest.raises(
        PKIError, match=r"server-key\.pem already exist\(s\); refusing to overwrite"
    ):
        generate_pki_sync(d)
    assert sorted(p.name for p in d.iterdir()) == ["server-key.pem"]
    assert (d / "server-key.pem").read_bytes() == b"precious"
    generate_pki_sync(d, overwrite=True)
    assert (d / "server-key.pem").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert not [p for p in d.iterdir() if p.name.startswith(".")]  # no temporary files left


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hostnames": ()}, "at least one hostname"),
        ({"hostnames": ("bad host",)}, "invalid hostname 'bad host'"),
        ({"hostnames": ("héllo",)}, "invalid hostname"),
        ({"client_dn": "CN"}, "expected NAME=VALUE"),
        ({"client_dn": "XX=1"}, "unsupported attribute 'XX'"),
        ({"days": 0}, "days must be at least 1"),
        ({"key_type": "dsa"}, "unknown key type 'dsa'"),
    ],
)
def test_bad_arguments_write_nothing(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(PKIError, match=message):
        generate_pki_sync(tmp_path / "d", **kwargs)
    assert not (tmp_path / "d").exists()


def test_certtool_and_openssl_verify(tmp_path: Path) -> None:
    pki = generate_pki_sync(tmp_path / "d", hostnames=("localhost", "127.0.0.1", "::1"))
    d = pki.directory
    for leaf in ("server-cert.pem", "client-cert.pem"):
        out = subprocess.run(
            ["certtool", "--verify", "--load-ca-certificate", str(d / "ca-cert.pem"),
             "--infile", str(d / leaf)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        assert "The certificate is trusted" in out.stdout
    checks = [
        ("server-cert.pem", ["-purpose", "sslserver", "-verify_hostname", "localhost"]),
        ("server-cert.pem", ["-purpose", "sslserver", "-verify_ip", "127.0.0.1"]),
        ("server-cert.pem", ["-purpose", "sslserver", "-verify_ip", "::1"]),
        ("client-cert.pem", ["-purpose", "sslclient"]),
    ]
    for leaf, args in checks:
        out = subprocess.run(
            ["openssl", "verify", "-CAfile", str(d / "ca-cert.pem"), *args, str(d / leaf)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert out.returncode == 0 and out.stdout.strip().endswith(": OK"), out.stderr
    # And the negative: the client certificate is no server certificate.
    out = subprocess.run(
        ["openssl", "verify", "-CAfile", str(d / "ca-cert.pem"), "-purpose", "sslserver",
         str(d / "client-cert.pem")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode != 0


# ---- qio pki -------------------------------------------------------------------------------


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "creds"
    rc = P.main([str(d), "--hostname", "localhost", "--hostname", "192.0.2.1",
                 "--client-dn", "C=UK,O=Lab,CN=src", "--days", "30"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    assert "client DN:     C=UK,O=Lab,CN=src" in out
    assert "identity=C=UK,,O=Lab,,CN=src" in out  # QEMU's option syntax doubles commas
    assert f"endpoint=server,dir={d},verify-peer=on" in out
    san = _ext(_cert(d / "server-cert.pem"), x509.SubjectAlternativeName).value
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["192.0.2.1"]
    assert stat.S_IMODE((d / "client-key.pem").stat().st_mode) == 0o600

    # Existing files: status 1, a message, nothing touched.
    before = (d / "ca-cert.pem").read_bytes()
    assert P.main([str(d)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (d / "ca-cert.pem").read_bytes() == before
    assert P.main([str(d), "--force", "--key-type", "rsa"]) == 0
    assert (d / "ca-cert.pem").read_bytes() != before
    capsys.readouterr()

    assert P.main(["--help"]) == 0
    assert "--client-dn" in capsys.readouterr().out
    assert P.main([]) == 2  # DIR is required
    assert P.main([str(d), "--key-type", "dsa"]) == 2
    assert P.main([str(tmp_path / "x"), "--client-dn", "BOGUS"]) == 1


def test_cli_through_qio_console_script(tmp_path: Path) -> None:
    d = tmp_path / "via-qio"
    out = subprocess.run(
        [sys.executable, "-m", "qiotwisted.cli", "pki", str(d)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert (d / "server-key.pem").exists()


# ---- generate_pki as a Task ---------------------------------------------------------------


def test_generate_task_with_a_memory_pool(tmp_path: Path) -> None:
    pool = MemoryWorkerPool()
    task = generate_pki(tmp_path / "d", pool=pool)
    results: list[Any] = []
    task.deferred.addBoth(results.append)
    assert not (tmp_path / "d").exists() and results == []
    pool.run_until_idle()
    assert isinstance(results[0], GeneratedPKI)
    assert (tmp_path / "d" / "client-key.pem").exists()
    # An error travels the same way.
    failing = generate_pki(tmp_path / "d", pool=pool)  # files exist now
    failing.deferred.addErrback(lambda f: results.append(f.value))
    pool.run_until_idle()
    assert isinstance(results[1], PKIError)


async def test_generate_runs_in_a_worker_and_completes_in_the_reactor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reactor_thread = threading.get_ident()
    seen: dict[str, int] = {}
    original = P.new_private_key

    def recording(key_type: P.KeyType = "ecdsa") -> P.PrivateKey:
        seen.setdefault("keygen", threading.get_ident())
        return original(key_type)

    monkeypatch.setattr(P, "new_private_key", recording)
    task = generate_pki(tmp_path / "d", hostnames=("localhost",))
    task.deferred.addCallback(lambda r: seen.setdefault("done", threading.get_ident()) and r)
    result = await task
    assert result.hostnames == ("localhost",)
    assert seen["keygen"] != reactor_thread
    assert seen["done"] == reactor_thread


# ---- QEMU 7.2 accepts what we write -------------------------------------------------------


def _object_add(qmp: Any, oid: str, endpoint: str, d: Path) -> str | None:
    props = {"qom-type": "tls-creds-x509", "id": oid, "endpoint": endpoint, "dir": str(d),
             "verify-peer": True, "sanity-check": True}  # fmt: skip
    try:
        qmp.execute("object-add", props)
    except Exception as e:
        return str(e).split("GenericError: ", 1)[-1]
    return None


@pytest.mark.qemu
def test_qemu_accepts_generated_pki_and_refuses_the_negative_controls(tmp_path: Path) -> None:
    ecdsa = generate_pki_sync(tmp_path / "ecdsa")
    rsa_pki = generate_pki_sync(tmp_path / "rsa", key_type="rsa")

    # Negative controls (generate_pki keeps no CA key, so they get CAs of their own):
    # a CA without basicConstraints, and a server certificate whose critical
    # extKeyUsage allows only clientAuth.
    now = datetime.datetime.now(datetime.UTC)
    nb, na = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=1)
    ca_name = P.parse_dn("C=UK,O=qiotwisted,CN=control CA")

    def control(
        name: str, ca_exts: list[P.ExtensionSpec], leaf_exts: list[P.ExtensionSpec]
    ) -> Path:
        ca_key, leaf_key = P.new_private_key(), P.new_private_key()
        ca = P.build_certificate(ca_name, ca_key.public_key(), issuer_name=ca_name,
                                 issuer_key=ca_key, extensions=ca_exts, not_before=nb,
                                 not_after=na)  # fmt: skip
        leaf = P.build_certificate(P.parse_dn("C=UK,O=qiotwisted,CN=localhost"),
                                   leaf_key.public_key(), issuer_name=ca_name, issuer_key=ca_key,
                                   extensions=leaf_exts, not_before=nb,
                                   not_after=na)  # fmt: skip
        d = tmp_path / name
        P.write_pem_files(d, {"ca-cert.pem": (P.cert_pem(ca), 0o644),
                              "server-cert.pem": (P.cert_pem(leaf), 0o644),
                              "server-key.pem": (P.key_pem(leaf_key), 0o600)})  # fmt: skip
        return d

    leaf_bc = (x509.BasicConstraints(ca=False, path_length=None), True)
    cert_sign = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
    good_ca_exts = [(x509.BasicConstraints(ca=True, path_length=None), True), (cert_sign, True)]
    no_bc = control("no-bc", [(cert_sign, True)], [leaf_bc])
    eku = control(
        "eku", good_ca_exts,
        [leaf_bc, (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), True)],
    )  # fmt: skip

    with bare_qemu(tmp_path / "qemu") as (qmp, _log):
        for i, pki in enumerate((ecdsa, rsa_pki)):
            for endpoint in ("server", "client"):
                assert _object_add(qmp, f"ok{i}{endpoint}", endpoint, pki.directory) is None
        for oid, d, expected in (
            ("nobc", no_bc, f"The certificate {no_bc}/ca-cert.pem is missing basic constraints "
                            "for a CA"),
            ("eku", eku, f"Certificate {eku}/server-cert.pem purpose does not allow use with "
                         "a TLS server"),
        ):  # fmt: skip
            assert _object_add(qmp, oid, "server", d) == expected
            with pytest.raises(TLSCredsError) as info:
                TLSCreds.load_sync(d, "server")
            assert str(info.value) == expected
