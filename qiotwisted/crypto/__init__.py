"""TLS credentials in QEMU's ``tls-creds-x509`` layout, authz rules, and PKI generation.

* :class:`TLSCreds` loads ``ca-cert.pem``, ``server-cert.pem``, ... with QEMU's
  rules and sanity checks, in a worker thread (:meth:`TLSCreds.load`), and
  builds the pyOpenSSL context a TLS channel needs.
* :class:`AuthzSimple`, :class:`AuthzList`, :class:`AuthzListFile`: QEMU's
  ``authz-simple``, ``authz-list`` and ``authz-list-file``, matched against
  :func:`dn_string` of the peer certificate (GnuTLS's DN form, which QEMU uses).
* :func:`generate_pki` makes a CA, a server and a client that QEMU 7.2 accepts
  (``qio pki DIR`` on the command line).
"""

from ._dn import dn_string, name_der_dn_string, parse_dn
from .authz import (
    Authz,
    AuthzDecision,
    AuthzError,
    AuthzList,
    AuthzListFile,
    AuthzRule,
    AuthzSimple,
    Format,
    Policy,
    pattern_match_simple,
)
from .creds import (
    DEFAULT_PRIORITY,
    PRIORITY_QEMU_RECEIVER,
    Endpoint,
    TLSCreds,
    TLSCredsError,
    TLSPriority,
    check_hostname,
    parse_priority,
)
from .pki import GeneratedPKI, PKIError, generate_pki, generate_pki_sync

__all__ = [
    "DEFAULT_PRIORITY",
    "PRIORITY_QEMU_RECEIVER",
    "Authz",
    "AuthzDecision",
    "AuthzError",
    "AuthzList",
    "AuthzListFile",
    "AuthzRule",
    "AuthzSimple",
    "Endpoint",
    "Format",
    "GeneratedPKI",
    "PKIError",
    "Policy",
    "TLSCreds",
    "TLSCredsError",
    "TLSPriority",
    "check_hostname",
    "dn_string",
    "generate_pki",
    "generate_pki_sync",
    "name_der_dn_string",
    "parse_dn",
    "parse_priority",
    "pattern_match_simple",
]
