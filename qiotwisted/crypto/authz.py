"""QEMU's authorization objects: ``authz-simple``, ``authz-list``, ``authz-list-file``.

A TLS server (QEMU's ``tls-authz``) asks ``authz.is_allowed(identity)`` with the
client certificate's distinguished name in GnuTLS's form, e.g.
``C=UK,O=qiotwisted,CN=qemu-client`` (:func:`~qiotwisted.crypto.dn_string`;
note the order: certificate order, the reverse of RFC 4514).  Semantics follow
QEMU's ``authz/simple.c``, ``authz/list.c`` and ``authz/listfile.c``:

* ``AuthzSimple(identity)``: allowed iff the identity is exactly equal.
* ``AuthzList(rules, policy)``: the first rule that matches decides (its
  policy); no match means the list's default *policy*.  A rule matches
  ``exact``-ly (string equality) or as a ``glob`` with GLib's
  ``g_pattern_match_simple`` semantics: ``*`` is any run of characters (also
  none), ``?`` exactly one character, and nothing else is special (no
  ``[...]`` classes and no escapes, unlike :mod:`fnmatch`).  The defaults are
  QEMU's: a rule is ``exact``, a list's policy is ``deny``.
* ``AuthzListFile(filename)``: an ``AuthzList`` read from a JSON file
  ``{"policy": "deny", "rules": [{"match": "...", "policy": "allow", "format": "glob"}]}``.
  QEMU re-reads it on change with inotify; here :meth:`AuthzListFile.refresh`
  re-reads it on request.  As in QEMU, a file that fails to re-load denies
  everybody until a good one is loaded (fail closed).

Every check is logged at debug level as QEMU traces it
(``qauthz_simple_is_allowed``, ``qauthz_list_check_rule``,
``qauthz_list_default_policy``), and :meth:`Authz.check` returns the reason
for a denial, for the log line a server writes when it refuses a client.
Checks are pure and thread-safe.
"""

from __future__ import annotations

import enum
import json
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.logger import Logger

from ..errors import QIOError

__all__ = [
    "Authz",
    "AuthzDecision",
    "AuthzError",
    "AuthzList",
    "AuthzListFile",
    "AuthzRule",
    "AuthzSimple",
    "Format",
    "Policy",
    "pattern_match_simple",
]


class AuthzError(QIOError):
    """A bad authz definition, or an identity that was denied (see :meth:`Authz.require`)."""


class Policy(enum.StrEnum):
    """``QAuthZListPolicy``."""

    DENY = "deny"
    ALLOW = "allow"


class Format(enum.StrEnum):
    """``QAuthZListFormat``."""

    EXACT = "exact"
    GLOB = "glob"


def pattern_match_simple(pattern: str, string: str) -> bool:
    """GLib's ``g_pattern_match_simple``: ``*`` and ``?`` wildcards, whole-string match.

    ``?`` matches one character (a code point, as GLib's matches one UTF-8
    character).  Runs in O(len(pattern) * len(string)) at worst: the classic
    greedy match that backtracks only to the last ``*``.
    """
    p = s = 0
    star = -1  # index in pattern just after the last '*'
    star_s = 0  # where in string that '*' currently stops
    np, ns = len(pattern), len(string)
    while s < ns:
        if p < np and (pattern[p] == "?" or (pattern[p] != "*" and pattern[p] == string[s])):
            p += 1
            s += 1
        elif p < np and pattern[p] == "*":
            star = p + 1
            star_s = s
            p += 1
        elif star >= 0:
            star_s += 1
            s = star_s
            p = star
        else:
            return False
    while p < np and pattern[p] == "*":
        p += 1
    return p == np


@dataclass(frozen=True)
class AuthzDecision:
    """The outcome of :meth:`Authz.check`: ``allowed`` and a human ``reason``.

    ``rule`` is the index of the deciding rule (``None``: exact identity or
    the default policy).  ``bool(decision)`` is ``allowed``.
    """

    identity: str
    allowed: bool
    reason: str
    rule: int | None = None

    def __bool__(self) -> bool:
        return self.allowed


class Authz:
    """Base class: ``check(identity) -> AuthzDecision``; :meth:`is_allowed` is QEMU's call."""

    log = Logger()

    def check(self, identity: str) -> AuthzDecision:
        raise NotImplementedError

    def is_allowed(self, identity: str) -> bool:
        """``qauthz_is_allowed``: True if *identity* may connect.  Thread-safe."""
        return self.check(identity).allowed

    def require(self, identity: str) -> None:
        """Raise QEMU's ``TLS x509 authz check for IDENTITY is denied`` unless allowed."""
        decision = self.check(identity)
        if not decision.allowed:
            self.log.info(
                "authz denied {identity!r}: {reason}", identity=identity, reason=decision.reason
            )
            raise AuthzError(f"TLS x509 authz check for {identity} is denied")


class AuthzSimple(Authz):
    """``authz-simple``: exactly one identity is allowed."""

    def __init__(self, identity: str) -> None:
        if identity is None:  # QEMU: qauthz_simple_complete
            raise AuthzError("The 'identity' property must be set")
        self.identity = identity

    def check(self, identity: str) -> AuthzDecision:
        allowed = identity == self.identity
        self.log.debug(
            "qauthz_simple_is_allowed want={want!r} got={got!r}",
            event="qauthz_simple_is_allowed", want=self.identity, got=identity,
        )  # fmt: skip
        reason = (
            "identity matches"
            if allowed
            else f"identity {identity!r} is not the allowed identity {self.identity!r}"
        )
        return AuthzDecision(identity, allowed, reason)

    def __repr__(self) -> str:
        return f"AuthzSimple({self.identity!r})"


@dataclass(frozen=True)
class AuthzRule:
    """``QAuthZListRule``: *match* with *format*, deciding *policy* when it matches."""

    match: str
    policy: Policy = Policy.DENY
    format: Format = Format.EXACT

    def __post_init__(self) -> None:
        # Accept the strings QEMU's JSON uses ("allow", "glob") as well as the enums.
        object.__setattr__(self, "policy", _enum(Policy, self.policy, "policy"))
        object.__setattr__(self, "format", _enum(Format, self.format, "format"))
        if not isinstance(self.match, str):
            raise AuthzError("Invalid parameter type for 'match', expected: string")

    def matches(self, identity: str) -> bool:
        if self.format is Format.GLOB:
            return pattern_match_simple(self.match, identity)
        return self.match == identity

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AuthzRule:
        """From QEMU's JSON form ``{"match": ..., "policy": ..., "format": ...}``."""
        if not isinstance(data, Mapping):
            raise AuthzError("Invalid parameter type for 'rules', expected: object")
        unknown = set(data) - {"match", "policy", "format"}
        if unknown:
            raise AuthzError(f"Parameter '{sorted(unknown)[0]}' is unexpected")
        if "match" not in data:
            raise AuthzError("Parameter 'match' is missing")
        if "policy" not in data:
            raise AuthzError("Parameter 'policy' is missing")
        return cls(data["match"], data["policy"], data.get("format", Format.EXACT))

    def to_dict(self) -> dict[str, str]:
        return {"match": self.match, "policy": self.policy.value, "format": self.format.value}


def _enum(kind: type[Policy] | type[Format], value: Any, name: str) -> Any:
    try:
        return kind(value)
    except ValueError:
        raise AuthzError(f"Parameter '{name}' does not accept value {value!r}") from None


class AuthzList(Authz):
    """``authz-list``: ordered rules, first match wins, else the default *policy*.

    Rule editing mirrors ``qauthz_list_append_rule`` / ``insert_rule`` /
    ``delete_rule`` and returns the index they return.  Edits and checks may
    happen from several threads (a lock guards the rule list).
    """

    def __init__(
        self,
        rules: Iterable[AuthzRule | Mapping[str, Any]] = (),
        policy: Policy | str = Policy.DENY,
    ) -> None:
        self.policy: Policy = _enum(Policy, policy, "policy")
        self._rules = [r if isinstance(r, AuthzRule) else AuthzRule.from_dict(r) for r in rules]
        self._lock = threading.Lock()

    @property
    def rules(self) -> tuple[AuthzRule, ...]:
        return tuple(self._rules)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AuthzList:
        """From QEMU's JSON object ``{"policy": ..., "rules": [...]}`` (both optional)."""
        if not isinstance(data, Mapping):
            raise AuthzError("The authz rules must be a JSON object")
        unknown = set(data) - {"policy", "rules"}
        if unknown:
            raise AuthzError(f"Parameter '{sorted(unknown)[0]}' is unexpected")
        rules = data.get("rules", [])
        if not isinstance(rules, list):
            raise AuthzError("Invalid parameter type for 'rules', expected: array")
        return cls([AuthzRule.from_dict(r) for r in rules], data.get("policy", Policy.DENY))

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy.value, "rules": [r.to_dict() for r in self.rules]}

    def append_rule(
        self, match: str, policy: Policy | str, format: Format | str = Format.EXACT
    ) -> int:
        with self._lock:
            self._rules.append(AuthzRule(match, Policy(policy), Format(format)))
            return len(self._rules) - 1

    def insert_rule(
        self, match: str, policy: Policy | str, format: Format | str, index: int
    ) -> int:
        with self._lock:
            index = max(0, min(index, len(self._rules)))
            self._rules.insert(index, AuthzRule(match, Policy(policy), Format(format)))
            return index

    def delete_rule(self, match: str) -> int:
        """Remove the first rule whose *match* is *match*; its index, or -1."""
        with self._lock:
            for i, rule in enumerate(self._rules):
                if rule.match == match:
                    del self._rules[i]
                    return i
            return -1

    def check(self, identity: str) -> AuthzDecision:
        for i, rule in enumerate(self.rules):
            self.log.debug(
                "qauthz_list_check_rule match={match!r} identity={identity!r} "
                "format={rule_format} policy={policy}",
                event="qauthz_list_check_rule", match=rule.match, identity=identity,
                rule_format=rule.format.value, policy=rule.policy.value,
            )  # fmt: skip
            if rule.matches(identity):
                allowed = rule.policy is Policy.ALLOW
                return AuthzDecision(
                    identity,
                    allowed,
                    f"rule {i} ({rule.format.value} {rule.match!r}) matched: {rule.policy.value}",
                    rule=i,
                )
        self.log.debug(
            "qauthz_list_default_policy identity={identity!r} policy={policy}",
            event="qauthz_list_default_policy", identity=identity, policy=self.policy.value,
        )  # fmt: skip
        return AuthzDecision(
            identity,
            self.policy is Policy.ALLOW,
            f"no rule matched; default policy: {self.policy.value}",
        )

    def __repr__(self) -> str:
        return f"AuthzList({list(self.rules)!r}, policy={self.policy.value!r})"


class AuthzListFile(Authz):
    """``authz-list-file``: an :class:`AuthzList` loaded from a JSON file.

    Reading happens in the constructor and in :meth:`refresh` (small files;
    call them from a worker thread if the disk may be slow).  A file that
    cannot be read or parsed raises :class:`AuthzError` with QEMU's wording
    (``Unable to read 'PATH': ...``, ``File 'PATH' must contain a JSON object``).
    """

    def __init__(self, filename: str | os.PathLike[str]) -> None:
        if not os.fspath(filename):
            raise AuthzError("filename not provided")
        self.filename = Path(filename)
        self.list: AuthzList | None = self._load()
        self.error: str | None = None

    def _load(self) -> AuthzList:
        try:
            text = self.filename.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise AuthzError(f"Unable to read '{self.filename}': {reason}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise AuthzError(f"JSON parse error in '{self.filename}': {exc}") from None
        if not isinstance(data, dict):
            raise AuthzError(f"File '{self.filename}' must contain a JSON object")
        return AuthzList.from_dict(data)

    def refresh(self) -> bool:
        """Re-read the file.  On error log it, deny everybody from now on, return False."""
        try:
            self.list, self.error = self._load(), None
        except AuthzError as exc:
            self.list, self.error = None, str(exc)
            self.log.error("authz-list-file refresh failed: {error}", error=self.error)
            return False
        return True

    def check(self, identity: str) -> AuthzDecision:
        rules = self.list
        if rules is None:
            return AuthzDecision(identity, False, f"no rules loaded: {self.error}")
        return rules.check(identity)

    def __repr__(self) -> str:
        return f"AuthzListFile({str(self.filename)!r})"
