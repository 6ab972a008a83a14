"""Verify a signed command before anything touches hardware (contract §5).

A command is a JWS compact serialization (``header.payload.signature``, base64url, no
padding) signed with Ed25519 by a key named in ``[commands] trusted_keys``.
:meth:`CommandVerifier.verify` turns the raw MQTT payload into a :class:`Command` or
raises a :class:`Rejection` carrying exactly one reason code of contract §4.  Nothing
else ever escapes it: cryptography and json errors are translated here, at one
boundary.

Order of the checks, and why
----------------------------
The first failing check gives the reason.  The order is fixed (and tested, so a refactor
cannot silently change which reason a relay or an operator sees):

1. ``retained``: a retained message on a command topic is refused whatever it holds
   (contract §5).  It goes first because no property of the token may rescue it: a
   valid, unexpired command left retained would otherwise fire again on every reconnect.
2. ``malformed`` (size): more than :data:`MAX_COMMAND_BYTES` is refused before a single
   byte is parsed, so an oversized flood costs one ``len()``.
3. ``malformed`` (shape): ASCII ``header.payload.signature`` with base64url characters
   only; header and payload canonical, unpadded base64url; the header a JSON object.
   One compiled regex and two base64 decodes: garbage stops here for a few µs.
4. Header: ``alg`` not exactly ``"EdDSA"`` → ``bad_signature``; any of ``crit``,
   ``jku``, ``jwk``, ``x5u``, ``x5c``, ``b64`` → ``bad_signature`` (we never fetch or
   accept keys from a token and support no JWS extension); ``kid`` not a trusted key →
   ``unknown_key``.  These choose the algorithm and the key, so they are judged before
   the signature and never by the token itself (RFC 8725 §3.1, §3.2).
5. ``bad_signature``: the signature segment must be exactly 64 bytes (86 characters)
   and verify with the pre-built Ed25519 key of that kid (``cryptography`` directly:
   PyJWT re-parsed the whole token, about 85 µs a message on top of the check).
   Empty, truncated, extended or bit-flipped signatures all land here, and so does a
   signature segment that is not canonical base64url (the token's shape is fine, its
   signature is not).  Nothing in the claims is judged before this point, so a forger
   learns nothing about the claim rules and every forged token gets an authentication
   reason.
6. ``malformed`` (claims): the payload, read by our own strict JSON parser (duplicate
   keys, ``NaN``/``Infinity``, ``1e400``, invalid UTF-8 and nesting deeper than 32
   levels refused; the header is read the same way), must be an object whose claims
   have exactly the types and ranges below.  Unknown claims are ignored, for forward
   compatibility.
7. ``wrong_site``: ``aud`` differs from ``site.id``.  A validly signed command for
   another site does not depend on time, so the clock is not consulted for it.
8. ``clock_untrusted``: when the clock cannot judge freshness, nothing time-bound is
   accepted (fault matrix #39, #40).
9. ``lifetime_too_long`` (``exp - iat > max_lifetime_s``), then ``expired``, then
   ``not_yet_valid``.  Lifetime first: it is a signer policy breach whatever the time.
   ``expired`` and ``not_yet_valid`` cannot both hold, because ``exp >= iat``.
10. ``unknown_unit`` (``kind="cmd"`` only): the unit must be the exact Stora unit id of a
    configured lock; a reference label (``A-101``) or a differently cased id is not
    accepted from the network, only from a technician's CLI.

Time boundaries (``skew`` = ``clock_skew_s``, ``now`` = ``clock.now()``, a float)
--------------------------------------------------------------------------------
* accepted while ``now < exp + skew``; **expired** when ``now >= exp + skew``
  (exclusive upper bound: at exactly ``exp + skew`` the command is dead);
* **not yet valid** when ``iat > now + skew`` (or ``nbf > now + skew``); ``iat`` equal
  to ``now + skew`` is accepted (inclusive);
* **lifetime too long** when ``exp - iat > max_lifetime_s``; equal is accepted.

Claim rules (any violation is ``malformed``)
--------------------------------------------
``jti`` 1–64 printable characters; ``aud`` a string; ``iat``, ``exp`` and optional ``nbf``
integers in 0 … 2**63-1 (a JSON ``true`` or ``1.0`` is not an integer) with
``exp >= iat``; ``cmd`` one of :data:`COMMANDS` (:data:`MGMT_COMMANDS` for
``kind="mgmt"``); ``unit`` 1–64 printable characters, required for commands and optional
for management requests; ``dur`` integer 1–3600, ``unlock`` only; ``ver`` integer
0 … 2**63-1, required on ``lockout``/``clear_lockout`` and refused elsewhere;
``override`` boolean, ``unlock`` only; ``reason`` ≤ 200 printable characters, ``unlock``
only, and not blank when ``override`` is true; ``contact`` 1–64 and ``actor`` 1–100
printable characters; ``args`` an object, management requests only.  ``null`` is
never a stand-in for an absent claim.  Integers are capped at 2**63-1 so that every
accepted number fits a SQLite INTEGER downstream.

A :class:`Rejection` carries ``jti``, ``cmd`` and ``unit`` for the published result
whenever they can be read, even from a forged token; ``claims_verified`` says whether
the signature covered them.  Only verified ids may ever enter the replay store.

This module never logs: the caller logs the :class:`Rejection`, whose ``detail`` names
the failed rule and never holds the token, its signature or a key.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, Literal, NoReturn, Protocol

from gateway.errors import GatewayError, one_line

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from gateway.config import Config

__all__ = [
    "COMMANDS",
    "MAX_COMMAND_BYTES",
    "MAX_MGMT_BYTES",
    "MGMT_COMMANDS",
    "Command",
    "CommandVerifier",
    "RejectReason",
    "Rejection",
    "TrustedClockLike",
]

#: Contract §5: a command is at most 4 KiB.
MAX_COMMAND_BYTES: Final = 4096
#: A management request may carry a whole config file (``config.set``): at most 60 KiB,
#: under the site broker's ``max_packet_size 65536`` (deploy/mosquitto/site-broker.conf).
MAX_MGMT_BYTES: Final = 60 * 1024
COMMANDS: Final = frozenset({"unlock", "lock", "lockout", "clear_lockout"})
MGMT_COMMANDS: Final = frozenset({
    "status", "config.get", "config.set", "locks.test", "outbox.retry", "state.republish",
    "log.level", "clock.reset_floor",
})

#: The contract §4 reason codes this module can give.
RejectReason = Literal[
    "malformed", "bad_signature", "unknown_key", "wrong_site", "expired", "not_yet_valid",
    "lifetime_too_long", "retained", "unknown_unit", "clock_untrusted",
]

_ALGORITHM: Final = "EdDSA"
# Header parameters that would let the token pick its own key (jku, jwk, x5u, x5c) or
# demand extensions we do not implement (crit, and b64 = RFC 7797 unencoded payloads).
_FORBIDDEN_HEADERS: Final = ("crit", "jku", "jwk", "x5u", "x5c", "b64")
_ED25519_SIGNATURE_CHARS: Final = 86  # 64 bytes in unpadded base64url
# The whole token in one pass: only base64url characters, exactly two dots.  The header
# must not be empty; payload and signature may be, and are judged by the later rules.
_COMPACT_JWS: Final = re.compile(rb"([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]*)\.([A-Za-z0-9_-]*)")
_INT_MAX: Final = 2**63 - 1  # SQLite INTEGER
_CORRELATION_MAX: Final = 64
# Containers nested in a header or the claims (the claims object is level 1).  Real
# commands use two or three; the limit only exists to make the outcome deterministic.
_MAX_DEPTH: Final = 32
_MISSING: Final = object()


class TrustedClockLike(Protocol):
    """The wall clock, and whether it may judge a command's freshness."""

    def now(self) -> float:
        """Wall-clock seconds since the epoch."""
        ...

    def trusted(self) -> tuple[bool, str]:
        """``(True, "")`` when freshness may be judged, else ``(False, why not)``."""
        ...


def _empty_args() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Command:
    """A verified command or management request; every field has been type-checked.

    ``dur`` is ``None`` when the unlock takes the lock's ``unlock_seconds``.  ``args`` is
    read-only all the way down (objects are mapping proxies, arrays are tuples); use
    ``json.dumps(..., default=dict)`` or copy it to serialize.
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


class Rejection(GatewayError):  # noqa: N818 - the name is the published API
    """A command refused before it could reach the hardware.

    ``reason`` is one contract §4 reason code; ``detail`` is one line for the logs that
    never holds the token, its signature or a key.  ``jti``, ``cmd`` and ``unit`` are
    read from the claims, when they could be read and are printable strings of 1–64
    characters, so the caller can correlate the published result; otherwise ``None``.

    ``claims_verified`` tells whether those three came from signature-verified claims.
    When it is false they are attacker-controlled: fine to echo in a result, but never
    to record as a seen ``jti`` (a forger could otherwise burn the id of a real command).
    ``retryable`` is true only for ``clock_untrusted``: the same token may pass once the
    clock is trusted, if it has not expired by then.
    """

    def __init__(
        self,
        reason: RejectReason,
        detail: str,
        *,
        jti: str | None = None,
        cmd: str | None = None,
        unit: str | None = None,
        claims_verified: bool = False,
    ) -> None:
        self.reason: RejectReason = reason
        self.detail = one_line(detail)
        self.jti = jti
        self.cmd = cmd
        self.unit = unit
        self.claims_verified = claims_verified
        self.retryable = reason == "clock_untrusted"
        #: Judged on the claims without the signature check (``screen``); not published.
        self.screened = False
        super().__init__(reason, self.detail)

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception pickling replays self.args only; keep the keyword fields too.
        return (functools.partial(Rejection, self.reason, self.detail, jti=self.jti,
                                  cmd=self.cmd, unit=self.unit,
                                  claims_verified=self.claims_verified), ())


class _BadClaimError(ValueError):
    """A claim (or JSON) problem: becomes a ``malformed`` rejection with this detail."""


class CommandVerifier:
    """Checks raw command payloads against one configuration (see the module docstring).

    Keys, the site id and the unit ids are taken from ``config`` once, here, so a changed
    configuration needs a new verifier.  ``kind="mgmt"`` verifies management requests
    (``P/S/mgmt``): the same envelope, ``cmd`` from :data:`MGMT_COMMANDS`, ``args``
    allowed, ``unit`` optional and not looked up.  Thread-safe: it holds no mutable state.
    """

    def __init__(
        self, config: Config, clock: TrustedClockLike, *, kind: Literal["cmd", "mgmt"] = "cmd"
    ) -> None:
        # Imported here: cryptography costs a Pi noticeable start-up time, and
        # CLI commands that never verify a token should not pay it.
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        if kind not in ("cmd", "mgmt"):
            raise ValueError(f"kind must be 'cmd' or 'mgmt', not {kind!r}")
        self._kind = kind
        self._commands = COMMANDS if kind == "cmd" else MGMT_COMMANDS
        self._max_bytes = MAX_COMMAND_BYTES if kind == "cmd" else MAX_MGMT_BYTES
        self._clock = clock
        self._site = config.site.id
        self._skew = config.commands.clock_skew_s
        self._max_lifetime = config.commands.max_lifetime_s
        # Key objects are built once: parsing a key per message would be wasted work
        # that a flood of commands could multiply.
        self._keys: dict[str, Ed25519PublicKey] = {
            kid: Ed25519PublicKey.from_public_bytes(raw)
            for kid, raw in config.commands.trusted_keys.items()
        }
        # Exact unit ids only; equivalent to config.lock_by_id(u) with .unit == u, but
        # without its reference fallback and linear scan.
        self._units = frozenset(lock.unit for lock in config.locks)

    def verify(self, payload: bytes, *, retained: bool) -> Command:
        """The verified :class:`Command` in ``payload``; raises :class:`Rejection`."""
        command = self._run(payload, retained=retained, signature=True)
        assert command is not None  # _run returns a Command whenever it checks the curve
        return command

    def verify_claims_first(self, payload: bytes, *, retained: bool) -> Command:
        """:meth:`verify` with the claims judged before the signature, in one pass.

        Accepts exactly what :meth:`verify` accepts.  A rejection earned by the claims
        alone has ``screened`` set (its reason may differ from :meth:`verify`'s, see
        :meth:`screen`); any other rejection is :meth:`verify`'s own.  For load shedding:
        one parse instead of :meth:`screen` followed by :meth:`verify`.
        """
        command = self._run(payload, retained=retained, signature=True, claims_first=True)
        assert command is not None  # _run returns a Command whenever it checks the curve
        return command

    def screen(self, payload: bytes, *, retained: bool) -> Rejection | None:
        """Every rule but the Ed25519 arithmetic: a :class:`Rejection` when ``payload``
        can never be accepted, else ``None`` (it may still fail its signature).

        For load shedding (bench/agent_flood.py).  One signature check costs more than
        all the other rules together (about 170 µs on a 2020s x86 core, several times
        that on a Pi), so while the agent could not publish a rejection anyway it drops
        what this refuses without paying for the curve.  Its ``reason`` is the one the
        *claims* earn and may differ from :meth:`verify`'s (a forged expired token is
        ``bad_signature`` there, ``expired`` here), so it is never published; and its
        ids are never ``claims_verified``.  Anything :meth:`verify` accepts, this passes.
        """
        try:
            self._run(payload, retained=retained, signature=False)
        except Rejection as rejection:
            return rejection
        return None

    def _run(self, payload: bytes, *, retained: bool, signature: bool,
             claims_first: bool = False) -> Command | None:
        if retained:
            raise _rejection("retained", "a retained message on a command topic is refused",
                             _peek_token(payload))
        if len(payload) > self._max_bytes:
            raise Rejection("malformed", f"payload is {len(payload)} bytes, over the "
                                         f"{self._max_bytes}-byte limit")
        match = _COMPACT_JWS.fullmatch(payload)
        if match is None:
            raise Rejection("malformed", "not a JWS compact serialization (three base64url "
                                         "segments joined by '.')")
        header_seg, payload_seg, signature_seg = match.groups()
        header_bytes = _b64decode(header_seg)
        body = _b64decode(payload_seg)
        if header_bytes is None or body is None:
            which = "header" if header_bytes is None else "payload"
            raise _rejection("malformed", f"the {which} segment is not canonical base64url",
                             _peek_claims(body))
        try:
            header = _strict_json(header_bytes)
        except _BadClaimError as exc:
            raise _rejection("malformed", f"header: {exc}", _peek_claims(body)) from None
        if not isinstance(header, dict):
            raise _rejection("malformed", "header is not a JSON object", _peek_claims(body))

        key, kid = self._check_header(header, body)
        if claims_first:
            # Claims before the curve, in one pass: a failure here is ``screened``.
            self._check_signature(payload, signature_seg, key, kid, body, curve=False)
            command = self._judge_claims(body, kid, verified=False)
            if signature:
                self._check_signature(payload, signature_seg, key, kid, body)
            return command if signature else None
        self._check_signature(payload, signature_seg, key, kid, body, curve=signature)
        command = self._judge_claims(body, kid, verified=signature)
        return command if signature else None

    def _judge_claims(self, body: bytes, kid: str, *, verified: bool) -> Command:
        try:
            claims = _strict_json(body)
            command = self._parse_claims(claims, kid)
        except _BadClaimError as exc:
            raise _rejection("malformed", str(exc), _peek_claims(body), verified=verified,
                             screened=not verified) from None
        self._check_context(claims, command, verified=verified)
        return command

    # ------------------------------------------------------------------ the rules

    def _check_header(self, header: dict[str, Any], body: bytes) -> tuple[Ed25519PublicKey, str]:
        alg = header.get("alg", _MISSING)
        if type(alg) is not str or alg != _ALGORITHM:
            what = "no alg" if alg is _MISSING else f"alg {_show(alg)}"
            raise _rejection("bad_signature", f"{what} in the header; only {_ALGORITHM} is "
                                              "accepted", _peek_claims(body))
        for name in _FORBIDDEN_HEADERS:
            if name in header:
                raise _rejection("bad_signature", f"header parameter {name!r} is not accepted",
                                 _peek_claims(body))
        kid = header.get("kid", _MISSING)
        if type(kid) is not str or (key := self._keys.get(kid)) is None:
            what = "no kid" if kid is _MISSING else f"kid {_show(kid)}"
            raise _rejection("unknown_key", f"{what} in the header; not a trusted key",
                             _peek_claims(body))
        return key, kid

    def _check_signature(
        self, token: bytes, signature_seg: bytes, key: Ed25519PublicKey, kid: str, body: bytes,
        *, curve: bool = True,
    ) -> None:
        # An Ed25519 signature is 64 bytes; anything else cannot verify, so skip the
        # curve arithmetic for truncated, extended or missing signatures.
        if len(signature_seg) != _ED25519_SIGNATURE_CHARS or _b64decode(signature_seg) is None:
            raise _rejection("bad_signature", f"the signature is not 64 bytes of canonical "
                                              f"base64url ({len(signature_seg)} characters)",
                             _peek_claims(body))
        if not curve:
            return
        from cryptography.exceptions import InvalidSignature

        signature = _b64decode(signature_seg)
        assert signature is not None  # checked above
        # The algorithm is not the token's to choose: the header check above accepted
        # only EdDSA, and this is an Ed25519 key, so there is nothing else it could be
        # (RFC 8725 §3.1).  The signing input is the token up to its second dot, as
        # received: no re-encoding, so what is verified is exactly what was sent.
        signing_input = token[: len(token) - len(signature_seg) - 1]
        try:
            key.verify(signature, signing_input)
        except InvalidSignature:
            raise _rejection("bad_signature", f"the signature does not verify with key "
                                              f"{_show(kid)}", _peek_claims(body)) from None

    def _parse_claims(self, claims: Any, kid: str) -> Command:
        if not isinstance(claims, dict):
            raise _BadClaimError(f"the claims are {_kind(claims)}, not a JSON object")
        jti = _required_text(claims, "jti", _CORRELATION_MAX)
        _required_text(claims, "aud", None, min_len=0, printable=False)
        iat = _required_int(claims, "iat", 0, _INT_MAX)
        exp = _required_int(claims, "exp", 0, _INT_MAX)
        _optional_int(claims, "nbf", 0, _INT_MAX)
        if exp < iat:
            raise _BadClaimError(f"exp {exp} is before iat {iat}")
        cmd = claims.get("cmd", _MISSING)
        if type(cmd) is not str or cmd not in self._commands:
            allowed = ", ".join(sorted(self._commands))
            raise _BadClaimError(f"claim 'cmd' must be one of {allowed}; found {_show(cmd)}")
        if self._kind == "cmd":
            unit: str | None = _required_text(claims, "unit", _CORRELATION_MAX)
        else:
            unit = _optional_text(claims, "unit", _CORRELATION_MAX)
        dur: int | None = None
        ver: int | None = None
        override = False
        reason: str | None = None
        if cmd == "unlock":
            dur = _optional_int(claims, "dur", 1, 3600)
            value = claims.get("override", False)
            if type(value) is not bool:
                raise _BadClaimError(f"claim 'override' must be true or false, found "
                                     f"{_kind(value)}")
            override = value
            reason = _optional_text(claims, "reason", 200, min_len=0)
            if override and (reason is None or not reason.strip()):
                raise _BadClaimError("override requires a non-blank 'reason'")
        else:
            for name in ("dur", "override", "reason"):
                _absent(claims, name, cmd)
        if cmd in ("lockout", "clear_lockout"):
            ver = _required_int(claims, "ver", 0, _INT_MAX)
        else:
            _absent(claims, "ver", cmd)
        contact = _optional_text(claims, "contact", 64)
        actor = _optional_text(claims, "actor", 100)
        args: Mapping[str, Any] = _empty_args()
        if self._kind == "mgmt":
            raw_args = claims.get("args", _MISSING)
            if raw_args is not _MISSING:
                if not isinstance(raw_args, dict):
                    raise _BadClaimError(f"claim 'args' must be an object, found "
                                         f"{_kind(raw_args)}")
                args = _freeze(raw_args)
        else:
            _absent(claims, "args", cmd)
        return Command(jti=jti, cmd=cmd, unit=unit, kid=kid, iat=iat, exp=exp, dur=dur, ver=ver,
                       override=override, reason=reason, contact=contact, actor=actor, args=args)

    def _check_context(self, claims: dict[str, Any], command: Command, *,
                       verified: bool = True) -> None:
        """Site, clock, freshness and unit: the rules that depend on this gateway."""
        ids = (command.jti, command.cmd, command.unit)

        def reject(reason: RejectReason, detail: str) -> NoReturn:
            raise _rejection(reason, detail, ids, verified=verified, screened=not verified)

        aud = claims["aud"]
        if aud != self._site:
            reject("wrong_site", f"aud {_show(aud)} is not this site {_show(self._site)}")
        trusted, why = self._clock.trusted()
        if not trusted:
            reject("clock_untrusted", f"freshness cannot be judged: {why or 'clock untrusted'}")
        now = self._clock.now()
        skew = self._skew
        lifetime = command.exp - command.iat
        if lifetime > self._max_lifetime:
            reject("lifetime_too_long", f"exp - iat = {lifetime} s exceeds max_lifetime_s = "
                                        f"{self._max_lifetime}")
        if now >= command.exp + skew:
            reject("expired", f"now {now:.3f} >= exp {command.exp} + skew {skew}")
        if command.iat > now + skew:
            reject("not_yet_valid", f"iat {command.iat} > now {now:.3f} + skew {skew}")
        nbf = claims.get("nbf")
        if nbf is not None and nbf > now + skew:
            reject("not_yet_valid", f"nbf {nbf} > now {now:.3f} + skew {skew}")
        if self._kind == "cmd" and command.unit not in self._units:
            reject("unknown_unit", f"unit {_show(command.unit)} is not a unit id configured "
                                   "on this gateway")


# ---------------------------------------------------------------------- helpers


def _rejection(
    reason: RejectReason,
    detail: str,
    ids: tuple[str | None, str | None, str | None],
    *,
    verified: bool = False,
    screened: bool = False,
) -> Rejection:
    jti, cmd, unit = ids
    rejection = Rejection(reason, detail, jti=jti, cmd=cmd, unit=unit, claims_verified=verified)
    rejection.screened = screened
    return rejection


def _b64decode(segment: bytes) -> bytes | None:
    """Canonical unpadded base64url (the caller has checked the alphabet), else None.

    Non-canonical encodings (stray low bits in the last character) are refused, so one
    token has one spelling and a flipped bit can never be silently ignored.
    """
    if len(segment) % 4 == 1:
        return None
    try:
        raw = base64.urlsafe_b64decode(segment + b"=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        return None
    if base64.urlsafe_b64encode(raw).rstrip(b"=") != segment:
        return None
    return raw


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Duplicate keys are where two JSON parsers disagree (first wins or last wins); a
    # signed token must mean one thing, so they are refused outright.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _BadClaimError(f"duplicate key {_show(key)}")
            seen.add(key)
    return obj


def _no_constant(name: str) -> NoReturn:
    raise _BadClaimError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _BadClaimError(f"number {_show(text)} is out of range")
    return value


def _strict_json(data: bytes) -> Any:
    """Parse UTF-8 JSON refusing duplicate keys, NaN/Infinity, overflowing floats and
    nesting deeper than :data:`_MAX_DEPTH`.
    """
    try:
        text = data.decode("utf-8")
        value = json.loads(text, object_pairs_hook=_unique_object, parse_constant=_no_constant,
                           parse_float=_finite_float)
    except _BadClaimError:
        raise
    except UnicodeDecodeError as exc:
        raise _BadClaimError(f"not UTF-8 (bad byte at offset {exc.start})") from None
    except RecursionError:
        raise _BadClaimError(f"JSON nested deeper than {_MAX_DEPTH} levels") from None
    except ValueError as exc:  # JSONDecodeError, and int strings over 4300 digits
        raise _BadClaimError(f"not valid JSON ({type(exc).__name__})") from None
    if not _shallow(value):
        raise _BadClaimError(f"JSON nested deeper than {_MAX_DEPTH} levels")
    return value


def _shallow(value: Any) -> bool:
    """True when no container in ``value`` sits deeper than :data:`_MAX_DEPTH`.

    json only stops at the interpreter's recursion limit, which moves (hypothesis and
    other tools raise it); an explicit limit makes the outcome the same everywhere, and
    it is checked without recursion.
    """
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > _MAX_DEPTH:
            return False
        stack.extend((child, depth + 1) for child in children)
    return True


def _peek_claims(body: bytes | None) -> tuple[str | None, str | None, str | None]:
    """Best-effort, untrusted jti/cmd/unit for correlating a rejection; never raises."""
    if not body:
        return None, None, None
    try:
        claims = json.loads(body)
    except (ValueError, RecursionError):
        return None, None, None
    if not isinstance(claims, dict):
        return None, None, None
    return _sane(claims.get("jti")), _sane(claims.get("cmd")), _sane(claims.get("unit"))


def _peek_token(token: bytes) -> tuple[str | None, str | None, str | None]:
    """:func:`_peek_claims` on a whole token, when it is small and shaped like a JWS."""
    match = _COMPACT_JWS.fullmatch(token) if len(token) <= MAX_COMMAND_BYTES else None
    return _peek_claims(_b64decode(match.group(2)) if match else None)


def _sane(value: object) -> str | None:
    if type(value) is str and 0 < len(value) <= _CORRELATION_MAX and value.isprintable():
        return value
    return None


def _kind(value: object) -> str:
    """The JSON type of ``value``, for messages: ``a boolean``, ``a string``, …"""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number with a fraction or exponent"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _show(value: object) -> str:
    """A short, single-line rendering of an untrusted value for ``detail``."""
    text = one_line(repr(value))
    return text if len(text) <= 40 else text[:37] + "..."


def _required(claims: Mapping[str, Any], name: str) -> Any:
    value = claims.get(name, _MISSING)
    if value is _MISSING:
        raise _BadClaimError(f"claim {name!r} is missing")
    return value


def _required_int(claims: Mapping[str, Any], name: str, lo: int, hi: int) -> int:
    value = _required(claims, name)
    # type() rather than isinstance(): JSON true is a Python bool, which is an int.
    if type(value) is not int:
        raise _BadClaimError(f"claim {name!r} must be an integer, found {_kind(value)}")
    if not lo <= value <= hi:
        raise _BadClaimError(f"claim {name!r} = {_show(value)} is outside {lo}–{hi}")
    return value


def _optional_int(claims: Mapping[str, Any], name: str, lo: int, hi: int) -> int | None:
    return _required_int(claims, name, lo, hi) if name in claims else None


def _required_text(
    claims: Mapping[str, Any], name: str, max_len: int | None, *, min_len: int = 1,
    printable: bool = True,
) -> str:
    value = _required(claims, name)
    if type(value) is not str:
        raise _BadClaimError(f"claim {name!r} must be a string, found {_kind(value)}")
    if len(value) < min_len or (max_len is not None and len(value) > max_len):
        limit = f"{min_len}–{max_len}" if max_len is not None else f"at least {min_len}"
        raise _BadClaimError(f"claim {name!r} has {len(value)} characters, not {limit}")
    # Control characters would split or forge audit log lines downstream.
    if printable and not value.isprintable():
        raise _BadClaimError(f"claim {name!r} holds control or unprintable characters")
    return value


def _optional_text(
    claims: Mapping[str, Any], name: str, max_len: int, *, min_len: int = 1
) -> str | None:
    return _required_text(claims, name, max_len, min_len=min_len) if name in claims else None


def _absent(claims: Mapping[str, Any], name: str, cmd: str) -> None:
    if name in claims:
        raise _BadClaimError(f"claim {name!r} is not allowed on {cmd!r}")


def _freeze(value: Any) -> Any:
    """A read-only deep copy of parsed JSON: objects to mapping proxies, arrays to tuples.

    Recursion is safe here: :func:`_strict_json` has bounded the depth.
    """
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value
