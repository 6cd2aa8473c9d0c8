"""Distinguished names exactly as QEMU's authz sees them, and a parser for ``--client-dn``.

QEMU hands the peer's identity to ``authz-simple``/``authz-list`` as the string
``gnutls_x509_crt_get_dn()`` returns.  That function prints the RDNs in
**certificate order** (``C=UK,O=qiotwisted,CN=qemu-client``), which is *not*
RFC 4514 order: ``certtool -i``'s ``Subject:`` line, ``openssl x509 -subject``
with ``-nameopt RFC2253`` and ``cryptography``'s ``rfc4514_string()`` all print
the reverse (``CN=...,O=...,C=...``).  An authz rule written from any of those
never matches.  :func:`dn_string` reproduces GnuTLS 3.7's output byte for byte
(the library QEMU 7.2 links against); the tests compare it with the real
``libgnutls`` on certificates with many attribute kinds.

The rules, as GnuTLS 3.7.9 applies them (``lib/x509/dn.c``, ``lib/x509/common.c``):

* RDNs joined by ``,`` in certificate order; the attributes of a multi-valued
  RDN joined by ``+`` in their DER order.
* A known attribute type prints as its short name (table below), any other as
  its dotted OID.
* Known types decode their value: "directory strings" (CN, O, OU, ...) accept
  UTF8String, PrintableString, BMPString (converted to UTF-8) and TeletexString
  (printed as text when it is printable ASCII); the others accept one string type
  (C and serialNumber: PrintableString; DC and EMAIL: IA5String; ...).  A
  decoded value is escaped RFC 4514 style: ``, + " \\ < > ;`` anywhere, ``#`` or
  space in first position and a space in last position get a backslash.
* A TeletexString with other bytes, or a UniversalString, prints as ``\\#``
  and the hex of its content bytes (GnuTLS hex-encodes, then escapes the ``#``).
* Everything else (unknown OIDs, a type the attribute does not accept, a value
  holding a NUL) prints as ``#`` and the lowercase hex of the whole DER value.

This module is sans-IO: plain functions over bytes and ``cryptography`` objects.
"""

from __future__ import annotations

from typing import Final

from cryptography import x509
from cryptography.x509.oid import ObjectIdentifier

__all__ = ["dn_string", "name_der_dn_string", "parse_dn"]

# Universal ASN.1 tags of the string types that can appear in a name.
_UTF8: Final = 0x0C
_NUMERIC: Final = 0x12
_PRINTABLE: Final = 0x13
_T61: Final = 0x14
_IA5: Final = 0x16
_UNIVERSAL: Final = 0x1C
_BMP: Final = 0x1E
_OCTET: Final = 0x04
_SEQUENCE: Final = 0x30
_SET: Final = 0x31
_OID: Final = 0x06

# "Directory string" attributes: a CHOICE of the five string types below.
_DIRECTORY: Final = -1
_DIRECTORY_TAGS: Final = frozenset({_UTF8, _PRINTABLE, _T61, _UNIVERSAL, _BMP})
# challengePassword: CHOICE { PrintableString, UTF8String }.
_CHALLENGE: Final = -2

# GnuTLS 3.7.9's table of printable DN attributes: OID -> (name, value kind).
# The names were read back from the library with gnutls_x509_dn_oid_name();
# entries without a name print their OID.
_ATTRIBUTES: Final[dict[str, tuple[str, int]]] = {
    "2.5.4.3": ("CN", _DIRECTORY),
    "2.5.4.4": ("surName", _DIRECTORY),
    "2.5.4.5": ("serialNumber", _PRINTABLE),
    "2.5.4.6": ("C", _PRINTABLE),
    "2.5.4.7": ("L", _DIRECTORY),
    "2.5.4.8": ("ST", _DIRECTORY),
    "2.5.4.9": ("street", _DIRECTORY),
    "2.5.4.10": ("O", _DIRECTORY),
    "2.5.4.11": ("OU", _DIRECTORY),
    "2.5.4.12": ("title", _DIRECTORY),
    "2.5.4.13": ("description", _DIRECTORY),
    "2.5.4.15": ("businessCategory", _DIRECTORY),
    "2.5.4.17": ("postalCode", _DIRECTORY),
    "2.5.4.20": ("telephoneNumber", _PRINTABLE),
    "2.5.4.41": ("name", _DIRECTORY),
    "2.5.4.42": ("givenName", _DIRECTORY),
    "2.5.4.43": ("initials", _DIRECTORY),
    "2.5.4.44": ("generationQualifier", _DIRECTORY),
    "2.5.4.46": ("dnQualifier", _PRINTABLE),
    "2.5.4.65": ("pseudonym", _DIRECTORY),
    "1.3.6.1.4.1.311.60.2.1.1": ("jurisdictionOfIncorporationLocalityName", _DIRECTORY),
    "1.3.6.1.4.1.311.60.2.1.2": ("jurisdictionOfIncorporationStateOrProvinceName", _DIRECTORY),
    "1.3.6.1.4.1.311.60.2.1.3": ("jurisdictionOfIncorporationCountryName", _PRINTABLE),
    "0.9.2342.19200300.100.1.1": ("UID", _DIRECTORY),
    "0.9.2342.19200300.100.1.25": ("DC", _IA5),
    "1.2.840.113549.1.9.1": ("EMAIL", _IA5),
    "1.2.840.113549.1.9.7": ("1.2.840.113549.1.9.7", _CHALLENGE),
    "1.2.840.113549.1.9.20": ("1.2.840.113549.1.9.20", _BMP),
    "1.2.840.113549.1.9.21": ("1.2.840.113549.1.9.21", _OCTET),
    "1.3.6.1.5.5.7.9.2": ("placeOfBirth", _DIRECTORY),
    "1.3.6.1.5.5.7.9.3": ("gender", _PRINTABLE),
    "1.3.6.1.5.5.7.9.4": ("countryOfCitizenship", _PRINTABLE),
    "1.3.6.1.5.5.7.9.5": ("countryOfResidence", _PRINTABLE),
    "1.2.643.100.1": ("OGRN", _NUMERIC),
    "1.2.643.100.3": ("SNILS", _NUMERIC),
    "1.2.643.100.5": ("OGRNIP", _NUMERIC),
    "1.2.643.3.131.1.1": ("INN", _NUMERIC),
    "1.3.6.1.5.5.7.8.5": ("XmppAddr", _UTF8),
    "1.2.840.113556.1.4.656": ("userPrincipalName", _DIRECTORY),
}


class _DERError(ValueError):
    pass


def _tlv(data: bytes, pos: int, end: int | None = None) -> tuple[int, int, int]:
    """Read one DER TLV at *pos* (before *end*): ``(tag, content_start, content_end)``."""
    if end is None:
        end = len(data)
    if pos + 2 > end:
        raise _DERError("truncated DER element")
    tag = data[pos]
    pos += 1
    if tag & 0x1F == 0x1F:  # high tag number: base-128 continuation bytes
        while pos < end and data[pos] & 0x80:
            pos += 1
        pos += 1
    if pos >= end:
        raise _DERError("truncated DER element")
    first = data[pos]
    pos += 1
    if first < 0x80:
        length = first
    elif first == 0x80 or first > 0x84:
        raise _DERError("unsupported DER length form")
    else:
        count = first & 0x7F
        if pos + count > end:
            raise _DERError("truncated DER length")
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    if pos + length > end:
        raise _DERError("DER element runs past its container")
    return tag, pos, pos + length


def _children(data: bytes, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """The TLVs inside ``data[start:end]``: ``(tag, tlv_start, content_start, content_end)``."""
    out = []
    pos = start
    while pos < end:
        tag, cstart, cend = _tlv(data, pos, end)
        out.append((tag, pos, cstart, cend))
        pos = cend
    return out


def _oid_text(content: bytes) -> str:
    if not content:
        raise _DERError("empty OID")
    arcs: list[int] = []
    value = 0
    for byte in content:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    if content[-1] & 0x80:
        raise _DERError("truncated OID")
    first = arcs[0]
    head = [min(first // 40, 2), first - 40 * min(first // 40, 2)]
    return ".".join(str(a) for a in head + arcs[1:])


def _escape(text: str) -> str:
    out = []
    last = len(text) - 1
    for i, ch in enumerate(text):
        if ch in ',+"\\<>;' or (i == 0 and ch in "# ") or (i == last and ch == " "):
            out.append("\\")
        out.append(ch)
    return "".join(out)


def _hex(raw: bytes) -> str:
    return "#" + raw.hex()


def _decode_string(tag: int, content: bytes) -> str | None:
    """Text of a string value GnuTLS prints as text; None for "print as hex"."""
    try:
        if tag == _BMP:
            text = content.decode("utf-16-be")
            # GnuTLS's UCS-2 conversion drops one trailing NUL character (it
            # reads it as a terminator): "0\x00" prints as "0", while "\x00"
            # and "ab\x00\x00" still print as hex (checked against libgnutls).
            if len(text) > 1 and text.endswith("\x00"):
                text = text[:-1]
        elif tag in (_UTF8, _PRINTABLE, _IA5, _NUMERIC, _OCTET):
            text = content.decode("utf-8")
        else:
            return None
    except UnicodeDecodeError:
        return None
    # GnuTLS refuses a decoded string holding a NUL (it prints the value as hex).
    return None if "\x00" in text else text


def _value_string(oid: str, value_tlv: bytes) -> str:
    entry = _ATTRIBUTES.get(oid)
    if entry is None:
        return _hex(value_tlv)
    kind = entry[1]
    try:
        tag, cstart, cend = _tlv(value_tlv, 0)
    except _DERError:
        return _hex(value_tlv)
    content = value_tlv[cstart:cend]
    if kind == _DIRECTORY:
        if tag not in _DIRECTORY_TAGS:
            return _hex(value_tlv)
        if tag == _UNIVERSAL or (tag == _T61 and not all(0x20 <= b < 0x7F for b in content)):
            # GnuTLS prints a TeletexString as text only when it is printable
            # ASCII; otherwise (and always for a UniversalString) it hex-encodes
            # the content with a '#', then escapes that '#'.
            return "\\" + _hex(content)
        text = content.decode("ascii") if tag == _T61 else _decode_string(tag, content)
    elif kind == _CHALLENGE:
        text = _decode_string(tag, content) if tag in (_PRINTABLE, _UTF8) else None
    else:
        text = _decode_string(tag, content) if tag == kind else None
    if text is None:
        return _hex(value_tlv)
    return _escape(text)


def name_der_dn_string(name_der: bytes) -> str:
    """The GnuTLS/QEMU string form of a DER-encoded X.501 ``Name``.

    Raises :class:`ValueError` if *name_der* is not a well-formed ``Name``.
    An empty name gives ``""`` (GnuTLS reports "requested data not available",
    and QEMU then refuses the peer).
    """
    try:
        tag, start, end = _tlv(name_der, 0)
        if tag != _SEQUENCE:
            raise _DERError("a Name is a SEQUENCE")
        rdns = []
        for rtag, _rpos, rstart, rend in _children(name_der, start, end):
            if rtag != _SET:
                raise _DERError("an RDN is a SET")
            parts = []
            for atag, _apos, astart, aend in _children(name_der, rstart, rend):
                if atag != _SEQUENCE:
                    raise _DERError("an attribute is a SEQUENCE")
                fields = _children(name_der, astart, aend)
                if len(fields) != 2 or fields[0][0] != _OID:
                    raise _DERError("an attribute is SEQUENCE { OID, value }")
                oid = _oid_text(name_der[fields[0][2] : fields[0][3]])
                value_tlv = name_der[fields[1][1] : fields[1][3]]
                label = _ATTRIBUTES.get(oid, (oid, 0))[0]
                parts.append(f"{label}={_value_string(oid, value_tlv)}")
            rdns.append("+".join(parts))
    except _DERError as exc:
        raise ValueError(f"malformed distinguished name: {exc}") from None
    return ",".join(rdns)


def _tbs_names(tbs: bytes) -> tuple[bytes, bytes]:
    """``(issuer_der, subject_der)`` of a DER ``TBSCertificate``."""
    tag, start, end = _tlv(tbs, 0)
    if tag != _SEQUENCE:
        raise _DERError("a TBSCertificate is a SEQUENCE")
    fields = _children(tbs, start, end)
    if fields and fields[0][0] == 0xA0:  # [0] EXPLICIT version
        fields = fields[1:]
    # serialNumber, signature, issuer, validity, subject, ...
    if len(fields) < 5:
        raise _DERError("truncated TBSCertificate")
    issuer, subject = fields[2], fields[4]
    return tbs[issuer[1] : issuer[3]], tbs[subject[1] : subject[3]]


def dn_string(cert: x509.Certificate, *, issuer: bool = False) -> str:
    """The subject (or issuer) DN of *cert* as QEMU 7.2's authz sees it.

    Equal to ``gnutls_x509_crt_get_dn()`` (``get_issuer_dn()`` with
    ``issuer=True``), e.g. ``C=UK,O=qiotwisted,CN=qemu-client``: certificate
    order, not RFC 4514 order.  Read from the certificate's own DER bytes, so
    the attribute order and string types are the ones on the wire.
    """
    try:
        issuer_der, subject_der = _tbs_names(cert.tbs_certificate_bytes)
    except _DERError as exc:
        raise ValueError(f"malformed certificate: {exc}") from None
    return name_der_dn_string(issuer_der if issuer else subject_der)


# ---- parsing "C=UK,O=X,CN=Y" ------------------------------------------------

# Attributes --client-dn accepts: those whose default encoding in cryptography
# (PrintableString for C/serialNumber/dnQualifier/jurisdiction C, IA5String for
# DC/EMAIL, UTF8String otherwise) is one GnuTLS prints back as text, so the
# string a user types is the string QEMU's authz will see.
_PARSEABLE: Final = {
    name.lower(): oid
    for oid, (name, kind) in _ATTRIBUTES.items()
    if kind in (_DIRECTORY, _IA5)
    or oid in ("2.5.4.6", "2.5.4.5", "2.5.4.46", "1.3.6.1.4.1.311.60.2.1.3")
}
_PARSEABLE.update({"emailaddress": "1.2.840.113549.1.9.1", "sn": "2.5.4.4", "gn": "2.5.4.42"})


def _split_unescaped(text: str, sep: str) -> list[str]:
    parts, cur, i = [], [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            cur.append(text[i : i + 2])
            i += 2
            continue
        if ch == sep:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


def _unescape(value: str) -> str:
    out = bytearray()
    i = 0
    while i < len(value):
        ch = value[i]
        if ch != "\\":
            out += ch.encode()
            i += 1
            continue
        if i + 1 >= len(value):
            raise ValueError(f"dangling backslash in {value!r}")
        pair = value[i + 1 : i + 3]
        if len(pair) == 2 and all(c in "0123456789abcdefABCDEF" for c in pair):
            out.append(int(pair, 16))
            i += 3
        else:
            out += value[i + 1].encode()
            i += 2
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"hex escapes in {value!r} are not UTF-8") from None


def parse_dn(text: str) -> x509.Name:
    """Parse ``"C=UK,O=qiotwisted,CN=qemu-client"`` into a :class:`x509.Name`.

    The string is read in the order QEMU prints DNs (certificate order: the
    first RDN is outermost), so ``dn_string()`` of a certificate issued with the
    result gives *text* back (up to the order inside a multi-valued ``+`` RDN,
    which DER sorts).  Attribute names are GnuTLS's, case-insensitive (``C``,
    ``ST``, ``L``, ``O``, ``OU``, ``CN``, ``DC``, ``UID``, ``EMAIL``,
    ``serialNumber``, ``title``, ...).  Escapes: ``\\,`` ``\\+`` ``\\\\`` etc.
    and ``\\XX`` hex pairs.  Raises :class:`ValueError` with the reason.
    """
    if not text.strip():
        raise ValueError("empty distinguished name")
    rdns = []
    for rdn_text in _split_unescaped(text, ","):
        attrs = []
        for item in _split_unescaped(rdn_text, "+"):
            key, eq, raw_value = item.partition("=")
            key = key.strip()
            if not eq or not key:
                raise ValueError(f"expected NAME=VALUE in distinguished name, got {item!r}")
            oid = _PARSEABLE.get(key.lower())
            if oid is None:
                known = ", ".join(sorted({_ATTRIBUTES[o][0] for o in _PARSEABLE.values()}))
                raise ValueError(
                    f"unsupported attribute {key!r} in distinguished name (use {known})"
                )
            value = _unescape(raw_value)
            if not value:
                raise ValueError(f"empty value for {key} in distinguished name")
            if "\x00" in value:
                raise ValueError(f"NUL character in the value of {key}")
            try:
                attrs.append(x509.NameAttribute(ObjectIdentifier(oid), value))
            except ValueError as exc:
                raise ValueError(f"bad value for {key}: {exc}") from None
        rdns.append(x509.RelativeDistinguishedName(attrs))
    return x509.Name(rdns)
