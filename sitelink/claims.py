"""The claims of a command or management request (contract §5), their limits and rules.

Claim rules (any violation is ``malformed``)
--------------------------------------------
``jti`` 1–64 printable characters; ``aud`` a string; ``iat``, ``exp`` and optional ``nbf``
integers in 0 … 2**63-1 (a JSON ``true`` or ``1.0`` is not an integer) with
``exp >= iat``; ``cmd`` one of :data:`~sitelink.codes.COMMANDS`
(:data:`~sitelink.codes.MGMT_COMMANDS` for ``kind="mgmt"``); ``unit`` 1–64 printable
characters, required for commands and optional for management requests; ``dur`` integer
1–3600, ``unlock`` only; ``ver`` integer 0 … 2**63-1, required on
``lockout``/``clear_lockout`` and refused elsewhere; ``override`` boolean, ``unlock``
only; ``reason`` ≤ 200 printable characters, ``unlock`` only, and not blank when
``override`` is true; ``contact`` 1–64 and ``actor`` 1–100 printable characters; ``args``
an object, management requests only.  ``null`` is never a stand-in for an absent claim.
Integers are capped at 2**63-1 so that every accepted number fits a SQLite INTEGER
downstream.  Unknown claims are ignored, for forward compatibility.

:func:`parse_claims` applies these rules to parsed JSON and gives a :class:`Command`;
:class:`Claims` is the signer's side: the same fields, written in one order, and
:meth:`Claims.check` runs the very same rules before anything is signed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Literal

from sitelink.codes import COMMANDS, MGMT_COMMANDS
from sitelink.errors import ClaimError, json_kind, show

__all__ = [
    "ACTOR_MAX",
    "CONTACT_MAX",
    "DUR_MAX",
    "DUR_MIN",
    "INT_MAX",
    "JTI_MAX",
    "MAX_COMMAND_BYTES",
    "MAX_MGMT_BYTES",
    "REASON_MAX",
    "UNIT_MAX",
    "Claims",
    "Command",
    "Kind",
    "parse_claims",
]

#: Contract §5: a command is at most 4 KiB.
MAX_COMMAND_BYTES: Final = 4096
#: A management request may carry a whole config file (``config.set``): at most 60 KiB,
#: under the site broker's ``max_packet_size 65536`` (deploy/mosquitto/site-broker.conf).
MAX_MGMT_BYTES: Final = 60 * 1024
#: ``jti``: contract §5, "≤ 64 chars".
JTI_MAX: Final = 64
#: ``unit``: a Stora unit id.
UNIT_MAX: Final = 64
#: ``contact``: a Stora contact id.
CONTACT_MAX: Final = 64
#: ``actor``: a short text for the audit trail.
ACTOR_MAX: Final = 100
#: ``reason`` of an override.
REASON_MAX: Final = 200
#: ``dur``: seconds until relock (contract §5: 1–3600).
DUR_MIN: Final = 1
DUR_MAX: Final = 3600
#: The largest integer claim: SQLite INTEGER.
INT_MAX: Final = 2**63 - 1

#: What a token is verified as: a command (``P/S/cmd``) or a management request
#: (``P/S/mgmt``).
Kind = Literal["cmd", "mgmt"]

_MISSING: Final = object()


def _empty_args() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Command:
    """A verified command or management request; every field has been type-checked.

    ``dur`` is ``None`` when the unlock takes the lock's ``unlock_seconds``.  ``args`` is
    read-only all the way down (objects are mapping proxies, arrays are tuples); use
    ``json.dumps(..., default=dict)`` or copy it to serialize.  ``cmd`` is the claim's
    plain string; it compares equal to its :class:`~sitelink.codes.Cmd` or
    :class:`~sitelink.codes.MgmtCmd` member.
    """

    jti: str
    cmd: str
    unit: str | None
    kid: str
    iat: int
    exp: int
    dur: int | None = None
    ver: int | None = None
    override: bool = False
    reason: str | None = None
    contact: str | None = None
    actor: str | None = None
    # Left out of the hash: a mapping proxy is not hashable.
    args: Mapping[str, Any] = field(default_factory=_empty_args, hash=False)


@dataclass(frozen=True, slots=True)
class Claims:
    """The claims a signer puts in a token (the relay's side of :class:`Command`).

    :meth:`as_dict` writes them in this order and leaves out what is absent (``None``,
    ``override`` false, ``args`` ``None``), as the gateway expects: ``null`` is never a
    stand-in for an absent claim.
    """

    jti: str
    aud: str
    iat: int
    exp: int
    cmd: str
    unit: str | None = None
    dur: int | None = None
    ver: int | None = None
    override: bool = False
    reason: str | None = None
    contact: str | None = None
    actor: str | None = None
    nbf: int | None = None
    args: Mapping[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """The claims object of the token."""
        # str(): a Cmd / MgmtCmd member becomes the plain string a parsed token holds.
        out: dict[str, Any] = {"jti": self.jti, "aud": self.aud, "iat": self.iat,
                               "exp": self.exp, "cmd": str(self.cmd)}
        for name in ("unit", "nbf", "dur", "ver"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.override:
            out["override"] = True
        for name in ("reason", "contact", "actor"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.args is not None:
            out["args"] = dict(self.args)
        return out

    def check(self, kind: Kind = "cmd") -> None:
        """Raise :class:`~sitelink.errors.ClaimError` when a gateway would refuse these
        claims as ``malformed`` (the rules of :func:`parse_claims`, nothing else: site,
        time and unit are judged by the gateway)."""
        parse_claims(self.as_dict(), "", kind)


def parse_claims(claims: Any, kid: str, kind: Kind) -> Command:
    """The :class:`Command` in parsed ``claims`` (see the module docstring for the
    rules); raises :class:`~sitelink.errors.ClaimError` naming the first rule broken."""
    if not isinstance(claims, dict):
        raise ClaimError(f"the claims are {json_kind(claims)}, not a JSON object")
    jti = _required_text(claims, "jti", JTI_MAX)
    _required_text(claims, "aud", None, min_len=0, printable=False)
    iat = _required_int(claims, "iat", 0, INT_MAX)
    exp = _required_int(claims, "exp", 0, INT_MAX)
    _optional_int(claims, "nbf", 0, INT_MAX)
    if exp < iat:
        raise ClaimError(f"exp {exp} is before iat {iat}")
    commands = COMMANDS if kind == "cmd" else MGMT_COMMANDS
    cmd = claims.get("cmd", _MISSING)
    if type(cmd) is not str or cmd not in commands:
        allowed = ", ".join(sorted(commands))
        raise ClaimError(f"claim 'cmd' must be one of {allowed}; found {show(cmd)}")
    if kind == "cmd":
        unit: str | None = _required_text(claims, "unit", UNIT_MAX)
    else:
        unit = _optional_text(claims, "unit", UNIT_MAX)
    dur: int | None = None
    ver: int | None = None
    override = False
    reason: str | None = None
    if cmd == "unlock":
        dur = _optional_int(claims, "dur", DUR_MIN, DUR_MAX)
        value = claims.get("override", False)
        if type(value) is not bool:
            raise ClaimError(f"claim 'override' must be true or false, found "
                             f"{json_kind(value)}")
        override = value
        reason = _optional_text(claims, "reason", REASON_MAX, min_len=0)
        if override and (reason is None or not reason.strip()):
            raise ClaimError("override requires a non-blank 'reason'")
    else:
        for name in ("dur", "override", "reason"):
            _absent(claims, name, cmd)
    if cmd in ("lockout", "clear_lockout"):
        ver = _required_int(claims, "ver", 0, INT_MAX)
    else:
        _absent(claims, "ver", cmd)
    contact = _optional_text(claims, "contact", CONTACT_MAX)
    actor = _optional_text(claims, "actor", ACTOR_MAX)
    args: Mapping[str, Any] = _empty_args()
    if kind == "mgmt":
        raw_args = claims.get("args", _MISSING)
        if raw_args is not _MISSING:
            if not isinstance(raw_args, dict):
                raise ClaimError(f"claim 'args' must be an object, found {json_kind(raw_args)}")
            args = _freeze(raw_args)
    else:
        _absent(claims, "args", cmd)
    return Command(jti=jti, cmd=cmd, unit=unit, kid=kid, iat=iat, exp=exp, dur=dur, ver=ver,
                   override=override, reason=reason, contact=contact, actor=actor, args=args)


# ---------------------------------------------------------------------- helpers


def _required(claims: Mapping[str, Any], name: str) -> Any:
    value = claims.get(name, _MISSING)
    if value is _MISSING:
        raise ClaimError(f"claim {name!r} is missing")
    return value


def _required_int(claims: Mapping[str, Any], name: str, lo: int, hi: int) -> int:
    value = _required(claims, name)
    # type() rather than isinstance(): JSON true is a Python bool, which is an int.
    if type(value) is not int:
        raise ClaimError(f"claim {name!r} must be an integer, found {json_kind(value)}")
    if not lo <= value <= hi:
        raise ClaimError(f"claim {name!r} = {show(value)} is outside {lo}–{hi}")
    return value


def _optional_int(claims: Mapping[str, Any], name: str, lo: int, hi: int) -> int | None:
    return _required_int(claims, name, lo, hi) if name in claims else None


def _required_text(
    claims: Mapping[str, Any], name: str, max_len: int | None, *, min_len: int = 1,
    printable: bool = True,
) -> str:
    value = _required(claims, name)
    if type(value) is not str:
        raise ClaimError(f"claim {name!r} must be a string, found {json_kind(value)}")
    if len(value) < min_len or (max_len is not None and len(value) > max_len):
        limit = f"{min_len}–{max_len}" if max_len is not None else f"at least {min_len}"
        raise ClaimError(f"claim {name!r} has {len(value)} characters, not {limit}")
    # Control characters would split or forge audit log lines downstream.
    if printable and not value.isprintable():
        raise ClaimError(f"claim {name!r} holds control or unprintable characters")
    return value


def _optional_text(
    claims: Mapping[str, Any], name: str, max_len: int, *, min_len: int = 1
) -> str | None:
    return _required_text(claims, name, max_len, min_len=min_len) if name in claims else None


def _absent(claims: Mapping[str, Any], name: str, cmd: str) -> None:
    if name in claims:
        raise ClaimError(f"claim {name!r} is not allowed on {cmd!r}")


def _freeze(value: Any) -> Any:
    """A read-only deep copy of parsed JSON: objects to mapping proxies, arrays to tuples.

    Recursion is safe here: the strict JSON reader has bounded the depth.
    """
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value
