"""authz-simple / authz-list / authz-list-file, and the DN string they are matched against.

References nobody here wrote: GLib's ``g_pattern_match_simple`` and GnuTLS's
``gnutls_x509_crt_get_dn`` (called through ctypes from the installed
libraries), ``certtool -i``, and a real QEMU 7.2 refusing and accepting our
client certificate under authz objects.
"""

from __future__ import annotations

import ctypes
import datetime
import json
import re
import select
import socket
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID, ObjectIdentifier
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from OpenSSL import SSL
from twisted.logger import LogLevel, capturedLogs

from qiotwisted.crypto import (
    AuthzDecision,
    AuthzError,
    AuthzList,
    AuthzListFile,
    AuthzRule,
    AuthzSimple,
    Format,
    Policy,
    TLSCreds,
    dn_string,
    name_der_dn_string,
    parse_dn,
    pattern_match_simple,
)
from qiotwisted.crypto import pki as P
from qiotwisted.crypto._dn import _split_unescaped
from tests.pki import (
    TestPKI,
    bare_qemu,
    gnutls_get_dn,
    pki_fixture,  # noqa: F401  (the session fixture "pki")
)

# ---- g_pattern_match_simple ---------------------------------------------------------

_glib = ctypes.CDLL("libglib-2.0.so.0")
_glib.g_pattern_match_simple.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
_glib.g_pattern_match_simple.restype = ctypes.c_int


def glib_match(pattern: str, string: str) -> bool:
    return bool(_glib.g_pattern_match_simple(pattern.encode(), string.encode()))


@pytest.mark.parametrize(
    ("pattern", "string", "expected"),
    [
        ("*", "", True),
        ("*", "anything", True),
        ("?", "", False),
        ("?", "é", True),  # one character, not one byte
        ("??", "é", False),
        ("a*b*c", "aXXbYYc", True),
        ("a*b*c", "aXXbYY", False),
        ("C=UK,CN=qemu*", "C=UK,CN=qemu", True),
        ("C=UK,CN=qemu*", "C=UK,CN=qemu-client", True),
        ("C=UK,CN=qemu*", "C=US,CN=qemu", False),
        ("[ab]", "a", False),  # no character classes, unlike fnmatch
        ("[ab]", "[ab]", True),
        ("a\\*", "a\\xyz", True),  # a backslash is a plain character
        ("a\\*", "a*", False),
        ("*.*", "noDot", False),
        ("**a**", "xxaxx", True),
        ("", "", True),
        ("", "x", False),
    ],
)
def test_pattern_match_simple_cases(pattern: str, string: str, expected: bool) -> None:
    assert pattern_match_simple(pattern, string) is expected
    assert glib_match(pattern, string) is expected  # the table itself is GLib's truth


_GLOB_ALPHABET = st.sampled_from(list("ab*?é,=\\[]"))


@settings(max_examples=400, deadline=None)
@given(
    st.text(_GLOB_ALPHABET, max_size=8), st.text(st.sampled_from(list("abé,=*?\\[]")), max_size=10)
)
def test_pattern_match_simple_equals_glib(pattern: str, string: str) -> None:
    assert pattern_match_simple(pattern, string) == glib_match(pattern, string)


def test_pattern_match_simple_is_not_exponential() -> None:
    # A pattern that makes naive backtracking explode; bounded work here.
    pattern = "*a" * 30 + "*b"
    assert pattern_match_simple(pattern, "a" * 2000) is False


# ---- authz-simple ---------------------------------------------------------------------


def test_authz_simple_exact_only() -> None:
    authz = AuthzSimple("C=UK,O=qiotwisted,CN=qemu-client")
    assert authz.is_allowed("C=UK,O=qiotwisted,CN=qemu-client")
    assert not authz.is_allowed("C=UK,O=qiotwisted,CN=qemu-client ")
    assert not authz.is_allowed("c=uk,o=qiotwisted,cn=qemu-client")  # case matters
    assert not authz.is_allowed("C=UK,O=qiotwisted,CN=qemu-*")
    decision = authz.check("C=UK,CN=mallory")
    assert not decision and decision.allowed is False
    assert "C=UK,CN=mallory" in decision.reason and "qemu-client" in decision.reason


def test_authz_simple_needs_identity() -> None:
    with pytest.raises(AuthzError, match="The 'identity' property must be set"):
        AuthzSimple(None)  # type: ignore[arg-type]  # wrong on purpose


def test_require_raises_qemu_message_and_logs_reason() -> None:
    authz = AuthzSimple("C=UK,CN=alice")
    authz.require("C=UK,CN=alice")  # no error
    with capturedLogs() as events:
        with pytest.raises(AuthzError) as info:
            authz.require("C=UK,CN=bob")
    assert str(info.value) == "TLS x509 authz check for C=UK,CN=bob is denied"
    infos = [e for e in events if e["log_level"] == LogLevel.info]
    assert infos and infos[0]["identity"] == "C=UK,CN=bob"
    assert "not the allowed identity" in infos[0]["reason"]


# ---- authz-list -----------------------------------------------------------------------


def test_authz_list_qemu_test_suite_rule() -> None:
    # tests/unit/test-io-channel-tls.c: default deny, one glob allow rule.
    authz = AuthzList([AuthzRule("C=UK,CN=qemu*", Policy.ALLOW, Format.GLOB)], Policy.DENY)
    assert authz.is_allowed("C=UK,CN=qemu")
    assert authz.is_allowed("C=UK,CN=qemu.org")
    assert not authz.is_allowed("C=US,CN=qemu")
    assert not authz.is_allowed("CN=qemu,C=UK")  # RFC 4514 order does not match


def test_authz_list_first_match_wins() -> None:
    authz = AuthzList(
        [
            AuthzRule("C=UK,O=qiotwisted,CN=intruder", Policy.DENY),
            AuthzRule("C=UK,O=qiotwisted,CN=*", Policy.ALLOW, Format.GLOB),
            AuthzRule("C=UK,O=qiotwisted,CN=qemu-client", Policy.DENY),  # never reached
        ],
        policy=Policy.DENY,
    )
    assert not authz.is_allowed("C=UK,O=qiotwisted,CN=intruder")
    d = authz.check("C=UK,O=qiotwisted,CN=qemu-client")
    assert d.allowed and d.rule == 1 and "rule 1" in d.reason and "allow" in d.reason
    d = authz.check("C=UK,O=elsewhere,CN=qemu-client")
    assert not d.allowed and d.rule is None and "default policy: deny" in d.reason


def test_authz_list_default_policy() -> None:
    assert not AuthzList().is_allowed("anything")  # QEMU's default: deny
    allow_all = AuthzList(policy="allow")
    assert allow_all.is_allowed("anything")
    deny_one = AuthzList([{"match": "C=UK,CN=bad", "policy": "deny"}], policy="allow")
    assert not deny_one.is_allowed("C=UK,CN=bad")
    assert deny_one.is_allowed("C=UK,CN=bad2")  # exact is the default format


def test_authz_list_exact_does_not_glob() -> None:
    authz = AuthzList([AuthzRule("C=UK,CN=*", Policy.ALLOW)])
    assert not authz.is_allowed("C=UK,CN=x")
    assert authz.is_allowed("C=UK,CN=*")


def test_authz_list_rule_editing_indices() -> None:
    authz = AuthzList(policy="deny")
    assert authz.append_rule("a", "allow") == 0
    assert authz.append_rule("b", "deny", "glob") == 1
    assert authz.insert_rule("first", "allow", "exact", 0) == 0
    assert authz.insert_rule("last", "allow", "exact", 99) == 3  # past the end: appended
    assert authz.insert_rule("mid", "deny", "exact", 2) == 2
    assert [r.match for r in authz.rules] == ["first", "a", "mid", "b", "last"]
    assert authz.delete_rule("mid") == 2
    assert authz.delete_rule("nope") == -1
    assert [r.match for r in authz.rules] == ["first", "a", "b", "last"]
    assert authz.rules[2] == AuthzRule("b", Policy.DENY, Format.GLOB)


def test_authz_list_from_dict_round_trip_and_errors() -> None:
    data = {
        "policy": "allow",
        "rules": [
            {"match": "C=UK,CN=bad*", "policy": "deny", "format": "glob"},
            {"match": "C=UK,CN=x", "policy": "allow"},
        ],
    }
    authz = AuthzList.from_dict(data)
    assert authz.to_dict()["rules"][1] == {
        "match": "C=UK,CN=x",
        "policy": "allow",
        "format": "exact",
    }
    assert not authz.is_allowed("C=UK,CN=badly")
    with pytest.raises(AuthzError, match="Parameter 'policy' does not accept value 'maybe'"):
        AuthzList.from_dict({"policy": "maybe"})
    with pytest.raises(AuthzError, match="Parameter 'format' does not accept value 'regex'"):
        AuthzList.from_dict({"rules": [{"match": "x", "policy": "allow", "format": "regex"}]})
    with pytest.raises(AuthzError, match="Parameter 'policy' is missing"):
        AuthzList.from_dict({"rules": [{"match": "x"}]})
    with pytest.raises(AuthzError, match="Parameter 'match' is missing"):
        AuthzList.from_dict({"rules": [{"policy": "allow"}]})
    with pytest.raises(AuthzError, match="Parameter 'extra' is unexpected"):
        AuthzList.from_dict({"rules": [], "extra": 1})
    with pytest.raises(AuthzError, match="expected: array"):
        AuthzList.from_dict({"rules": {"match": "x"}})


def test_authz_decision_is_truthy_only_when_allowed() -> None:
    assert AuthzDecision("x", True, "ok")
    assert not AuthzDecision("x", False, "no")


# ---- authz-list-file --------------------------------------------------------------------


def test_authz_list_file(tmp_path: Path) -> None:
    path = tmp_path / "rules.json"
    path.write_text(
        json.dumps(
            {
                "policy": "deny",
                "rules": [{"match": "C=UK,O=qiotwisted,CN=*", "policy": "allow", "format": "glob"}],
            }
        )
    )
    authz = AuthzListFile(path)
    assert authz.is_allowed("C=UK,O=qiotwisted,CN=qemu-client")
    assert not authz.is_allowed("C=UK,O=other,CN=qemu-client")

    # Edit the file: refresh() picks up the new rules.
    path.write_text(json.dumps({"policy": "allow", "rules": []}))
    assert authz.refresh()
    assert authz.is_allowed("C=UK,O=other,CN=qemu-client")

    # A broken file denies everybody until fixed (QEMU drops the list too).
    path.write_text("{not json")
    with capturedLogs() as events:
        assert not authz.refresh()
    assert any(e["log_level"] == LogLevel.error for e in events)
    d = authz.check("C=UK,O=qiotwisted,CN=qemu-client")
    assert not d.allowed and "JSON parse error" in d.reason
    path.write_text(json.dumps({"policy": "allow"}))
    assert authz.refresh() and authz.is_allowed("anyone")


def test_authz_list_file_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(AuthzError, match=re.escape(f"Unable to read '{missing}': No such file")):
        AuthzListFile(missing)
    arr = tmp_path / "arr.json"
    arr.write_text("[]")
    with pytest.raises(AuthzError, match=re.escape(f"File '{arr}' must contain a JSON object")):
        AuthzListFile(arr)
    with pytest.raises(AuthzError, match="filename not provided"):
        AuthzListFile("")


# ---- the DN string -------------------------------------------------------------------------

_KEY = ec.generate_private_key(ec.SECP256R1())


def _self_signed(name: x509.Name) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    return P.build_certificate(
        name,
        _KEY.public_key(),
        issuer_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer")]),
        issuer_key=_KEY,
        not_before=now,
        not_after=now + datetime.timedelta(days=1),
    )


def _name(*rdns: list[x509.NameAttribute]) -> x509.Name:
    return x509.Name([x509.RelativeDistinguishedName(r) for r in rdns])


A = x509.NameAttribute
T = _ASN1Type

_DN_CASES = {
    "plain": _name(
        [A(NameOID.COUNTRY_NAME, "UK")],
        [A(NameOID.ORGANIZATION_NAME, "qiotwisted")],
        [A(NameOID.COMMON_NAME, "qemu-client")],
    ),
    "many-rdns": _name(
        [A(NameOID.COUNTRY_NAME, "DE")],
        [A(NameOID.STATE_OR_PROVINCE_NAME, "Bayern")],
        [A(NameOID.LOCALITY_NAME, "München")],
        [A(NameOID.ORGANIZATION_NAME, "Firma GmbH")],
        [A(NameOID.ORGANIZATIONAL_UNIT_NAME, "Dev")],
        [A(NameOID.DOMAIN_COMPONENT, "example")],
        [A(NameOID.USER_ID, "u1")],
        [A(NameOID.EMAIL_ADDRESS, "a@b.example")],
        [A(NameOID.SERIAL_NUMBER, "1234")],
        [A(NameOID.COMMON_NAME, "日本")],
    ),
    "multi-valued": _name(
        [A(NameOID.COUNTRY_NAME, "UK")],
        [A(NameOID.ORGANIZATION_NAME, "A, B+C"), A(NameOID.ORGANIZATIONAL_UNIT_NAME, "x=y")],
        [A(NameOID.COMMON_NAME, "qemu")],
    ),
    "escapes": _name([A(NameOID.COMMON_NAME, ' lead#"q\\<>;trail ')]),
    "leading-hash": _name([A(NameOID.COMMON_NAME, "#hash")], [A(NameOID.COMMON_NAME, "a#b")]),
    "two-spaces": _name([A(NameOID.COMMON_NAME, "  two  ")]),
    "string-types": _name(
        [A(NameOID.COMMON_NAME, "pr", T.PrintableString)],
        [A(NameOID.COMMON_NAME, "bmp€", T.BMPString)],
        [A(NameOID.COMMON_NAME, "t61", T.T61String)],
        [A(NameOID.COMMON_NAME, "t61é", T.T61String)],
        [A(NameOID.COMMON_NAME, "univ€", T.UniversalString)],
        [A(NameOID.COMMON_NAME, "ia5", T.IA5String)],  # not a DirectoryString: hex
        [A(NameOID.COMMON_NAME, "vis", T.VisibleString)],
    ),
    "wrong-types": _name(
        [A(NameOID.COUNTRY_NAME, "UK", T.UTF8String)],
        [A(NameOID.SERIAL_NUMBER, "12", T.UTF8String)],
        [A(NameOID.DOMAIN_COMPONENT, "org", T.UTF8String)],
        [A(NameOID.EMAIL_ADDRESS, "a@b", T.UTF8String)],
        [A(NameOID.INN, "123", T.NumericString)],
        [A(NameOID.INN, "123", T.UTF8String)],
    ),
    "nul-and-controls": _name(
        [A(NameOID.COMMON_NAME, "nul\x00x")], [A(NameOID.COMMON_NAME, "ctl\x01\x7f\nx")]
    ),
    "unknown-oids": _name(
        [A(ObjectIdentifier("1.2.3.4"), "custom")],
        [A(NameOID.UNSTRUCTURED_NAME, "un")],
        [A(ObjectIdentifier("2.5.4.20"), "+44", T.PrintableString)],
        [A(ObjectIdentifier("1.3.6.1.5.5.7.9.3"), "M", T.PrintableString)],
        [A(ObjectIdentifier("1.3.6.1.5.5.7.8.5"), "x@y", T.UTF8String)],
        [A(ObjectIdentifier("1.2.840.113549.1.9.20"), "friendly", T.BMPString)],
        [A(ObjectIdentifier("1.2.840.113549.1.9.7"), "pw", T.PrintableString)],
        [A(NameOID.JURISDICTION_COUNTRY_NAME, "DE", T.UTF8String)],
    ),
}


@pytest.mark.parametrize("case", sorted(_DN_CASES))
def test_dn_string_equals_gnutls_get_dn(case: str) -> None:
    cert = _self_signed(_DN_CASES[case])
    assert dn_string(cert) == gnutls_get_dn(cert)
    assert dn_string(cert, issuer=True) == gnutls_get_dn(cert, issuer=True) == "CN=issuer"


def test_dn_string_is_certificate_order_not_rfc4514(pki: TestPKI) -> None:
    assert dn_string(pki.client_cert) == "C=UK,O=qiotwisted,CN=qemu-client" == pki.client_dn
    assert pki.client_cert.subject.rfc4514_string() == "CN=qemu-client,O=qiotwisted,C=UK"


def test_dn_string_matches_certtool_subject_reversed(tmp_path: Path) -> None:
    """certtool -i prints RFC 4514 order: the same RDNs, last first."""
    for case in ("plain", "many-rdns", "multi-valued", "escapes"):
        cert = _self_signed(_DN_CASES[case])
        pem = tmp_path / f"{case}.pem"
        pem.write_bytes(P.cert_pem(cert))
        out = subprocess.run(
            ["certtool", "-i", "--infile", str(pem)],
            check=True, capture_output=True, text=True, timeout=30,
        ).stdout  # fmt: skip
        subject = next(
            line.split("Subject: ", 1)[1] for line in out.splitlines() if "Subject: " in line
        )
        rdns = _split_unescaped(dn_string(cert), ",")
        assert subject == ",".join(reversed(rdns)), case
        if len(rdns) > 1:
            assert subject != dn_string(cert)


_ATTR_OIDS = [
    NameOID.COMMON_NAME,
    NameOID.ORGANIZATION_NAME,
    NameOID.ORGANIZATIONAL_UNIT_NAME,
    NameOID.COUNTRY_NAME,
    NameOID.DOMAIN_COMPONENT,
    NameOID.EMAIL_ADDRESS,
    NameOID.SERIAL_NUMBER,
    NameOID.USER_ID,
    ObjectIdentifier("1.2.3.4.5"),
]
_STRING_TYPES = [
    None,
    T.UTF8String,
    T.PrintableString,
    T.T61String,
    T.BMPString,
    T.UniversalString,
    T.IA5String,
    T.VisibleString,
]
_VALUE_CHARS = st.sampled_from(list("aZ09 ,+\"\\<>;#=.-'é€\x00\x01"))


@st.composite
def _attributes(draw: st.DrawFn) -> x509.NameAttribute:
    oid = draw(st.sampled_from(_ATTR_OIDS))
    value = draw(st.text(_VALUE_CHARS, min_size=1, max_size=12))
    string_type = draw(st.sampled_from(_STRING_TYPES))
    if oid == NameOID.COUNTRY_NAME:
        value = draw(st.sampled_from(["UK", "DE", "é#", " ,"]))
    try:
        if string_type is None:
            return A(oid, value)
        return A(oid, value, string_type)
    except ValueError:
        assume(False)
        raise


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(st.lists(st.lists(_attributes(), min_size=1, max_size=3), min_size=1, max_size=4))
def test_dn_string_equals_gnutls_for_random_names(rdns: list[list[x509.NameAttribute]]) -> None:
    try:
        cert = _self_signed(_name(*rdns))
    except ValueError:
        assume(False)
        raise
    assert dn_string(cert) == gnutls_get_dn(cert)


def test_name_der_dn_string_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="malformed distinguished name"):
        name_der_dn_string(b"\x31\x00")
    with pytest.raises(ValueError, match="malformed distinguished name"):
        name_der_dn_string(b"\x30\x05\x31\x03\x30\x01")
    assert name_der_dn_string(b"\x30\x00") == ""


def test_parse_dn_round_trips_through_a_certificate() -> None:
    for text in (
        "C=UK,O=qiotwisted,CN=qemu-client",
        "C=UK,ST=London,L=City,O=A\\, B,OU=dev,CN=x\\+y",
        "DC=org,DC=example,UID=u1,EMAIL=a@b.example,serialNumber=42,CN=host",
        "cn=lower,o=case",
    ):
        cert = _self_signed(parse_dn(text))
        expected = text if text[0].isupper() else "CN=lower,O=case"
        assert dn_string(cert) == expected
        assert gnutls_get_dn(cert) == expected


def test_parse_dn_hex_escapes_and_multi_valued() -> None:
    name = parse_dn("CN=a\\2Cb,O=x+OU=y")
    cert = _self_signed(name)
    assert dn_string(cert) in ("CN=a\\,b,O=x+OU=y", "CN=a\\,b,OU=y+O=x")
    assert dn_string(cert) == gnutls_get_dn(cert)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty distinguished name"),
        ("CN", "expected NAME=VALUE"),
        ("XX=1", "unsupported attribute 'XX'"),
        ("telephoneNumber=1", "unsupported attribute"),
        ("CN=", "empty value for CN"),
        ("CN=a\\", "dangling backslash"),
        ("C=UKX", "bad value for C"),
        ("CN=a\\00b", "NUL character"),
        ("CN=\\ff", "not UTF-8"),
    ],
)
def test_parse_dn_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_dn(text)


# ---- what a real QEMU 7.2's authz sees ------------------------------------------------------


def _tls_handshake(
    creds: TLSCreds, port: int, deadline: float
) -> tuple[socket.socket, SSL.Connection]:
    """Connect and handshake with our client context (it verifies QEMU's server cert)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setblocking(True)
    conn = SSL.Connection(creds.context, sock)
    conn.set_connect_state()
    while True:
        try:
            conn.do_handshake()
            return sock, conn
        except SSL.WantReadError:
            left = deadline - time.monotonic()
            if left <= 0:
                sock.close()
                raise TimeoutError("TLS handshake with QEMU did not finish") from None
            select.select([sock], [], [], left)


def _authz_verdicts(log: Path, count: int, deadline: float) -> list[tuple[str, bool]]:
    """The (identity, allowed) pairs QEMU traced, once there are *count* of them."""
    pattern = re.compile(r"qauthz_is_allowed AuthZ \S+ check identity=(.*) allowed=(\d)")
    while True:
        found = [(m[1], m[2] == "1") for m in pattern.finditer(log.read_text(errors="replace"))]
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(
                f"QEMU logged no authz verdict:\n{log.read_text(errors='replace')}"
            )
        time.sleep(0.02)  # bounded poll of QEMU's trace log (deadline above)


@pytest.mark.qemu
def test_qemu_authz_sees_dn_string_and_agrees_with_our_rules(pki: TestPKI, tmp_path: Path) -> None:
    """A QEMU 7.2 TLS migration destination with authz objects, and our client certificate.

    QEMU traces the identity it checks (``qauthz_is_allowed``): it is exactly
    ``dn_string()`` of our multi-RDN certificate, and each authz object QEMU
    built from the same rules reaches the same verdict as ours.  Denied ones
    first: an allowed client that then sends nothing makes QEMU's load fail.
    """
    subject = "C=UK,ST=London,L=City,O=qiotwisted,OU=dev+UID=x1,CN=qemu-client"
    cert, key = pki.issue("client", subject=subject)
    cdir = pki.make_dir(None, {"ca-cert.pem": pki.ca_cert, "client-cert.pem": cert,
                               "client-key.pem": key})  # fmt: skip
    creds = TLSCreds.load_sync(cdir, "client")
    identity = dn_string(cert)
    assert identity == subject

    cases: list[tuple[str, dict[str, object], object]] = [
        ("simple-wrong", {"qom-type": "authz-simple", "identity": "WRONG"}, AuthzSimple("WRONG")),
        (
            "simple-rfc4514",
            {"qom-type": "authz-simple", "identity": cert.subject.rfc4514_string()},
            AuthzSimple(cert.subject.rfc4514_string()),
        ),
        (
            "list-deny-first",
            {
                "qom-type": "authz-list",
                "policy": "allow",
                "rules": [
                    {"match": "C=UK,ST=*,CN=qemu-?lient", "policy": "deny", "format": "glob"}
                ],
            },
            AuthzList([AuthzRule("C=UK,ST=*,CN=qemu-?lient", Policy.DENY, Format.GLOB)], "allow"),
        ),
        (
            "list-glob-allow",
            {
                "qom-type": "authz-list",
                "policy": "deny",
                "rules": [
                    {"match": "C=UK,*,CN=intruder", "policy": "deny", "format": "glob"},
                    {"match": "C=UK,ST=London,*,CN=qemu-*", "policy": "allow", "format": "glob"},
                ],
            },
            AuthzList(
                [
                    AuthzRule("C=UK,*,CN=intruder", Policy.DENY, Format.GLOB),
                    AuthzRule("C=UK,ST=London,*,CN=qemu-*", Policy.ALLOW, Format.GLOB),
                ]
            ),
        ),
    ]
    with bare_qemu(
        tmp_path,
        "-object", f"tls-creds-x509,id=tls0,endpoint=server,dir={pki.server_dir},verify-peer=on",
        "-trace", "qauthz_is_allowed", "-incoming", "defer",
    ) as (qmp, log):  # fmt: skip
        for i, (_name, props, _ours) in enumerate(cases):
            qmp.execute("object-add", {"id": f"auth{i}", **props})
        qmp.execute("migrate-set-parameters", {"tls-creds": "tls0"})
        qmp.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        port = None
        for _ in range(100):
            for addr in qmp.execute("query-migrate").get("socket-address", []):
                port = int(addr["port"])
            if port:
                break
            time.sleep(0.05)  # bounded poll of query-migrate for the port
        assert port
        for i, (name, _props, ours) in enumerate(cases):
            qmp.execute("migrate-set-parameters", {"tls-authz": f"auth{i}"})
            deadline = time.monotonic() + 15
            sock, _conn = _tls_handshake(creds, port, deadline)
            try:
                # QEMU checks authz when its side of the handshake is done.
                seen, allowed = _authz_verdicts(log, i + 1, deadline)[i]
            finally:
                sock.close()
            assert seen == identity, name
            assert ours.is_allowed(seen) is allowed, name  # type: ignore[attr-defined]  # every Authz kind has it
        text = log.read_text(errors="replace")
    assert f"TLS x509 authz check for {identity} is denied" in text
    verdicts = [v for _, v in _authz_verdicts(log, len(cases), time.monotonic())]
    assert verdicts == [False, False, False, True]


@pytest.mark.parametrize("value", ["0\x00", "0\x00a", "\x00", "ab\x00\x00"])
def test_dn_string_bmp_nul_handling_equals_gnutls(value: str) -> None:
    """Found by hypothesis: GnuTLS drops one trailing NUL of a BMPString."""
    cert = _self_signed(_name([A(NameOID.COMMON_NAME, value, T.BMPString)]))
    assert dn_string(cert) == gnutls_get_dn(cert)
