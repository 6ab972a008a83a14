"""The Stora API sandbox over real HTTP (devkit/sandbox/): tokens, request validation and
idempotency.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest

from devkit.sandbox import EVENT_SCOPE, Sandbox
from devkit.testing import FakeClock
from tests.support.sandbox import (
    EVENTS,
    STATIC,
    T0,
    Response,
    call,
    event_body,
    get_token,
    post_event,
    state,
)


# -- tokens ---------------------------------------------------------------------------------
def test_urls_name_the_real_port() -> None:
    with Sandbox(port=0) as sb:
        assert sb.port > 0
        assert sb.url == f"http://127.0.0.1:{sb.port}"
        assert sb.api_url == sb.url + "/2025-09"
        assert sb.token_url == sb.url + "/oauth2/token"


def test_token_is_issued_and_creates_an_event(sandbox: Sandbox) -> None:
    r = get_token(sandbox)
    assert r.status == 200
    doc = r.json()
    assert set(doc) == {
        "access_token",
        "token_type",
        "expires_in",
        "scope",
        "created_at",
        "refresh_token",
    }
    assert doc["token_type"] == "Bearer"
    assert doc["expires_in"] == 7200
    assert doc["scope"] == EVENT_SCOPE
    assert doc["created_at"] == int(T0)
    assert doc["refresh_token"] is None

    r = post_event(
        sandbox,
        "ext-1",
        token=doc["access_token"],
        body=event_body("ext-1", contact={"id": "con_1"}),
    )
    assert r.status == 201
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"event", "meta"}
    assert body["meta"]["request_id"]
    event = body["event"]
    assert event["id"].startswith("aevt_")
    assert event["creator"]["id"].startswith("app_")
    assert event["source"] == {"id": "tsrc_test"}
    assert event["site"] == {"id": "site_1"}
    assert event["contact"] == {"id": "con_1"}
    assert event["external"] == {"id": "ext-1", "url": None}
    assert event["description"] == "Unit unlocked via TestApp — A-101"
    assert event["variables"] == {"unit": "unit_a", "reference": "A-101"}
    for key in ("unit", "unit_type", "tenancy", "subscription", "invoice", "template"):
        assert event[key] is None
    assert event["created_at"] == event["updated_at"] == "2027-01-15T08:00:00.500Z"
    assert sandbox.events() == [event]
    assert sandbox.count_by_external_id() == {"ext-1": 1}


def test_token_expires_on_the_clock(sandbox: Sandbox, clock: FakeClock) -> None:
    token = get_token(sandbox).json()["access_token"]
    clock.advance(7199.75)
    assert post_event(sandbox, "a", token=token).status == 201
    clock.advance(0.25)  # exactly 7200 s after issue
    r = post_event(sandbox, "b", token=token)
    assert r.status == 401
    error = r.error()
    assert error["code"] == "invalid_token"
    assert error["type"] == "invalid_request_error"
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert sandbox.count_by_external_id() == {"a": 1}


@pytest.mark.parametrize(
    ("change", "status", "error"),
    [
        ({"client_secret": "wrong"}, 401, "invalid_client"),
        ({"client_id": "nobody"}, 401, "invalid_client"),
        ({"grant_type": "password"}, 400, "unsupported_grant_type"),
        ({"scope": ""}, 400, "invalid_request"),
        ({"scope": "everything"}, 400, "invalid_scope"),
        ({"client_secret": None}, 400, "invalid_request"),
    ],
)
def test_bad_token_requests(
    sandbox: Sandbox, change: dict[str, Any], status: int, error: str
) -> None:
    body = {
        "grant_type": "client_credentials",
        "client_id": "cid",
        "client_secret": "secret",
        "scope": EVENT_SCOPE,
        **change,
    }
    r = call(sandbox, "POST", "/oauth2/token", {k: v for k, v in body.items() if v is not None})
    assert r.status == status
    doc = r.json()
    assert doc["error"] == error
    assert doc["error_description"]
    assert "access_token" not in doc


def test_token_endpoint_wants_json(sandbox: Sandbox) -> None:
    form = b"grant_type=client_credentials&client_id=cid&client_secret=secret&scope=x"
    r = call(
        sandbox, "POST", "/oauth2/token", form, content_type="application/x-www-form-urlencoded"
    )
    assert r.status == 400
    assert r.json()["error"] == "invalid_request"


@pytest.mark.parametrize("auth", [None, "Bearer nope", f"Basic {STATIC}", "Bearer"])
def test_events_need_a_valid_bearer_token(sandbox: Sandbox, auth: str | None) -> None:
    headers = {"Authorization": auth} if auth else {}
    r = post_event(sandbox, token=None, headers=headers)
    assert r.status == 401
    assert r.error()["code"] == "invalid_token"
    assert sandbox.events() == []


def test_static_token_is_accepted(sandbox: Sandbox) -> None:
    r = post_event(sandbox, token=STATIC)
    assert r.status == 201
    assert r.json()["event"]["creator"]["id"].startswith("tok_")


def test_event_scope_is_required(sandbox: Sandbox) -> None:
    token = get_token(sandbox, scope="public.site:read").json()["access_token"]
    r = post_event(sandbox, token=token)
    assert r.status == 403
    assert r.error()["code"] == "forbidden"
    assert sandbox.events() == []


# -- request validation -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "pointers"),
    [
        ({}, {"/source", "/external"}),
        ([], {""}),
        (event_body("x", source={"id": 7}), {"/source/id"}),
        (event_body("x", source={"id": "src_1"}), {"/source/id"}),
        (event_body("x", source={}), {"/source/id"}),
        (event_body("x", external={"url": "https://x"}), {"/external/id"}),
        (event_body("x", external={"id": ""}), {"/external/id"}),
        (event_body("x", external={"id": "x", "url": 5}), {"/external/url"}),
        (event_body("x", description=5), {"/description"}),
        (event_body("x", variables=["a"]), {"/variables"}),
        (event_body("x", contact={"id": "unit_1"}), {"/contact/id"}),
        (event_body("x", template="aetpl_1"), {"/template"}),
        (event_body("x", unit={"id": "unit_1"}), {"/unit"}),
    ],
)
def test_invalid_bodies_are_422_with_pointers(
    sandbox: Sandbox, body: object, pointers: set[str]
) -> None:
    r = post_event(sandbox, body=body)
    assert r.status == 422
    error = r.error()
    assert error["code"] == "invalid_content"
    assert error["type"] == "invalid_request_error"
    assert {d["pointer"] for d in error["details"]} == pointers
    assert all(d["message"] for d in error["details"])
    assert sandbox.events() == []


def test_optional_references_may_be_null(sandbox: Sandbox) -> None:
    body = event_body("x", contact=None, template=None, external={"id": "x", "url": None})
    assert post_event(sandbox, body=body).status == 201


def test_body_must_be_json(sandbox: Sandbox) -> None:
    headers = {"Authorization": f"Bearer {STATIC}"}
    r = call(sandbox, "POST", EVENTS, b"{not json", headers)
    assert (r.status, r.error()["code"]) == (400, "invalid_request")
    r = call(
        sandbox,
        "POST",
        EVENTS,
        json.dumps(event_body("x")).encode(),
        headers,
        content_type="text/plain",
    )
    assert (r.status, r.error()["code"]) == (400, "invalid_request")
    r = post_event(sandbox, headers={"Accept": "text/csv"})
    assert (r.status, r.error()["code"]) == (406, "invalid_format")
    assert post_event(sandbox, headers={"Accept": "application/json"}).status == 201


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/2025-09/tenancies"),  # /units exists since issue 14 (partner sandbox)
        ("GET", EVENTS),
        ("POST", "/nope"),
        ("PATCH", EVENTS + "/x"),
        ("GET", "/oauth2/token"),
    ],
)
def test_unknown_endpoints_are_404(sandbox: Sandbox, method: str, path: str) -> None:
    r = call(
        sandbox,
        method,
        path,
        {} if method != "GET" else None,
        {"Authorization": f"Bearer {STATIC}"},
    )
    assert r.status == 404
    assert r.error()["code"] == "invalid_endpoint"


# -- idempotency ------------------------------------------------------------------------------
def test_success_is_replayed_verbatim(sandbox: Sandbox) -> None:
    first = post_event(sandbox, "ext-1", key="k1")
    again = post_event(sandbox, "ext-1", key="k1")
    assert first.status == again.status == 201
    assert again.body == first.body
    assert sandbox.count_by_external_id() == {"ext-1": 1}
    assert [r.replayed for r in sandbox.requests] == [False, True]
    # A repeat with another body still gets the stored reply, but is flagged.
    other = post_event(sandbox, "ext-2", key="k1")
    assert (other.status, other.body) == (201, first.body)
    assert [r.body_mismatch for r in sandbox.requests] == [False, False, True]
    # The same document with its keys in another order is the same body.
    reordered = dict(reversed(list(event_body("ext-1").items())))
    post_event(sandbox, key="k1", body=reordered)
    assert sandbox.requests[-1].body_mismatch is False
    assert sandbox.count_by_external_id() == {"ext-1": 1}


def test_a_stored_500_is_replayed_and_nothing_is_created(sandbox: Sandbox) -> None:
    sandbox.fail_next(1)
    first = post_event(sandbox, "ext-1", key="k1")
    assert first.status == 500
    error = first.error()
    assert (error["code"], error["type"]) == ("internal_server_error", "api_error")
    again = post_event(sandbox, "ext-1", key="k1")
    assert (again.status, again.body) == (500, first.body)
    assert sandbox.events() == []
    # fail_next(1) was used up by the first request; a new key goes through.
    assert post_event(sandbox, "ext-1", key="k2").status == 201
    assert sandbox.count_by_external_id() == {"ext-1": 1}


def test_a_stored_422_is_replayed_even_for_a_fixed_body(sandbox: Sandbox) -> None:
    bad = post_event(sandbox, key="k1", body=event_body("x", description=5))
    assert bad.status == 422
    fixed = post_event(sandbox, "x", key="k1")
    assert (fixed.status, fixed.body) == (422, bad.body)
    assert sandbox.events() == []


def test_keys_expire_after_24_hours(sandbox: Sandbox, clock: FakeClock) -> None:
    first = post_event(sandbox, "ext-1", key="k1")
    clock.advance(86_399.75)
    replay = post_event(sandbox, "ext-1", key="k1")
    assert replay.body == first.body
    clock.advance(0.25)  # exactly 24 h after the reply was stored
    fresh = post_event(sandbox, "ext-1", key="k1")
    assert fresh.status == 201
    assert fresh.json()["event"]["id"] != first.json()["event"]["id"]
    assert sandbox.count_by_external_id() == {"ext-1": 2}
    assert state(sandbox)["duplicates"] == {"ext-1": 2}


def test_idempotency_ttl_is_configurable(clock: FakeClock) -> None:
    with Sandbox(static_tokens={STATIC}, idempotency_ttl_s=60, clock=clock) as sb:
        post_event(sb, key="k")
        clock.advance(60)
        post_event(sb, key="k")
        assert sb.count_by_external_id() == {"ext-1": 2}


def test_a_401_is_stored_by_default(sandbox: Sandbox) -> None:
    refused = post_event(sandbox, token="expired", key="k1")
    assert refused.status == 401
    again = post_event(sandbox, token=STATIC, key="k1")
    assert (again.status, again.body) == (401, refused.body)
    assert sandbox.events() == []


def test_storing_401s_can_be_switched_off(sandbox: Sandbox) -> None:
    sandbox.store_unauthorized = False
    assert post_event(sandbox, token="expired", key="k1").status == 401
    assert post_event(sandbox, token=STATIC, key="k1").status == 201


def test_a_key_in_progress_is_a_conflict(sandbox: Sandbox) -> None:
    sandbox.set_slow(1.0)
    results: list[Response] = []
    started = time.monotonic()
    first = threading.Thread(target=lambda: results.append(post_event(sandbox, key="k1")))
    first.start()
    time.sleep(0.3)  # the first is in the app by now, holding its key
    second = post_event(sandbox, key="k1")
    assert second.status == 409
    assert second.error()["code"] == "conflict"
    first.join()
    assert time.monotonic() - started >= 1.0  # slow: the first took that long
    assert results[0].status == 201
    sandbox.set_slow(0)
    third = post_event(sandbox, key="k1")
    assert (third.status, third.body) == (201, results[0].body)  # the 409 was not stored
    assert sandbox.count_by_external_id() == {"ext-1": 1}
