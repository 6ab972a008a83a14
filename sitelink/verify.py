"""Verify a signed command before anything touches hardware (contract §5).

A command is a JWS compact serialization (``header.payload.signature``, base64url, no
padding) signed with Ed25519 by a trusted key (:mod:`sitelink.jws`).
:meth:`Verifier.verify` turns the raw MQTT payload into a
:class:`~sitelink.claims.Command` or raises a :class:`~sitelink.errors.Rejection`
carrying exactly one reason code of contract §4.  Nothing else ever escapes it:
cryptography and json errors are translated here, at one boundary.

Order of the checks, and why
----------------------------
The first failing check gives the reason.  The order is fixed (and tested, so a refactor
cannot silently change which reason a relay or an operator sees; the golden vectors in
``sitelink/vectors/commands.json`` pin it for both sides):

1. ``retained``: a retained message on a command topic is refused whatever it holds
   (contract §5).  It goes first because no property of the token may rescue it: a
   valid, unexpired command left retained would otherwise fire again on every reconnect.
2. ``malformed`` (size): more than :data:`~sitelink.claims.MAX_COMMAND_BYTES` is refused
   before a single byte is parsed, so an oversized flood costs one ``len()``.
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
6. ``malformed`` (claims): the payload, read by the strict JSON parser
   (:func:`sitelink.jws.strict_json`: duplicate keys, ``NaN``/``Infinity``, ``1e400``,
   invalid UTF-8 and nesting deeper than 32 levels refused; the header is read the same
   way), must be an object whose claims have exactly the types and ranges of
   :mod:`sitelink.claims`.  Unknown claims are ignored, for forward compatibility.
7. ``wrong_site``: ``aud`` differs from the site id.  A validly signed command for
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

A :class:`~sitelink.errors.Rejection` carries ``jti``, ``cmd`` and ``unit`` for the
published result whenever they can be read, even from a forged token;
``claims_verified`` says whether the signature covered them.  Only verified ids may ever
enter the replay store.

This module never logs: the caller logs the rejection, whose ``detail`` names the failed
rule and never holds the token, its signature or a key.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Final, NoReturn, Protocol

from sitelink.claims import MAX_COMMAND_BYTES, MAX_MGMT_BYTES, Command, Kind, parse_claims
from sitelink.codes import Reason
from sitelink.errors import ClaimError, Rejection, show
from sitelink.jws import (
    ALGORITHM,
    COMPACT_JWS,
    ED25519_SIGNATURE_CHARS,
    FORBIDDEN_HEADERS,
    b64decode,
    strict_json,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

__all__ = ["TrustedClockLike", "Verifier"]

#: Correlation ids (``jti``, ``cmd``, ``unit``) echoed from a rejected token: at most this
#: many printable characters, else ``None``.
_CORRELATION_MAX: Final = 64
_MISSING: Final = object()
# The reasons as module constants: an enum member read through its class costs about
# 0.1 µs, which a flood of garbage would pay on every message.
_RETAINED: Final = Reason.RETAINED
_MALFORMED: Final = Reason.MALFORMED
_BAD_SIGNATURE: Final = Reason.BAD_SIGNATURE
_UNKNOWN_KEY: Final = Reason.UNKNOWN_KEY
_WRONG_SITE: Final = Reason.WRONG_SITE
_CLOCK_UNTRUSTED: Final = Reason.CLOCK_UNTRUSTED
_LIFETIME_TOO_LONG: Final = Reason.LIFETIME_TOO_LONG
_EXPIRED: Final = Reason.EXPIRED
_NOT_YET_VALID: Final = Reason.NOT_YET_VALID
_UNKNOWN_UNIT: Final = Reason.UNKNOWN_UNIT

Ids = tuple[str | None, str | None, str | None]


class TrustedClockLike(Protocol):
    """The wall clock, and whether it may judge a command's freshness."""

    def now(self) -> float:
        """Wall-clock seconds since the epoch."""
        ...

    def trusted(self) -> tuple[bool, str]:
        """``(True, "")`` when freshness may be judged, else ``(False, why not)``."""
        ...


class Verifier:
    """Checks raw command payloads against one site's settings (module docstring).

    ``trusted_keys`` maps a ``kid`` to the raw 32-byte Ed25519 public key; ``units`` are
    the exact unit ids a command may name (``None``: not checked).  Everything is taken
    once, here, so changed settings need a new verifier.  ``kind="mgmt"`` verifies
    management requests (``P/S/mgmt``): the same envelope, ``cmd`` from
    :data:`~sitelink.codes.MGMT_COMMANDS`, ``args`` allowed, ``unit`` optional and not
    looked up, and :data:`~sitelink.claims.MAX_MGMT_BYTES` instead of
    :data:`~sitelink.claims.MAX_COMMAND_BYTES`.  Thread-safe: it holds no mutable state.

    Rejections are instances of :attr:`rejection_type`, a :class:`Rejection` subclass a
    user may set on a subclass of its own (the gateway's joins its error tree).
    """

    rejection_type: ClassVar[type[Rejection]] = Rejection

    def __init__(
        self,
        *,
        site_id: str,
        trusted_keys: Mapping[str, bytes],
        clock: TrustedClockLike,
        clock_skew_s: int,
        max_lifetime_s: int,
        units: Collection[str] | None = None,
        kind: Kind = "cmd",
    ) -> None:
        # Imported here: cryptography costs a Pi noticeable start-up time, and
        # CLI commands that never verify a token should not pay it.
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        if kind not in ("cmd", "mgmt"):
            raise ValueError(f"kind must be 'cmd' or 'mgmt', not {kind!r}")
        self._kind: Kind = kind
        self._max_bytes = MAX_COMMAND_BYTES if kind == "cmd" else MAX_MGMT_BYTES
        self._clock = clock
        self._site = site_id
        self._skew = clock_skew_s
        self._max_lifetime = max_lifetime_s
        # Key objects are built once: parsing a key per message would be wasted work
        # that a flood of commands could multiply.
        self._keys: dict[str, Ed25519PublicKey] = {
            kid: Ed25519PublicKey.from_public_bytes(raw) for kid, raw in trusted_keys.items()
        }
        self._units = None if units is None or kind != "cmd" else frozenset(units)

    def verify(self, payload: bytes, *, retained: bool) -> Command:
        """The verified :class:`~sitelink.claims.Command` in ``payload``; raises
        :class:`~sitelink.errors.Rejection`."""
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
        """Every rule but the Ed25519 arithmetic: a rejection when ``payload`` can never
        be accepted, else ``None`` (it may still fail its signature).

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
        reject = self._rejection
        if retained:
            raise reject(_RETAINED, "a retained message on a command topic is refused",
                         _peek_token(payload))
        if len(payload) > self._max_bytes:
            raise self.rejection_type(_MALFORMED, f"payload is {len(payload)} bytes, over "
                                                  f"the {self._max_bytes}-byte limit")
        match = COMPACT_JWS.fullmatch(payload)
        if match is None:
            raise self.rejection_type(_MALFORMED, "not a JWS compact serialization (three "
                                                  "base64url segments joined by '.')")
        header_seg, payload_seg, signature_seg = match.groups()
        header_bytes = b64decode(header_seg)
        body = b64decode(payload_seg)
        if header_bytes is None or body is None:
            which = "header" if header_bytes is None else "payload"
            raise reject(_MALFORMED, f"the {which} segment is not canonical base64url",
                         _peek_claims(body))
        try:
            header = strict_json(header_bytes)
        except ClaimError as exc:
            raise reject(_MALFORMED, f"header: {exc}", _peek_claims(body)) from None
        if not isinstance(header, dict):
            raise reject(_MALFORMED, "header is not a JSON object", _peek_claims(body))

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
            claims = strict_json(body)
            command = parse_claims(claims, kid, self._kind)
        except ClaimError as exc:
            raise self._rejection(_MALFORMED, str(exc), _peek_claims(body),
                                  verified=verified, screened=not verified) from None
        self._check_context(claims, command, verified=verified)
        return command

    # ------------------------------------------------------------------ the rules

    def _check_header(self, header: dict[str, Any], body: bytes) -> tuple[Ed25519PublicKey, str]:
        alg = header.get("alg", _MISSING)
        if type(alg) is not str or alg != ALGORITHM:
            what = "no alg" if alg is _MISSING else f"alg {show(alg)}"
            raise self._rejection(_BAD_SIGNATURE,
                                  f"{what} in the header; only {ALGORITHM} is accepted",
                                  _peek_claims(body))
        for name in FORBIDDEN_HEADERS:
            if name in header:
                raise self._rejection(_BAD_SIGNATURE,
                                      f"header parameter {name!r} is not accepted",
                                      _peek_claims(body))
        kid = header.get("kid", _MISSING)
        if type(kid) is not str or (key := self._keys.get(kid)) is None:
            what = "no kid" if kid is _MISSING else f"kid {show(kid)}"
            raise self._rejection(_UNKNOWN_KEY, f"{what} in the header; not a trusted key",
                                  _peek_claims(body))
        return key, kid

    def _check_signature(
        self, token: bytes, signature_seg: bytes, key: Ed25519PublicKey, kid: str, body: bytes,
        *, curve: bool = True,
    ) -> None:
        # An Ed25519 signature is 64 bytes; anything else cannot verify, so skip the
        # curve arithmetic for truncated, extended or missing signatures.
        if len(signature_seg) != ED25519_SIGNATURE_CHARS or b64decode(signature_seg) is None:
            raise self._rejection(_BAD_SIGNATURE,
                                  f"the signature is not 64 bytes of canonical base64url "
                                  f"({len(signature_seg)} characters)", _peek_claims(body))
        if not curve:
            return
        from cryptography.exceptions import InvalidSignature

        signature = b64decode(signature_seg)
        assert signature is not None  # checked above
        # The algorithm is not the token's to choose: the header check above accepted
        # only EdDSA, and this is an Ed25519 key, so there is nothing else it could be
        # (RFC 8725 §3.1).  The signing input is the token up to its second dot, as
        # received: no re-encoding, so what is verified is exactly what was sent.
        signing_input = token[: len(token) - len(signature_seg) - 1]
        try:
            key.verify(signature, signing_input)
        except InvalidSignature:
            raise self._rejection(_BAD_SIGNATURE,
                                  f"the signature does not verify with key {show(kid)}",
                                  _peek_claims(body)) from None

    def _check_context(self, claims: dict[str, Any], command: Command, *,
                       verified: bool = True) -> None:
        """Site, clock, freshness and unit: the rules that depend on this gateway."""
        ids = (command.jti, command.cmd, command.unit)

        def reject(reason: Reason, detail: str) -> NoReturn:
            raise self._rejection(reason, detail, ids, verified=verified,
                                  screened=not verified)

        aud = claims["aud"]
        if aud != self._site:
            reject(_WRONG_SITE, f"aud {show(aud)} is not this site {show(self._site)}")
        trusted, why = self._clock.trusted()
        if not trusted:
            reject(_CLOCK_UNTRUSTED, f"freshness cannot be judged: {why or 'clock untrusted'}")
        now = self._clock.now()
        skew = self._skew
        lifetime = command.exp - command.iat
        if lifetime > self._max_lifetime:
            reject(_LIFETIME_TOO_LONG, f"exp - iat = {lifetime} s exceeds max_lifetime_s = "
                                       f"{self._max_lifetime}")
        if now >= command.exp + skew:
            reject(_EXPIRED, f"now {now:.3f} >= exp {command.exp} + skew {skew}")
        if command.iat > now + skew:
            reject(_NOT_YET_VALID, f"iat {command.iat} > now {now:.3f} + skew {skew}")
        nbf = claims.get("nbf")
        if nbf is not None and nbf > now + skew:
            reject(_NOT_YET_VALID, f"nbf {nbf} > now {now:.3f} + skew {skew}")
        if self._units is not None and command.unit not in self._units:
            reject(_UNKNOWN_UNIT, f"unit {show(command.unit)} is not a unit id configured "
                                  "on this gateway")

    def _rejection(
        self,
        reason: Reason,
        detail: str,
        ids: Ids = (None, None, None),
        *,
        verified: bool = False,
        screened: bool = False,
    ) -> Rejection:
        jti, cmd, unit = ids
        rejection = self.rejection_type(reason, detail, jti=jti, cmd=cmd, unit=unit,
                                        claims_verified=verified)
        rejection.screened = screened
        return rejection


# ---------------------------------------------------------------------- helpers


def _peek_claims(body: bytes | None) -> Ids:
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


def _peek_token(token: bytes) -> Ids:
    """:func:`_peek_claims` on a whole token, when it is small and shaped like a JWS."""
    match = COMPACT_JWS.fullmatch(token) if len(token) <= MAX_COMMAND_BYTES else None
    return _peek_claims(b64decode(match.group(2)) if match else None)


def _sane(value: object) -> str | None:
    if type(value) is str and 0 < len(value) <= _CORRELATION_MAX and value.isprintable():
        return value
    return None
