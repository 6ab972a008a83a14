"""The golden vectors: tokens with the verdict every implementation must give them.

``sitelink/vectors/commands.json`` (package data, frozen; written once by
``tests/sitelink/make_vectors.py``, see its docstring) holds:

``config``
    the verifier's settings: ``site_id``, ``trusted_keys`` (kid → base64url of the raw
    32-byte public key), ``clock_skew_s``, ``max_lifetime_s``, ``now`` (the clock,
    seconds since the epoch) and ``units`` (the configured unit ids).
``keys``
    the private keys that made the tokens (hex seeds, RFC 8032), so a signer written
    elsewhere can check it writes byte-identical tokens.  Test keys: never trust them.
``signing``
    ``{"name", "kid", "headers", "claims", "token"}``: the token a signer with that key
    and kid must produce for those claims (and extra headers; ``null`` drops one).
``vectors``
    ``{"name", "note", "kind", "retained", "clock", "token" | "token_hex", "expect"}``:
    ``kind`` ``"cmd"`` or ``"mgmt"``; ``clock`` ``null`` (trusted) or ``{"trusted":
    false, "why": …}``; the payload as ASCII ``token``, or ``token_hex`` for bytes that
    are not printable ASCII.  ``expect`` is what :func:`judge` returns: ``{"verdict":
    "accepted", "command": {…}, "screen": null}`` or ``{"verdict": "rejected", "reason",
    "detail", "jti", "cmd", "unit", "claims_verified", "screen"}``, where ``screen`` is
    the reason :meth:`~sitelink.verify.Verifier.screen` gives (``null``: it passes).

:func:`load` reads the file, :func:`verifier_for` builds the verifier a vector is
judged by and :func:`judge` gives the verdict in the file's shape, so a test is a loop:
``assert judge(v, verifier_for(vectors, v)) == v.expect``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from sitelink.claims import Command, Kind
from sitelink.errors import Rejection
from sitelink.verify import Verifier

__all__ = ["FixedClock", "GoldenVectors", "SigningVector", "Vector", "judge", "load",
           "verifier_for"]


@dataclass(frozen=True, slots=True)
class FixedClock:
    """A clock that always says ``now`` and whether it is trusted (``why`` if not)."""

    at: float
    is_trusted: bool = True
    why: str = ""

    def now(self) -> float:
        """``at``."""
        return self.at

    def trusted(self) -> tuple[bool, str]:
        """``(is_trusted, why)``."""
        return self.is_trusted, self.why


@dataclass(frozen=True, slots=True)
class Vector:
    """One token and the verdict it must get."""

    name: str
    note: str
    kind: Kind
    retained: bool
    clock: Mapping[str, Any] | None
    token: bytes
    expect: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class SigningVector:
    """Claims, and the exact token the key ``kid`` must sign them into."""

    name: str
    kid: str
    headers: Mapping[str, Any]
    claims: Mapping[str, Any]
    token: bytes


@dataclass(frozen=True, slots=True)
class GoldenVectors:
    """The whole file."""

    config: Mapping[str, Any]
    keys: Mapping[str, Mapping[str, str]]
    signing: tuple[SigningVector, ...]
    vectors: tuple[Vector, ...]

    def trusted_keys(self) -> dict[str, bytes]:
        """``config.trusted_keys`` as raw public key bytes."""
        return {kid: base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
                for kid, text in self.config["trusted_keys"].items()}


def load(text: str | None = None) -> GoldenVectors:
    """The vectors in ``text``, by default the packaged ``vectors/commands.json``."""
    if text is None:
        text = (resources.files("sitelink") / "vectors" / "commands.json").read_text("utf-8")
    doc = json.loads(text)
    vectors = tuple(
        Vector(name=v["name"], note=v.get("note", ""), kind=v.get("kind", "cmd"),
               retained=bool(v.get("retained", False)), clock=v.get("clock"),
               token=(v["token"].encode("ascii") if "token" in v
                      else bytes.fromhex(v["token_hex"])),
               expect=v["expect"])
        for v in doc["vectors"])
    signing = tuple(
        SigningVector(name=s["name"], kid=s["kid"], headers=s.get("headers", {}),
                      claims=s["claims"], token=s["token"].encode("ascii"))
        for s in doc["signing"])
    return GoldenVectors(config=doc["config"], keys=doc["keys"], signing=signing,
                         vectors=vectors)


def verifier_for(golden: GoldenVectors, vector: Vector) -> Verifier:
    """The verifier of the file's config, with the vector's kind and clock."""
    config = golden.config
    clock = vector.clock or {}
    return Verifier(
        site_id=config["site_id"], trusted_keys=golden.trusted_keys(),
        clock=FixedClock(float(config["now"]), bool(clock.get("trusted", True)),
                         str(clock.get("why", ""))),
        clock_skew_s=int(config["clock_skew_s"]), max_lifetime_s=int(config["max_lifetime_s"]),
        units=tuple(config["units"]), kind=vector.kind)


def command_dict(command: Command) -> dict[str, Any]:
    """A verified command as plain JSON values (``args`` as ordinary objects/arrays)."""
    fields = ("jti", "cmd", "unit", "kid", "iat", "exp", "dur", "ver", "override", "reason",
              "contact", "actor")
    out: dict[str, Any] = {name: getattr(command, name) for name in fields}
    out["args"] = json.loads(json.dumps(command.args, default=dict))
    return out


def judge(vector: Vector, verifier: Verifier) -> dict[str, Any]:
    """What ``verifier`` makes of ``vector``, in the shape of ``vector.expect``."""
    screened = verifier.screen(vector.token, retained=vector.retained)
    screen = None if screened is None else str(screened.reason)
    try:
        command = verifier.verify(vector.token, retained=vector.retained)
    except Rejection as rejection:
        return {"verdict": "rejected", "reason": str(rejection.reason),
                "detail": rejection.detail, "jti": rejection.jti, "cmd": rejection.cmd,
                "unit": rejection.unit, "claims_verified": rejection.claims_verified,
                "screen": screen}
    return {"verdict": "accepted", "command": command_dict(command), "screen": screen}
