"""Write ``sitelink/vectors/commands.json``, the golden vectors (see sitelink/golden.py).

Run once, review the diff, commit; the file is then frozen and both the gateway's tests
(tests/sitelink/test_golden_vectors.py) and the relay's run against it::

    PYTHONPATH=. .venv/bin/python tests/sitelink/make_vectors.py

Every token is made here from fixed test keys (Ed25519 is deterministic, so a rerun
writes the same tokens), and every verdict is stated here by hand: accepted with the
claims it was signed with, or rejected with one reason.  The script then asks the
verifier and refuses to write the file unless it agrees; what the verifier adds (the
``detail`` line, the correlation ids, the ``screen`` reason) is recorded as it was when
the file was written, so a later change of any message or id shows up as a failing
vector.  Add a vector by adding a ``case(...)`` below and running this again.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sitelink.claims import INT_MAX, MAX_COMMAND_BYTES, Claims
from sitelink.codes import MGMT_COMMANDS, Cmd, MgmtCmd, Reason
from sitelink.golden import judge, load, verifier_for
from sitelink.jws import b64decode, b64encode, compact_json
from sitelink.sign import CommandSigner

OUT = Path(__file__).resolve().parents[2] / "sitelink" / "vectors" / "commands.json"

SITE = "site_123"
NOW = 1_767_225_600  # 2026-01-01T00:00:00Z
SKEW = 30
LIFETIME = 300
UNITS = ("unit_a101", "unit_a102")


def seed(name: str) -> bytes:
    """A test key's 32-byte seed: SHA-256 of a fixed text (anyone can rebuild it)."""
    return hashlib.sha256(f"sitelink golden vectors: {name}".encode()).digest()


KEYS = {name: Ed25519PrivateKey.from_private_bytes(seed(name))
        for name in ("relay-2026", "relay-2025", "stranger")}
TRUSTED = ("relay-2026", "relay-2025")


def public_text(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                        serialization.PublicFormat.Raw)
    return b64encode(raw).decode("ascii")


def clock() -> float:
    return float(NOW)


S26 = CommandSigner(KEYS["relay-2026"], "relay-2026", SITE, clock=clock)
S25 = CommandSigner(KEYS["relay-2025"], "relay-2025", SITE, clock=clock)
# A key nobody trusts, under a kid that is trusted: a forger who knows the kid.
FORGER = CommandSigner(KEYS["stranger"], "relay-2026", SITE, clock=clock)
UNTRUSTED_CLOCK = {"trusted": False, "why": "not synchronized"}

CASES: list[dict[str, Any]] = []


def case(name: str, token: bytes, expected: str | None, *, note: str = "",
         kind: str = "cmd", retained: bool = False, clock: dict[str, Any] | None = None,
         claims: dict[str, Any] | None = None, kid: str = "relay-2026") -> None:
    """One vector: ``expected`` is a reason, or ``None`` for accepted (then ``claims``
    are the ones signed, checked field by field against the verified command)."""
    assert all(c["name"] != name for c in CASES), name
    CASES.append({"name": name, "note": note, "kind": kind, "retained": retained,
                  "clock": clock, "token": token, "expected": expected, "claims": claims,
                  "kid": kid})


def claims(cmd: str = "unlock", unit: str | None = "unit_a101", *, jti: str,
           iat: int = NOW, ttl: int = 60, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"jti": jti, "aud": SITE, "iat": iat, "exp": iat + ttl, "cmd": cmd}
    if unit is not None:
        body["unit"] = unit
    if cmd in ("lockout", "clear_lockout") and "ver" not in extra:
        body["ver"] = 1
    for name, value in extra.items():
        if value is None:
            body.pop(name, None)
        else:
            body[name] = value
    return body


def accepted(name: str, body: dict[str, Any], *, signer: CommandSigner = S26,
             kind: str = "cmd", note: str = "", headers: dict[str, Any] | None = None) -> None:
    case(name, signer.sign(body, headers=headers), None, note=note, kind=kind, claims=body,
         kid=signer.kid)


def rejected(name: str, token: bytes, reason: Reason, *, note: str = "", kind: str = "cmd",
             retained: bool = False, clock: dict[str, Any] | None = None) -> None:
    case(name, token, str(reason), note=note, kind=kind, retained=retained, clock=clock)


def split(token: bytes) -> list[bytes]:
    return token.split(b".")


def flip_bit(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def noncanonical(segment: bytes) -> bytes:
    """The same bytes spelt differently: set an unused low bit of the last character."""
    assert len(segment) % 4 in (2, 3), len(segment)
    last = ALPHABET.index(segment[-1:]) ^ 1
    return segment[:-1] + ALPHABET[last:last + 1]


def sized(total: int, kind: str = "cmd") -> bytes:
    """A validly signed lock (or config.set) whose token is exactly ``total`` bytes."""
    for pad in range(total):
        if kind == "cmd":
            body = claims("lock", jti=f"size-{total}", pad="x" * pad)
        else:
            body = claims("config.set", None, jti=f"size-{total}", args={"toml": "x" * pad})
        token = S26.sign(body)
        if len(token) == total:
            return token
    raise AssertionError(f"no pad gives {total} bytes")


def hs256_over_public_key() -> bytes:
    """Algorithm confusion: HMAC-SHA256 keyed with the trusted public key's raw bytes."""
    raw = base64.urlsafe_b64decode(public_text(KEYS["relay-2026"]) + "=")
    signing_input = (b64encode(compact_json({"alg": "HS256", "typ": "JWT",
                                             "kid": "relay-2026"}))
                     + b"." + b64encode(compact_json(claims(jti="alg-confusion"))))
    return signing_input + b"." + b64encode(hmac.new(raw, signing_input,
                                                     hashlib.sha256).digest())


def build() -> None:
    # -- accepted ---------------------------------------------------------------------
    accepted("unlock-minimal", claims(jti="unlock-minimal"),
             note="dur absent: the lock's unlock_seconds")
    accepted("unlock-every-claim", claims(jti="unlock-every-claim", dur=3600, override=True,
                                          reason="tenant locked in", contact="cont_1",
                                          actor="tenant app"))
    accepted("unlock-dur-1", claims(jti="unlock-dur-1", dur=1), note="dur lower bound")
    accepted("lock", claims("lock", jti="lock"))
    accepted("lockout-ver-0", claims("lockout", jti="lockout-ver-0", ver=0),
             note="ver lower bound")
    accepted("clear-lockout-ver-max", claims("clear_lockout", "unit_a102",
                                             jti="clear-lockout-ver-max", ver=INT_MAX),
             note="ver upper bound 2**63-1")
    accepted("second-trusted-key", claims("lock", jti="second-trusted-key"), signer=S25,
             note="key rotation: both kids verify")
    accepted("unknown-claims-ignored", claims("lock", jti="unknown-claims-ignored", sub="x",
                                              x_future={"a": [1, 2.5]}, nbf=NOW - 5),
             note="forward compatibility; nbf in the past")
    accepted("header-without-typ", claims("lock", jti="header-without-typ"),
             headers={"typ": None}, note="typ is not required")
    accepted("header-extra-parameter", claims("lock", jti="header-extra-parameter"),
             headers={"x": "ignored"})
    accepted("jti-64", claims("lock", jti="j" * 64), note="jti upper bound")
    accepted("reason-200", claims(jti="reason-200", override=True, reason="r" * 200),
             note="reason upper bound")
    accepted("actor-100", claims("lock", jti="actor-100", actor="a" * 100))
    accepted("contact-64", claims("lock", jti="contact-64", contact="c" * 64))
    accepted("override-false-reason-empty", claims(jti="override-false-reason-empty",
                                                   override=False, reason=""))
    deep: Any = 1
    for _ in range(31):  # the claims object is level 1, so 31 more make 32
        deep = [deep]
    accepted("nesting-32", claims("lock", jti="nesting-32", x=deep), note="depth limit")
    edge = sized(MAX_COMMAND_BYTES)
    case("size-4096", edge, None, note="exactly the size limit",
         claims=json.loads(b64decode(split(edge)[1]) or b""))
    # Time boundaries: skew 30, max lifetime 300, now = config.now.
    accepted("exp-plus-skew-is-now-plus-1", claims("lock", jti="exp-edge", iat=NOW - 89),
             note="exp + skew = now + 1: still valid")
    accepted("iat-is-now-plus-skew", claims("lock", jti="iat-edge", iat=NOW + SKEW),
             note="iat = now + skew: inclusive")
    accepted("nbf-is-now-plus-skew", claims("lock", jti="nbf-edge", nbf=NOW + SKEW))
    accepted("lifetime-is-max", claims("lock", jti="lifetime-edge", iat=NOW - 10,
                                       ttl=LIFETIME), note="exp - iat = max_lifetime_s")
    accepted("lifetime-0", claims("lock", jti="lifetime-0", ttl=0))
    # Management requests.
    for name in sorted(MGMT_COMMANDS):
        accepted(f"mgmt-{name}", claims(name, None, jti=f"mgmt-{name}"), kind="mgmt")
    accepted("mgmt-args", claims(MgmtCmd.CONFIG_GET, None, jti="mgmt-args",
                                 args={"offset": 0, "x": {"deep": [1, None, "a"]}}),
             kind="mgmt")
    accepted("mgmt-unit-not-looked-up", claims(MgmtCmd.LOCKS_TEST, "unit_elsewhere",
                                               jti="mgmt-unit-not-looked-up"), kind="mgmt")
    big = sized(5000, "mgmt")
    case("mgmt-5000-bytes", big, None, kind="mgmt", note="over the command limit, under "
         "the management one", claims=json.loads(b64decode(split(big)[1]) or b""))

    # -- retained and size --------------------------------------------------------------
    rejected("retained-valid", S26.sign(claims(jti="retained-valid")), Reason.RETAINED,
             retained=True, note="ids peeked, unverified")
    rejected("retained-garbage", b"garbage", Reason.RETAINED, retained=True)
    rejected("retained-oversize", b"x" * 10_000, Reason.RETAINED, retained=True,
             note="retained beats size")
    rejected("size-4097", sized(MAX_COMMAND_BYTES + 1), Reason.MALFORMED,
             note="one byte over the limit, validly signed")
    rejected("mgmt-5000-bytes-as-command", big, Reason.MALFORMED,
             note="the command topic's limit is 4096")
    rejected("oversize-dots", b"." * (MAX_COMMAND_BYTES + 1), Reason.MALFORMED,
             note="size beats shape")

    # -- shape ----------------------------------------------------------------------------
    good = S26.sign(claims(jti="shape"))
    header, payload, signature = split(good)
    rejected("empty", b"", Reason.MALFORMED)
    rejected("not-ascii", b"\xff\x00garbage", Reason.MALFORMED)
    rejected("two-segments", header + b"." + payload, Reason.MALFORMED)
    rejected("four-segments", good + b"." + signature, Reason.MALFORMED)
    rejected("empty-header-segment", b"." + payload + b"." + signature, Reason.MALFORMED)
    rejected("padded-header", header + b"=." + payload + b"." + signature, Reason.MALFORMED)
    rejected("whitespace", good + b"\n", Reason.MALFORMED)
    rejected("base64-not-url", good.replace(b"-", b"+").replace(b"_", b"/") + b"+",
             Reason.MALFORMED)
    tok = next(t for n in range(8)
               if len(split(t := S26.sign(claims(jti="nc-h"), headers={"x": "y" * n}))[0])
               % 4 in (2, 3))
    hdr = split(tok)[0]
    rejected("noncanonical-header", noncanonical(hdr) + tok[len(hdr):], Reason.MALFORMED)
    tok = next(t for n in range(1, 8)
               if len(split(t := S26.sign(claims(jti="p" * n)))[1]) % 4 in (2, 3))
    h, p, s = split(tok)
    rejected("noncanonical-payload", b".".join((h, noncanonical(p), s)), Reason.MALFORMED,
             note="ids peeked from nothing: None")
    rejected("header-not-json", S26.sign_raw(b"{alg:EdDSA}", compact_json(claims(jti="hnj"))),
             Reason.MALFORMED)
    rejected("header-array", S26.sign_raw(b'["EdDSA"]', compact_json(claims(jti="harr"))),
             Reason.MALFORMED, note="ids are peeked from the payload")
    rejected("header-duplicate-key",
             S26.sign_raw(b'{"alg":"EdDSA","kid":"relay-2026","kid":"relay-2025"}',
                          compact_json(claims(jti="hdup"))), Reason.MALFORMED)

    # -- header: algorithm and key ---------------------------------------------------------
    none = S26.sign(claims(jti="alg-none"), headers={"alg": "none"})
    rejected("alg-none-empty-signature", none.rsplit(b".", 1)[0] + b".", Reason.BAD_SIGNATURE,
             note="RFC 7519 unsecured JWT")
    rejected("alg-none-real-signature", none, Reason.BAD_SIGNATURE)
    rejected("alg-confusion-hs256", hs256_over_public_key(), Reason.BAD_SIGNATURE,
             note="HMAC keyed with the trusted public key")
    rejected("alg-lowercase", S26.sign(claims(jti="alg-lc"), headers={"alg": "eddsa"}),
             Reason.BAD_SIGNATURE)
    rejected("alg-ed25519", S26.sign(claims(jti="alg-ed"), headers={"alg": "Ed25519"}),
             Reason.BAD_SIGNATURE, note="exactly EdDSA")
    rejected("alg-missing", S26.sign(claims(jti="alg-missing"), headers={"alg": None}),
             Reason.BAD_SIGNATURE)
    rejected("alg-not-a-string", S26.sign(claims(jti="alg-int"), headers={"alg": 1}),
             Reason.BAD_SIGNATURE)
    for name, value in (("crit", ["b64"]), ("jku", "https://attacker.example/keys.json"),
                        ("jwk", {"kty": "OKP", "crv": "Ed25519",
                                 "x": public_text(KEYS["relay-2026"])}),
                        ("x5u", "https://attacker.example/cert.pem"), ("x5c", ["MIIB"]),
                        ("b64", False)):
        rejected(f"forbidden-header-{name}",
                 S26.sign(claims(jti=f"forbidden-{name}"), headers={name: value}),
                 Reason.BAD_SIGNATURE)
    rejected("kid-unknown", S26.sign(claims(jti="kid-unknown"), headers={"kid": "relay-2099"}),
             Reason.UNKNOWN_KEY)
    rejected("kid-missing", S26.sign(claims(jti="kid-missing"), headers={"kid": None}),
             Reason.UNKNOWN_KEY)
    rejected("kid-not-a-string", S26.sign(claims(jti="kid-int"), headers={"kid": 2026}),
             Reason.UNKNOWN_KEY)
    rejected("alg-beats-kid", S26.sign(claims(jti="order-1"),
                                       headers={"alg": "HS256", "kid": "nobody"}),
             Reason.BAD_SIGNATURE)
    rejected("kid-beats-signature", FORGER.sign(claims(jti="order-2"), headers={"kid": "x"}),
             Reason.UNKNOWN_KEY)

    # -- signature --------------------------------------------------------------------------
    body = claims(jti="sig")
    token = S26.sign(body)
    h, p, s = split(token)
    sig = b64decode(s)
    assert sig is not None
    rejected("forged-under-trusted-kid", FORGER.sign(claims(jti="forged-1")),
             Reason.BAD_SIGNATURE, note="ids echoed, claims_verified false")
    rejected("signature-bit-flipped", b".".join((h, p, b64encode(flip_bit(sig, 77)))),
             Reason.BAD_SIGNATURE)
    tampered = compact_json({**body, "unit": "unit_a102"})
    rejected("payload-changed", b".".join((h, b64encode(tampered), s)), Reason.BAD_SIGNATURE,
             note="another unit under the same signature")
    rejected("signature-truncated", b".".join((h, p, s[:85])), Reason.BAD_SIGNATURE)
    rejected("signature-63-bytes", b".".join((h, p, b64encode(sig[:63]))), Reason.BAD_SIGNATURE)
    rejected("signature-extended", b".".join((h, p, s + b"AA")), Reason.BAD_SIGNATURE)
    rejected("signature-empty", b".".join((h, p, b"")), Reason.BAD_SIGNATURE)
    rejected("signature-noncanonical", b".".join((h, p, noncanonical(s))),
             Reason.BAD_SIGNATURE, note="the same 64 bytes spelt differently")
    rejected("signature-of-other-kid", S26.sign(body, headers={"kid": "relay-2025"}),
             Reason.BAD_SIGNATURE, note="signed by relay-2026, names relay-2025")
    other = S26.sign({**body, "jti": "sig2"})
    rejected("signature-spliced", b".".join((h, p, split(other)[2])), Reason.BAD_SIGNATURE)
    rejected("signature-beats-claims", FORGER.sign({"jti": 5}), Reason.BAD_SIGNATURE,
             note="a forger learns nothing about the claim rules")
    rejected("forged-and-expired", FORGER.sign(claims(jti="forged-2", iat=NOW - 1000)),
             Reason.BAD_SIGNATURE, note="screen() says expired; verify() never does")

    # -- claims (all malformed) ---------------------------------------------------------------
    def bad(name: str, body: dict[str, Any], note: str = "", *, kind: str = "cmd") -> None:
        rejected(f"claims-{name}", S26.sign(body), Reason.MALFORMED, note=note, kind=kind)

    bad("jti-missing", {k: v for k, v in claims(jti="x").items() if k != "jti"})
    bad("jti-empty", claims(jti=""))
    bad("jti-65", claims(jti="j" * 65), "jti upper bound; the id is not echoed")
    bad("jti-control-character", claims(jti="a\nb"))
    bad("aud-missing", claims(jti="aud-missing", aud=None))
    bad("aud-not-a-string", claims(jti="aud-int", aud=123))
    bad("iat-float", claims(jti="iat-float", iat=float(NOW)), "1767225600.0 is not an integer")
    bad("iat-true", claims(jti="iat-true", iat=True))
    bad("iat-negative", claims(jti="iat-neg", iat=-1))
    bad("exp-over-int-max", claims(jti="exp-big", exp=INT_MAX + 1))
    bad("exp-before-iat", claims(jti="exp-before-iat", exp=NOW - 1))
    bad("nbf-string", claims(jti="nbf-str", nbf=str(NOW)))
    bad("cmd-unknown", claims("open", jti="cmd-unknown"))
    bad("cmd-wrong-case", claims("Unlock", jti="cmd-case"))
    bad("cmd-mgmt-on-cmd-topic", claims("status", None, jti="cmd-status"))
    bad("cmd-command-on-mgmt-topic", claims(jti="mgmt-unlock"), kind="mgmt")
    bad("unit-missing", claims("lock", None, jti="unit-missing"))
    bad("unit-65", claims("lock", "u" * 65, jti="unit-65"))
    bad("dur-0", claims(jti="dur-0", dur=0), "dur lower bound")
    bad("dur-3601", claims(jti="dur-3601", dur=3601), "dur upper bound")
    bad("dur-on-lock", claims("lock", jti="dur-on-lock", dur=5))
    bad("override-not-bool", claims(jti="ovr-int", override=1, reason="r"))
    bad("override-without-reason", claims(jti="ovr-none", override=True))
    bad("override-blank-reason", claims(jti="ovr-blank", override=True, reason="   "))
    bad("override-on-lock", claims("lock", jti="ovr-lock", override=False))
    bad("reason-201", claims(jti="reason-201", override=True, reason="r" * 201))
    bad("reason-on-lock", claims("lock", jti="reason-lock", reason="why"))
    bad("ver-missing", claims("lockout", jti="ver-missing", ver=None))
    bad("ver-negative", claims("lockout", jti="ver-neg", ver=-1))
    bad("ver-on-unlock", claims(jti="ver-unlock", ver=3))
    bad("contact-65", claims("lock", jti="contact-65", contact="c" * 65))
    bad("contact-null", claims("lock", jti="contact-null", contact="placeholder")
        | {"contact": None}, "null is never a stand-in for an absent claim")
    bad("actor-101", claims("lock", jti="actor-101", actor="a" * 101))
    bad("args-on-command", claims("lock", jti="args-cmd", args={}))
    bad("args-not-object", claims(MgmtCmd.STATUS, None, jti="args-list", args=[1]),
        kind="mgmt")
    rejected("claims-not-an-object", S26.sign_raw(compact_json({"alg": "EdDSA",
                                                                "kid": "relay-2026"}),
                                                  b"[1,2]"), Reason.MALFORMED)
    base = compact_json(claims("lock", jti="json"))[:-1]
    raw_cases = {
        "duplicate-key": base + b',"unit":"unit_a102"}',
        "nan": base + b',"x":NaN}',
        "infinity": base + b',"x":-Infinity}',
        "huge-float": base + b',"x":1e400}',
        "invalid-utf8": base + b',"x":"\xff"}',
        "bom": b"\xef\xbb\xbf" + base + b"}",
        "trailing-garbage": base + b"}x",
        "truncated": base,
        "nesting-33": base + b',"x":' + b"[" * 32 + b"1" + b"]" * 32 + b"}",
        "empty-payload": b"",
        "utf16": json.dumps(claims("lock", jti="json")).encode("utf-16"),
    }
    for name, raw in raw_cases.items():
        rejected(f"json-{name}", S26.sign_raw(compact_json({"alg": "EdDSA", "typ": "JWT",
                                                            "kid": "relay-2026"}), raw),
                 Reason.MALFORMED)

    # -- context: site, clock, time, unit -----------------------------------------------------
    rejected("wrong-site", S26.sign(claims(jti="wrong-site", aud="site_456")),
             Reason.WRONG_SITE)
    rejected("wrong-site-case", S26.sign(claims(jti="wrong-site-case", aud="SITE_123")),
             Reason.WRONG_SITE)
    rejected("claims-beat-site", S26.sign(claims(jti="order-3", aud="other", dur=0)),
             Reason.MALFORMED)
    rejected("site-beats-clock", S26.sign(claims(jti="order-4", aud="other")),
             Reason.WRONG_SITE, clock=UNTRUSTED_CLOCK)
    rejected("clock-untrusted", S26.sign(claims(jti="clock-untrusted")),
             Reason.CLOCK_UNTRUSTED, clock=UNTRUSTED_CLOCK, note="retryable")
    rejected("clock-beats-freshness", S26.sign(claims("lock", jti="order-5", iat=NOW - 10_000,
                                                      ttl=60)),
             Reason.CLOCK_UNTRUSTED, clock=UNTRUSTED_CLOCK)
    rejected("lifetime-max-plus-1", S26.sign(claims("lock", jti="lifetime-301", iat=NOW - 10,
                                                    ttl=LIFETIME + 1)),
             Reason.LIFETIME_TOO_LONG)
    rejected("lifetime-beats-expiry", S26.sign(claims("lock", jti="order-6", iat=NOW - 10_000,
                                                      ttl=1000)),
             Reason.LIFETIME_TOO_LONG)
    rejected("exp-plus-skew-is-now", S26.sign(claims("lock", jti="expired-edge",
                                                     iat=NOW - 90)),
             Reason.EXPIRED, note="exp + skew = now: the upper bound is exclusive")
    rejected("expired-long-ago", S26.sign(claims("lock", jti="expired-old", iat=NOW - 86_400)),
             Reason.EXPIRED)
    rejected("iat-is-now-plus-skew-plus-1", S26.sign(claims("lock", jti="nyv-edge",
                                                            iat=NOW + SKEW + 1)),
             Reason.NOT_YET_VALID)
    rejected("nbf-is-now-plus-skew-plus-1", S26.sign(claims("lock", jti="nbf-future",
                                                            nbf=NOW + SKEW + 1)),
             Reason.NOT_YET_VALID)
    rejected("freshness-beats-unit", S26.sign(claims("lock", "unit_nowhere", jti="order-7",
                                                     iat=NOW - 100)),
             Reason.EXPIRED)
    rejected("unknown-unit-reference", S26.sign(claims(Cmd.UNLOCK, "A-101", jti="uu-ref")),
             Reason.UNKNOWN_UNIT, note="a reference label is not accepted from the network")
    rejected("unknown-unit-case", S26.sign(claims(Cmd.UNLOCK, "UNIT_A101", jti="uu-case")),
             Reason.UNKNOWN_UNIT)
    rejected("unknown-unit-space", S26.sign(claims(Cmd.LOCK, "unit_a101 ", jti="uu-space")),
             Reason.UNKNOWN_UNIT)


def signing_vectors() -> list[dict[str, Any]]:
    """Claims and the byte-exact token each key must make of them."""
    out = []
    relay = Claims(jti="sign-1", aud=SITE, iat=NOW, exp=NOW + 300, cmd="lockout",
                   unit="unit_a101", ver=1767225599123, actor="webhook unit.updated")
    for name, signer, body, headers in (
        ("unlock", S26, claims(jti="sign-unlock", dur=8, contact="cont_1"), {}),
        ("lockout-from-claims-dataclass", S25, relay.as_dict(), {}),
        ("mgmt-config-get", S26, claims("config.get", None, jti="sign-mgmt",
                                        args={"offset": 0}), {}),
        ("header-without-typ", S26, claims("lock", jti="sign-no-typ"), {"typ": None}),
    ):
        out.append({"name": name, "kid": signer.kid, "headers": headers, "claims": body,
                    "token": signer.sign(body, headers=headers).decode("ascii")})
    return out


def token_field(token: bytes) -> dict[str, str]:
    if all(0x20 < b < 0x7f for b in token) or not token:
        return {"token": token.decode("ascii")}
    return {"token_hex": token.hex()}


def expected_command(spec: dict[str, Any]) -> dict[str, Any]:
    body = spec["claims"]
    return {"jti": body["jti"], "cmd": body["cmd"], "unit": body.get("unit"),
            "kid": spec["kid"], "iat": body["iat"], "exp": body["exp"],
            "dur": body.get("dur"), "ver": body.get("ver"),
            "override": body.get("override", False), "reason": body.get("reason"),
            "contact": body.get("contact"), "actor": body.get("actor"),
            "args": body.get("args", {}) if spec["kind"] == "mgmt" else {}}


def main() -> int:
    build()
    doc: dict[str, Any] = {
        "description": "Golden vectors of the signed command envelope (contract §5): each "
                       "token with the verdict every implementation must give it under "
                       "`config`. Format: sitelink/golden.py. Written by "
                       "tests/sitelink/make_vectors.py; the keys are test keys, never "
                       "trust them.",
        "format": 1,
        "config": {"site_id": SITE,
                   "trusted_keys": {kid: public_text(KEYS[kid]) for kid in TRUSTED},
                   "clock_skew_s": SKEW, "max_lifetime_s": LIFETIME, "now": NOW,
                   "units": list(UNITS)},
        "keys": {name: {"seed_hex": seed(name).hex(), "public": public_text(key),
                        "trusted": name in TRUSTED} for name, key in KEYS.items()},
        "signing": signing_vectors(),
        "vectors": [],
    }
    golden = load(json.dumps({**doc, "vectors": [
        {"name": c["name"], "kind": c["kind"], "retained": c["retained"], "clock": c["clock"],
         **token_field(c["token"]), "expect": {}} for c in CASES]}))
    problems = []
    for spec, vector in zip(CASES, golden.vectors, strict=True):
        verdict = judge(vector, verifier_for(golden, vector))
        if spec["expected"] is None:
            if verdict["verdict"] != "accepted":
                problems.append(f"{spec['name']}: expected accepted, got {verdict}")
            elif verdict["command"] != expected_command(spec):
                problems.append(f"{spec['name']}: {verdict['command']} != "
                                f"{expected_command(spec)}")
        elif verdict.get("reason") != spec["expected"]:
            problems.append(f"{spec['name']}: expected {spec['expected']}, got {verdict}")
        doc["vectors"].append({"name": spec["name"], "note": spec["note"],
                               "kind": spec["kind"], "retained": spec["retained"],
                               "clock": spec["clock"], **token_field(spec["token"]),
                               "expect": verdict})
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    OUT.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    reasons = sorted({v["expect"].get("reason") or "accepted" for v in doc["vectors"]})
    print(f"{OUT}: {len(doc['vectors'])} vectors ({', '.join(reasons)}), "
          f"{len(doc['signing'])} signing vectors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
