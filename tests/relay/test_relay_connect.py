"""Connecting an operator (contract §7.2) over real HTTP: the relay, the sandbox as Stora.

Approved: tokens stored encrypted, the operator's sites listed, one webhook endpoint
created (and reused on a second connect), a session for the connected page.  Denied,
replayed, forged or expired ``state``, and a code bound to another PKCE challenge: each a
plain-words page with status 400, and nothing stored.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from relay.connect import STATE_TTL_S
from relay.db.models import OAuthState, Operator
from tests.support.relay import stored_bytes
from tests.support.relay_stack import Stack, new_state, query_of, relay_stack


class Clock:
    """The relay's wall clock, movable (the sandbox keeps real time)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def stack(tmp_path: Path, clock: Clock) -> Iterator[Stack]:
    with relay_stack(tmp_path / "relay", services_options={"clock": clock}) as s:
        yield s


def operators(stack: Stack) -> int:
    with stack.services.db.session() as s:
        return s.scalar(select(func.count()).select_from(Operator)) or 0


def test_the_connect_page_says_what_and_why(stack: Stack) -> None:
    page = stack.browser.get("/")
    assert page.status_code == 200
    assert "Connect Stora" in page.text
    assert 'href="/connect"' in page.text
    for scope in stack.services.config.stora.scopes:
        assert f"<code>{scope}</code>" in page.text
    assert "not made, owned or endorsed by Stora" in page.text


def test_connect_redirects_with_state_and_pkce_s256(stack: Stack) -> None:
    query = stack.start_connect()
    assert query["response_type"] == "code"
    assert query["client_id"] == stack.services.config.stora.client_id
    assert query["redirect_uri"] == stack.callback_url
    assert query["scope"].split(" ") == list(stack.services.config.stora.scopes)
    assert query["code_challenge_method"] == "S256"
    assert len(query["state"]) >= 43
    assert len(query["code_challenge"]) == 43
    with stack.services.db.session() as s:
        row = s.scalars(select(OAuthState)).one()
        # Only a digest of the state is kept, and the verifier is encrypted.
        assert row.digest == hashlib.sha256(query["state"].encode()).hexdigest()
        assert query["state"] not in row.verifier_enc


def test_an_approved_connect_stores_encrypted_tokens_and_one_webhook(stack: Stack) -> None:
    page = stack.connect()
    assert "Your Stora account is connected to TestEntry" in page.text
    assert "Changes to your units in Stora now reach" in page.text
    assert "Acme North" in page.text
    assert "Acme South" in page.text
    state = stack.sandbox.operator_state("acme")
    endpoints = state["endpoints"]
    assert len(endpoints) == 1
    key = stack.services.operators.webhook_key(stack.services.operators.list()[0].id)
    assert endpoints[0]["url"] == f"{stack.relay.url}/webhooks/stora/{key}"
    assert endpoints[0]["metadata"] == {"relay": key}
    # Nothing readable at rest: the access token is nowhere in the database.
    operator_id = stack.services.operators.list()[0].id
    token = stack.services.operators.access_token(operator_id)
    assert token
    stored = stored_bytes(stack.services.db)
    assert operator_id.encode() in stored  # it does see the data
    assert token.encode() not in stored
    # The session shows the connected page on the next visit.
    again = stack.browser.get("/")
    assert "Acme North" in again.text
    assert "Connect Stora</a>" not in again.text


def test_connecting_again_is_the_same_operator_and_reuses_the_endpoint(stack: Stack) -> None:
    stack.connect()
    first = stack.services.operators.list()
    stack.browser.cookies.clear()
    stack.connect()
    assert [o.id for o in stack.services.operators.list()] == [o.id for o in first]
    assert len(stack.sandbox.operator_state("acme")["endpoints"]) == 1


def test_denied_consent_is_a_clear_page_and_stores_nothing(stack: Stack) -> None:
    page = stack.callback(stack.consent(stack.start_connect(), decision="deny"))
    assert page.status_code == 400
    assert "Stora was not connected" in page.text
    assert "nothing was stored" in page.text
    assert operators(stack) == 0


def test_a_replayed_callback_is_refused(stack: Stack) -> None:
    url = stack.consent(stack.start_connect())
    assert stack.callback(url).status_code == 200
    tokens_before = stack.sandbox.operator_state("acme")["tokens_issued"]
    replay = stack.callback(url)
    assert replay.status_code == 400
    assert "already used" in replay.text
    assert stack.sandbox.operator_state("acme")["tokens_issued"] == tokens_before


def test_a_state_the_relay_never_issued_is_refused(stack: Stack) -> None:
    url = stack.consent(stack.start_connect())
    forged = url.replace(query_of(url)["state"], new_state())
    page = stack.callback(forged)
    assert page.status_code == 400
    assert "not one this relay issued" in page.text
    assert operators(stack) == 0


def test_an_expired_state_is_refused(stack: Stack, clock: Clock) -> None:
    url = stack.consent(stack.start_connect())
    clock.offset = STATE_TTL_S + 1
    page = stack.callback(url)
    assert page.status_code == 400
    assert "has expired" in page.text
    assert operators(stack) == 0


def test_a_code_bound_to_another_pkce_challenge_is_refused(stack: Stack) -> None:
    """An attacker's code (their own challenge) injected into our callback: the exchange
    with our verifier fails at Stora, and nothing is stored."""
    ours = stack.start_connect()
    verifier = secrets.token_urlsafe(48)
    theirs = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()
                                      ).rstrip(b"=").decode()
    attacker = stack.consent({**ours, "code_challenge": theirs})
    page = stack.callback(attacker)
    assert page.status_code == 400
    assert "Stora refused the sign-in (invalid_grant)" in page.text
    assert operators(stack) == 0


def test_a_callback_without_state_is_refused(stack: Stack) -> None:
    page = stack.browser.get("/oauth/callback", params={"code": "x"})
    assert page.status_code == 400
    assert operators(stack) == 0


def test_an_account_with_no_sites_is_not_connected(stack: Stack) -> None:
    stack.sandbox.create_operator("empty", name="Nobody's Storage")
    page = stack.callback(stack.consent(stack.start_connect(), operator="empty"))
    assert page.status_code == 400
    assert "No sites to connect" in page.text
    assert operators(stack) == 0


def test_a_disabled_endpoint_is_replaced_not_replayed(stack: Stack) -> None:
    """Found in review: the create's fixed Idempotency-Key replayed the first endpoint
    (disabled since) for 24 h, and nothing was delivered."""
    stack.connect()
    first = stack.sandbox.operator_state("acme")["endpoints"][0]
    stack.sandbox.disable_endpoint(first["id"])
    stack.browser.cookies.clear()
    stack.connect()
    endpoints = stack.sandbox.operator_state("acme")["endpoints"]
    live = [e for e in endpoints if e["status"] == "enabled"]
    assert len(endpoints) == 2
    assert len(live) == 1
    assert live[0]["id"] != first["id"]
    assert stack.services.operators.list()[0].webhook_endpoint_id == live[0]["id"]
