"""The golden vectors (sitelink/vectors/commands.json): every token gets its frozen verdict.

The relay runs the same file against its side; a change to a rule, its order, a message
or a correlation id fails a vector here first.  The file is written by
tests/sitelink/make_vectors.py and then frozen (see sitelink/golden.py for its format).
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sitelink.claims import MAX_COMMAND_BYTES
from sitelink.codes import MGMT_COMMANDS, VERIFIER_REASONS
from sitelink.errors import Rejection
from sitelink.golden import GoldenVectors, SigningVector, Vector, judge, load, verifier_for
from sitelink.jws import public_key_text
from sitelink.sign import CommandSigner

GOLDEN = load()


def test_the_file_is_well_formed() -> None:
    names = [v.name for v in GOLDEN.vectors]
    assert len(names) == len(set(names)), "vector names are unique"
    assert GOLDEN.config["now"] == 1_767_225_600
    for name, key in GOLDEN.keys.items():
        private = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(key["seed_hex"]))
        assert public_key_text(private) == key["public"], name
        trusted = GOLDEN.config["trusted_keys"].get(name)
        assert (trusted == key["public"]) is key["trusted"], name


@pytest.mark.parametrize("vector", GOLDEN.vectors, ids=[v.name for v in GOLDEN.vectors])
def test_vector(vector: Vector) -> None:
    assert judge(vector, verifier_for(GOLDEN, vector)) == vector.expect


def test_every_verifier_reason_and_boundary_is_covered() -> None:
    """The file covers each reason the verifier gives, both kinds, and the edges."""
    reasons = Counter(v.expect.get("reason", "accepted") for v in GOLDEN.vectors)
    assert set(reasons) == {str(r) for r in VERIFIER_REASONS} | {"accepted"}, reasons
    names = {v.name for v in GOLDEN.vectors}
    for edge in ("exp-plus-skew-is-now", "exp-plus-skew-is-now-plus-1", "iat-is-now-plus-skew",
                 "iat-is-now-plus-skew-plus-1", "lifetime-is-max", "lifetime-max-plus-1",
                 "size-4096", "size-4097", "alg-confusion-hs256", "kid-unknown",
                 "forged-under-trusted-kid", "retained-valid", "wrong-site",
                 "unknown-unit-reference", "clock-untrusted"):
        assert edge in names, edge
    assert {v.name.removeprefix("mgmt-") for v in GOLDEN.vectors if v.kind == "mgmt"} >= set(
        MGMT_COMMANDS)
    sizes = {v.name: len(v.token) for v in GOLDEN.vectors}
    assert sizes["size-4096"] == MAX_COMMAND_BYTES
    assert sizes["size-4097"] == MAX_COMMAND_BYTES + 1


def test_claims_first_agrees_with_the_vectors() -> None:
    """verify_claims_first accepts what verify accepts, and refuses the rest either with
    verify's reason or, screened, with the reason the claims alone earn."""
    for vector in GOLDEN.vectors:
        verifier = verifier_for(GOLDEN, vector)
        if vector.expect["verdict"] == "accepted":
            command = verifier.verify_claims_first(vector.token, retained=vector.retained)
            assert command == verifier.verify(vector.token, retained=vector.retained)
            continue
        with pytest.raises(Rejection) as info:
            verifier.verify_claims_first(vector.token, retained=vector.retained)
        expected = vector.expect["screen"] if info.value.screened else vector.expect["reason"]
        assert info.value.reason == expected, vector.name


@pytest.mark.parametrize("signing", GOLDEN.signing, ids=[s.name for s in GOLDEN.signing])
def test_signing_is_byte_exact(signing: SigningVector) -> None:
    """Ed25519 is deterministic: the same key, header and claims give the same token."""
    seed = bytes.fromhex(GOLDEN.keys[signing.kid]["seed_hex"])
    signer = CommandSigner(Ed25519PrivateKey.from_private_bytes(seed), signing.kid,
                           GOLDEN.config["site_id"])
    assert signer.sign(signing.claims, headers=signing.headers) == signing.token
    vector = Vector(name=signing.name, note="", kind="mgmt" if signing.claims["cmd"] in
                    MGMT_COMMANDS else "cmd", retained=False, clock=None,
                    token=signing.token, expect={})
    assert judge(vector, verifier_for(GOLDEN, vector))["verdict"] == "accepted"


def test_load_reads_a_given_text() -> None:
    """load() takes the text too (the relay may ship its own copy of the file)."""
    text = json.dumps({"config": GOLDEN.config, "keys": GOLDEN.keys, "signing": [],
                       "vectors": [{"name": "x", "token_hex": "ff00", "expect": {}}]})
    golden = load(text)
    assert isinstance(golden, GoldenVectors)
    assert golden.vectors[0].token == b"\xff\x00"
    assert golden.vectors[0].kind == "cmd"
