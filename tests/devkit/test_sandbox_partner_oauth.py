"""The partner sandbox's Authorization Code flow over real HTTP (devkit/sandbox/): the
consent page, PKCE, single-use and short-lived codes, refresh rotation with immediate
revocation, revoked grants, and the admin switches of the flow.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from devkit.sandbox import Sandbox
from devkit.testing import FakeClock
from tests.devkit.test_sandbox_partner_helpers import (
    ACCESS_TTL,
    CLIENT_ID,
    CLIENT_SECRET,
    REDIRECT,
    SCOPES,
    add_operators,
    api_error,
    approve,
    authorize_query,
    bearer,
    connect,
    exchange,
    oauth_error,
    options,
    pkce,
    redirected,
    refresh,
)
from tests.support.sandbox import T0


@pytest.fixture
def sandbox_options(clock: FakeClock) -> dict[str, Any]:
    return options(clock)


@pytest.fixture
def client(sandbox: Sandbox) -> Iterator[httpx.Client]:
    add_operators(sandbox)
    with httpx.Client(base_url=sandbox.url, timeout=5) as c:
        yield c


# -- the consent page -----------------------------------------------------------------------
def test_the_consent_page_names_the_app_the_scopes_and_the_operators(
        client: httpx.Client) -> None:
    _, challenge = pkce()
    r = client.get("/oauth2/authorize", params=authorize_query(challenge))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    page = r.text
    assert "TestRelay" in page
    for scope in SCOPES.split():
        assert f'<li class="scope">{scope}</li>' in page
    assert '<select id="operator" name="operator">' in page
    assert '<option value="acme">' in page
    assert '<option value="bolt">' in page
    assert '<button type="submit" id="approve" name="decision" value="approve">' in page
    assert '<button type="submit" id="deny" name="decision" value="deny">' in page
    assert 'action="/oauth2/authorize"' in page

    only = client.get("/oauth2/authorize", params={**authorize_query(challenge),
                                                    "operator": "bolt"}).text
    assert '<option value="bolt" selected>' in only
    assert '<option value="acme"' not in only


def test_approve_redirects_with_a_code_and_deny_with_access_denied(
        client: httpx.Client) -> None:
    verifier, challenge = pkce()
    code = approve(client, "acme", challenge)
    assert exchange(client, code, verifier).status_code == 200

    form = {**authorize_query(challenge), "operator": "acme", "decision": "deny"}
    got = redirected(client.post("/oauth2/authorize", data=form))
    assert got["error"] == "access_denied"
    assert got["state"] == "st-1"
    assert "code" not in got


@pytest.mark.parametrize(
    "bad",
    [{"client_id": "someone-else"}, {"client_id": ""},
     {"redirect_uri": "https://evil.example/cb"}, {"redirect_uri": REDIRECT + "/extra"},
     {"redirect_uri": ""}],
)
def test_a_bad_client_or_redirect_uri_gets_a_page_and_no_redirect(
        client: httpx.Client, bad: dict[str, str]) -> None:
    _, challenge = pkce()
    for r in (client.get("/oauth2/authorize", params=authorize_query(challenge, **bad)),
              client.post("/oauth2/authorize", data={**authorize_query(challenge, **bad),
                                                     "operator": "acme",
                                                     "decision": "approve"})):
        assert r.status_code == 400
        assert "location" not in r.headers
        assert r.headers["content-type"].startswith("text/html")
        assert 'id="error"' in r.text


@pytest.mark.parametrize(
    ("bad", "error"),
    [({"code_challenge": ""}, "invalid_request"),
     ({"code_challenge_method": "plain"}, "invalid_request"),
     ({"code_challenge_method": ""}, "invalid_request"),
     ({"code_challenge": "short"}, "invalid_request"),
     ({"response_type": "token"}, "unsupported_response_type"),
     ({"scope": ""}, "invalid_scope"),
     ({"scope": "admin"}, "invalid_scope")],
)
def test_bad_requests_are_redirected_with_an_error(
        client: httpx.Client, bad: dict[str, str], error: str) -> None:
    _, challenge = pkce()
    got = redirected(client.get("/oauth2/authorize", params=authorize_query(challenge, **bad)))
    assert got["error"] == error
    assert got["state"] == "st-1"


def test_the_consent_page_can_answer_by_itself_for_scripts(
        sandbox: Sandbox, client: httpx.Client) -> None:
    verifier, challenge = pkce()
    r = client.post("/_sandbox/oauth", json={"consent": {"operator": "bolt",
                                                         "auto": "approve"}})
    assert r.status_code == 200
    assert r.json()["oauth"]["consent_auto"] == "approve"
    got = redirected(client.get("/oauth2/authorize", params=authorize_query(challenge)))
    token = exchange(client, got["code"], verifier).json()["access_token"]
    units = client.get("/2025-09/units", headers=bearer(token)).json()["units"]
    assert [u["id"] for u in units] == ["unit_bolt1"]

    sandbox.set_consent("acme", "deny")
    got = redirected(client.get("/oauth2/authorize", params=authorize_query(challenge)))
    assert got["error"] == "access_denied"
    sandbox.set_consent("acme")  # a default operator only: the page again, acme selected
    page = client.get("/oauth2/authorize", params=authorize_query(challenge)).text
    assert '<option value="acme" selected>' in page


# -- the code ---------------------------------------------------------------------------------
def test_the_code_gives_tokens_of_the_operator_with_the_scopes_granted(
        sandbox: Sandbox, client: httpx.Client) -> None:
    doc = connect(client, "acme", scope="public.unit:read")
    assert set(doc) == {"access_token", "token_type", "expires_in", "scope", "created_at",
                        "refresh_token"}
    assert doc["token_type"] == "Bearer"
    assert doc["expires_in"] == ACCESS_TTL
    assert doc["scope"] == "public.unit:read"
    assert doc["created_at"] == int(T0)
    assert doc["refresh_token"]
    h = bearer(doc["access_token"])
    assert client.get("/2025-09/units/unit_acme1", headers=h).status_code == 200
    api_error(client.get("/2025-09/sites", headers=h), 403, "forbidden")
    assert sandbox.operator_state("acme")["tokens_issued"] == 1


def test_a_pkce_mismatch_is_invalid_grant(client: httpx.Client) -> None:
    _, challenge = pkce()
    other, _ = pkce()
    code = approve(client, "acme", challenge)
    oauth_error(exchange(client, code, other), 400, "invalid_grant")
    # the code was spent by that attempt
    oauth_error(exchange(client, code, other), 400, "invalid_grant")


@pytest.mark.parametrize(
    "bad",
    [{"redirect_uri": "https://relay.example/other"}, {"code": "nope"},
     {"code_verifier": "x" * 43}],
)
def test_a_code_must_match_what_it_was_issued_for(
        client: httpx.Client, bad: dict[str, str]) -> None:
    verifier, challenge = pkce()
    code = approve(client, "acme", challenge)
    doc = {"code": code, "code_verifier": verifier, **bad}
    oauth_error(exchange(client, doc.pop("code"), doc.pop("code_verifier"), **doc),
                400, "invalid_grant")


def test_bad_client_credentials_are_invalid_client(client: httpx.Client) -> None:
    verifier, challenge = pkce()
    code = approve(client, "acme", challenge)
    oauth_error(exchange(client, code, verifier, client_secret="wrong"), 401, "invalid_client")
    oauth_error(exchange(client, code, verifier, client_id="other"), 401, "invalid_client")
    oauth_error(client.post("/oauth2/token", json={"grant_type": "authorization_code",
                                                   "code": code}), 400, "invalid_request")
    # the partner app may not use client credentials (stora-api §2.1)
    oauth_error(client.post("/oauth2/token", json={
        "grant_type": "client_credentials", "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET, "scope": SCOPES}), 400, "unauthorized_client")
    assert exchange(client, code, verifier).status_code == 200


def test_a_reused_code_is_invalid_grant_and_revokes_what_it_issued(
        client: httpx.Client) -> None:
    verifier, challenge = pkce()
    code = approve(client, "acme", challenge)
    first = exchange(client, code, verifier).json()
    h = bearer(first["access_token"])
    assert client.get("/2025-09/sites", headers=h).status_code == 200

    oauth_error(exchange(client, code, verifier), 400, "invalid_grant")
    api_error(client.get("/2025-09/sites", headers=h), 401, "invalid_token")
    oauth_error(refresh(client, first["refresh_token"]), 400, "invalid_grant")


def test_a_code_expires_after_60_s_of_sandbox_time(
        sandbox: Sandbox, client: httpx.Client) -> None:
    verifier, challenge = pkce()
    code = approve(client, "acme", challenge)
    sandbox.advance(60)
    oauth_error(exchange(client, code, verifier), 400, "invalid_grant")

    code = approve(client, "acme", challenge)
    sandbox.advance(59.9)
    assert exchange(client, code, verifier).status_code == 200


# -- refresh ------------------------------------------------------------------------------------
def test_refresh_rotates_and_revokes_the_old_tokens_at_once(
        sandbox: Sandbox, client: httpx.Client) -> None:
    first = connect(client, "acme")
    r = refresh(client, first["refresh_token"])
    assert r.status_code == 200
    second = r.json()
    assert second["access_token"] != first["access_token"]
    assert second["refresh_token"] != first["refresh_token"]
    assert second["expires_in"] == ACCESS_TTL
    assert second["scope"] == first["scope"]

    api_error(client.get("/2025-09/sites", headers=bearer(first["access_token"])),
              401, "invalid_token")
    assert client.get("/2025-09/sites",
                      headers=bearer(second["access_token"])).status_code == 200
    oauth_error(refresh(client, first["refresh_token"]), 400, "invalid_grant")
    # a failed reuse does not hurt the current pair
    assert client.get("/2025-09/sites",
                      headers=bearer(second["access_token"])).status_code == 200
    third = refresh(client, second["refresh_token"]).json()
    assert sandbox.operator_state("acme")["refreshes"] == 2
    assert sandbox.operator_state("acme")["active_tokens"] == 1
    assert client.get("/2025-09/sites", headers=bearer(third["access_token"])).status_code == 200


def test_access_tokens_expire_on_the_sandbox_clock_and_refresh_still_works(
        sandbox: Sandbox, client: httpx.Client) -> None:
    first = connect(client, "acme")
    sandbox.advance(ACCESS_TTL - 0.1)
    assert client.get("/2025-09/sites", headers=bearer(first["access_token"])).status_code == 200
    sandbox.advance(0.1)
    api_error(client.get("/2025-09/sites", headers=bearer(first["access_token"])),
              401, "invalid_token")
    second = refresh(client, first["refresh_token"]).json()
    assert second["created_at"] == int(T0 + ACCESS_TTL)
    assert client.get("/2025-09/sites",
                      headers=bearer(second["access_token"])).status_code == 200


def test_refresh_tokens_can_be_given_a_lifetime(sandbox: Sandbox, client: httpx.Client) -> None:
    r = client.post("/_sandbox/oauth", json={"refresh_token_ttl_s": 100, "access_token_ttl_s": 30,
                                             "code_ttl_s": 5})
    assert r.json()["oauth"] == {"access_token_ttl_s": 30, "refresh_token_ttl_s": 100,
                                 "code_ttl_s": 5, "consent_operator": None,
                                 "consent_auto": None}
    first = connect(client, "acme")
    assert first["expires_in"] == 30
    sandbox.advance(100)
    oauth_error(refresh(client, first["refresh_token"]), 400, "invalid_grant")
    assert client.post("/_sandbox/oauth", json={"refresh_token_ttl_s": None}).json()[
        "oauth"]["refresh_token_ttl_s"] is None
    assert client.post("/_sandbox/oauth", json={"code_ttl_s": -1}).status_code == 400


def test_a_refresh_may_narrow_but_not_widen_the_scopes(client: httpx.Client) -> None:
    first = connect(client, "acme", scope="public.site:read public.unit:read")
    oauth_error(refresh(client, first["refresh_token"], scope="public.contact:read"),
                400, "invalid_scope")
    narrowed = refresh(client, first["refresh_token"], scope="public.unit:read").json()
    assert narrowed["scope"] == "public.unit:read"
    oauth_error(refresh(client, narrowed["refresh_token"], client_secret="x"),
                401, "invalid_client")


def test_a_revoked_grant_stops_every_token_of_that_operator_only(
        sandbox: Sandbox, client: httpx.Client) -> None:
    acme = connect(client, "acme")
    acme2 = connect(client, "acme")
    bolt = connect(client, "bolt")
    r = client.post("/_sandbox/operators/acme/revoke")
    assert r.json() == {"revoked": 2}
    for doc in (acme, acme2):
        api_error(client.get("/2025-09/sites", headers=bearer(doc["access_token"])),
                  401, "invalid_token")
        oauth_error(refresh(client, doc["refresh_token"]), 400, "invalid_grant")
    assert client.get("/2025-09/sites", headers=bearer(bolt["access_token"])).status_code == 200
    assert sandbox.operator_state("acme")["grants"] == 0
    assert sandbox.operator_state("bolt")["grants"] == 1
    # the operator can connect again
    again = connect(client, "acme")
    assert client.get("/2025-09/sites", headers=bearer(again["access_token"])).status_code == 200


def test_the_partner_app_can_be_registered_through_the_admin_api(
        sandbox: Sandbox, client: httpx.Client) -> None:
    other = "https://other.example/cb"
    r = client.post("/_sandbox/partner_app", json={
        "client_id": "app2", "client_secret": "s2", "redirect_uris": [other],
        "name": "Second", "scopes": ["public.unit:read"]})
    assert r.status_code == 200
    assert sandbox.partner_app is not None
    assert sandbox.partner_app.name == "Second"
    _, challenge = pkce()
    query = authorize_query(challenge, client_id="app2", redirect_uri=other)
    r = client.get("/oauth2/authorize", params=query)
    assert r.status_code == 302
    assert "error=invalid_scope" in r.headers["location"]
    r = client.get("/oauth2/authorize", params={**query, "scope": "public.unit:read"})
    assert "Second" in r.text
    assert client.post("/_sandbox/partner_app", json={"client_id": "x"}).status_code == 400
    assert client.post("/_sandbox/partner_app", json={
        "client_id": "x", "client_secret": "y", "redirect_uris": ["nope"]}).status_code == 400


def test_the_authorize_page_is_not_rate_limited(sandbox: Sandbox, clock: FakeClock) -> None:
    with Sandbox(**options(clock, max_per_second=1, max_per_minute=1)) as sb, \
            httpx.Client(base_url=sb.url, timeout=5) as c:
        _, challenge = pkce()
        for _ in range(3):
            assert c.get("/oauth2/authorize",
                         params=authorize_query(challenge)).status_code == 200
