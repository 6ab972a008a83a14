"""The partner sandbox's webhooks over real HTTP (devkit/sandbox/): webhook endpoints
(stora-api §4.1), signed ``unit.updated`` deliveries (§4.2, §4.3), retries (§4.4), and the
switches that make deliveries hostile: duplicates, reordering, stale or kept ``t``, bad
signatures, disabled endpoints, forged bodies.  Deliveries reach a stdlib receiver on a
free port; tests wait on the sandbox's flush or on the receiver, never on a fixed sleep.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any, cast

import httpx
import pytest

from devkit.sandbox import Sandbox
from devkit.testing import FakeClock, wait_for
from tests.devkit.test_sandbox_partner_helpers import (
    Receiver,
    add_operators,
    api_error,
    bearer,
    connect,
    endpoint_body,
    options,
    verify,
)
from tests.support.sandbox import T0

ENDPOINTS = "/2025-09/webhook_endpoints"


@pytest.fixture
def sandbox_options(clock: FakeClock) -> dict[str, Any]:
    return options(clock)


@pytest.fixture
def client(sandbox: Sandbox) -> Iterator[httpx.Client]:
    add_operators(sandbox)
    with httpx.Client(base_url=sandbox.url, timeout=5) as c:
        yield c


@pytest.fixture
def acme(client: httpx.Client) -> dict[str, str]:
    return bearer(connect(client, "acme")["access_token"])


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def create(client: httpx.Client, token: dict[str, str], url: str,
           **extra: Any) -> dict[str, Any]:
    r = client.post(ENDPOINTS, json=endpoint_body(url, **extra), headers=token)
    assert r.status_code == 201, r.text
    return cast(dict[str, Any], r.json()["webhook_endpoint"])


# -- endpoints ---------------------------------------------------------------------------------
def test_the_secret_is_shown_once(client: httpx.Client, acme: dict[str, str],
                                  receiver: Receiver) -> None:
    created = create(client, acme, receiver.url, description="the relay")
    assert re.fullmatch(r"[0-9a-f]{64}", created["secret"])
    assert created["id"].startswith("we_")
    assert created["status"] == "enabled"
    assert created["disabled_at"] is None
    assert created["metadata"] == {"relay": "key-1"}
    assert created["creator"]["id"].startswith("app_")
    assert created["api_version"] == "2025-09"
    shown = client.get(f"{ENDPOINTS}/{created['id']}", headers=acme).json()["webhook_endpoint"]
    assert shown["secret"] is None
    assert {**shown, "secret": created["secret"]} == created
    listed = client.get(ENDPOINTS, headers=acme).json()["webhook_endpoints"]
    assert [e["secret"] for e in listed] == [None]


@pytest.mark.parametrize(
    ("change", "pointer"),
    [({"url": "http://relay.example/hook"}, "/url"),
     ({"url": "ftp://127.0.0.1/x"}, "/url"),
     ({"url": "https://user:pw@relay.example/"}, "/url"),
     ({"api_version": "2024-01"}, "/api_version"),
     ({"name": ""}, "/name"),
     ({"event_types": []}, "/event_types"),
     ({"event_types": ["unit.exploded"]}, "/event_types/0"),
     ({"metadata": {"Relay": "x"}}, "/metadata/Relay"),
     ({"metadata": {"relay": 1}}, "/metadata/relay"),
     ({"metadata": {f"k{i}": "v" for i in range(21)}}, "/metadata"),
     ({"colour": "red"}, "/colour")],
)
def test_bad_endpoints_are_422_with_pointers(client: httpx.Client, acme: dict[str, str],
                                             change: dict[str, Any], pointer: str) -> None:
    body = {**endpoint_body("https://relay.example/hook"), **change}
    error = api_error(client.post(ENDPOINTS, json=body, headers=acme), 422, "invalid_content")
    assert pointer in [d["pointer"] for d in error["details"]]


def test_https_and_local_http_urls_are_accepted(client: httpx.Client,
                                                acme: dict[str, str]) -> None:
    for url in ("https://relay.example/webhooks/stora/k", "http://localhost:8080/h",
                "http://127.0.0.1:9/h"):
        assert create(client, acme, url)["url"] == url


def test_endpoints_need_their_scopes(client: httpx.Client) -> None:
    reader = bearer(connect(client, "acme", scope="public.webhook_endpoint:read")["access_token"])
    api_error(client.post(ENDPOINTS, json=endpoint_body("https://r.example/"), headers=reader),
              403, "forbidden")
    assert client.get(ENDPOINTS, headers=reader).status_code == 200


def test_list_by_metadata_and_status_and_disable(
        client: httpx.Client, acme: dict[str, str]) -> None:
    one = create(client, acme, "https://r.example/1")
    two = create(client, acme, "https://r.example/2", metadata={"relay": "key-2", "env": "t"})
    bolt = bearer(connect(client, "bolt")["access_token"])
    create(client, bolt, "https://r.example/3")

    def listed(**query: str) -> list[str]:
        r = client.get(ENDPOINTS, params=query, headers=acme)
        assert r.status_code == 200, r.text
        return [e["id"] for e in r.json()["webhook_endpoints"]]

    assert set(listed()) == {one["id"], two["id"]}
    assert listed(**{"metadata[relay]": "key-1"}) == [one["id"]]
    assert listed(**{"metadata[relay]": "key-2", "metadata[env]": "t"}) == [two["id"]]
    assert listed(**{"metadata[relay]": "key-3"}) == []
    r = client.get(ENDPOINTS, params={"limit": 1, "page": 2}, headers=acme)
    assert r.json()["meta"]["pagination"]["count"] == 2
    assert len(r.json()["webhook_endpoints"]) == 1

    r = client.post(f"{ENDPOINTS}/{one['id']}/disable", headers=acme)
    assert r.status_code == 200
    assert r.json()["webhook_endpoint"]["status"] == "disabled"
    assert r.json()["webhook_endpoint"]["disabled_at"] is not None
    api_error(client.post(f"{ENDPOINTS}/{one['id']}/disable", headers=acme), 409, "conflict")
    api_error(client.post(f"{ENDPOINTS}/{one['id']}/disable", headers=bolt),
              404, "resource_not_found")
    api_error(client.get(f"{ENDPOINTS}/{one['id']}", headers=bolt), 404, "resource_not_found")
    assert listed(status="disabled") == [one["id"]]
    assert listed(status="enabled") == [two["id"]]
    api_error(client.get(ENDPOINTS, params={"status": "on"}, headers=acme),
              422, "invalid_url_param")


def test_a_create_with_an_idempotency_key_is_replayed(
        sandbox: Sandbox, client: httpx.Client, acme: dict[str, str]) -> None:
    h = {**acme, "Idempotency-Key": "we-1"}
    first = client.post(ENDPOINTS, json=endpoint_body("https://r.example/"), headers=h)
    again = client.post(ENDPOINTS, json=endpoint_body("https://r.example/"), headers=h)
    assert first.status_code == again.status_code == 201
    assert again.content == first.content  # the secret too: replayed verbatim
    assert len(sandbox.operator_state("acme")["endpoints"]) == 1


# -- deliveries ----------------------------------------------------------------------------------
def test_a_unit_change_is_delivered_signed(sandbox: Sandbox, client: httpx.Client,
                                           acme: dict[str, str], receiver: Receiver) -> None:
    secret = create(client, acme, receiver.url)["secret"]
    bolt = bearer(connect(client, "bolt")["access_token"])
    create(client, bolt, receiver.url + "-bolt")  # another operator's endpoint
    create(client, acme, receiver.url + "-other", event_types=["contact.created"])
    event = sandbox.set_unit_status("unit_acme1", "overlocked")
    assert sandbox.flush_deliveries()
    assert receiver.count() == 1
    hit = receiver.hits[0]
    assert hit.path == "/webhooks/stora/key-1"
    assert hit.headers["Content-Type"] == "application/json"
    assert hit.headers["User-Agent"] == "Stora-Webhooks/1.0"
    assert re.fullmatch(r"[0-9a-f-]{36}", hit.headers["X-Stora-Request-Id"])
    assert verify(secret, hit.headers["X-Stora-Signature"], hit.body) == int(T0)
    doc = json.loads(hit.body)
    assert set(doc) == {"event"}
    assert set(doc["event"]) == {"id", "type", "api_version", "created_at", "data"}
    assert doc["event"]["id"] == event["id"]
    assert doc["event"]["id"].startswith("evt_")
    assert doc["event"]["type"] == "unit.updated"
    assert doc["event"]["api_version"] == "2025-09"
    unit = doc["event"]["data"]["unit"]
    assert unit["id"] == "unit_acme1"
    assert unit["status"] == "overlocked"
    assert unit == client.get("/2025-09/units/unit_acme1", headers=acme).json()["unit"]
    log = sandbox.deliveries("acme")
    assert [d["state"] for d in log] == ["delivered"]
    assert log[0]["attempts"][0]["status"] == 200


def test_failures_are_retried_until_a_2xx(sandbox: Sandbox, client: httpx.Client,
                                          acme: dict[str, str]) -> None:
    receiver = Receiver(statuses=[500, 503, 404])
    try:
        secret = create(client, acme, receiver.url)["secret"]
        sandbox.set_unit_status("unit_acme1", "occupied")
        wait_for(lambda: sandbox.deliveries()[0]["state"] == "delivered", 10,
                 sandbox.deliveries)
        attempts = sandbox.deliveries()[0]["attempts"]
        assert [a["status"] for a in attempts] == [500, 503, 404, 200]
        assert receiver.count() == 4
        ids = {h.headers["X-Stora-Request-Id"] for h in receiver.hits}
        assert len(ids) == 4  # a new request id per attempt
        assert len({h.body for h in receiver.hits}) == 1  # the same event each time
        for hit in receiver.hits:
            verify(secret, hit.headers["X-Stora-Signature"], hit.body)
    finally:
        receiver.close()


def test_a_delivery_fails_after_its_retries_and_when_nobody_listens(
        sandbox: Sandbox, client: httpx.Client, acme: dict[str, str]) -> None:
    receiver = Receiver(statuses=[500] * 10)
    try:
        create(client, acme, receiver.url)
        create(client, acme, "http://127.0.0.1:9/closed")  # discard port: refused
        sandbox.set_unit_status("unit_acme1", "occupied")
        wait_for(lambda: all(d["state"] == "failed" for d in sandbox.deliveries()), 10,
                 sandbox.deliveries)
        for d in sandbox.deliveries():
            assert len(d["attempts"]) == 4  # the first and 3 retries
        refused = next(d for d in sandbox.deliveries() if d["url"].endswith("/closed"))
        assert refused["attempts"][0]["status"] is None
        assert refused["attempts"][0]["error"]
        assert sandbox.state()["webhooks"]["failed"] == 2
    finally:
        receiver.close()


def test_a_disabled_endpoint_gets_nothing(sandbox: Sandbox, client: httpx.Client,
                                          acme: dict[str, str], receiver: Receiver) -> None:
    endpoint = create(client, acme, receiver.url)
    sandbox.pause_deliveries()
    sandbox.set_unit_status("unit_acme1", "occupied")  # queued while enabled
    r = client.post(f"/_sandbox/webhook_endpoints/{endpoint['id']}/disable")
    assert r.json()["webhook_endpoint"]["status"] == "disabled"
    sandbox.set_unit_status("unit_acme1", "available")  # not even queued
    assert sandbox.flush_deliveries()
    assert receiver.count() == 0
    assert [d["state"] for d in sandbox.deliveries()] == ["skipped"]


def test_pause_holds_and_flush_sends(sandbox: Sandbox, client: httpx.Client,
                                     acme: dict[str, str], receiver: Receiver) -> None:
    create(client, acme, receiver.url)
    assert client.post("/_sandbox/webhooks", json={"pause": True}).json()["webhooks"]["paused"]
    sandbox.set_unit_status("unit_acme1", "occupied")
    sandbox.set_unit_status("unit_acme2", "occupied")
    assert sandbox.state()["webhooks"]["queued"] == 2
    assert receiver.count() == 0
    r = client.post("/_sandbox/webhooks", json={"flush": True})
    assert r.json()["webhooks"]["paused"] is False
    assert receiver.count() == 2
    units = [json.loads(h.body)["event"]["data"]["unit"]["id"] for h in receiver.hits]
    assert units == ["unit_acme1", "unit_acme2"]
    assert len(client.get("/_sandbox/deliveries", params={"operator": "acme"}).json()[
        "deliveries"]) == 2
    assert client.get("/_sandbox/deliveries", params={"operator": "bolt"}).json()[
        "deliveries"] == []


# -- hostile switches ------------------------------------------------------------------------------
def test_duplicate_sends_the_same_event_twice(sandbox: Sandbox, client: httpx.Client,
                                              acme: dict[str, str], receiver: Receiver) -> None:
    secret = create(client, acme, receiver.url)["secret"]
    client.post("/_sandbox/webhooks", json={"duplicate": 1})
    sandbox.set_unit_status("unit_acme1", "occupied")
    sandbox.set_unit_status("unit_acme1", "available")
    assert sandbox.flush_deliveries()
    ids = [json.loads(h.body)["event"]["id"] for h in receiver.hits]
    assert len(ids) == 3
    assert ids[0] == ids[1] != ids[2]
    assert receiver.hits[0].headers["X-Stora-Request-Id"] != \
        receiver.hits[1].headers["X-Stora-Request-Id"]
    for hit in receiver.hits:
        verify(secret, hit.headers["X-Stora-Signature"], hit.body)


def test_reorder_delivers_newest_first(sandbox: Sandbox, client: httpx.Client,
                                       acme: dict[str, str], receiver: Receiver) -> None:
    create(client, acme, receiver.url)
    sandbox.webhook_faults(reorder=3)
    for status in ("occupied", "overlocked", "occupied"):
        sandbox.set_unit_status("unit_acme1", status)
    assert sandbox.flush_deliveries()
    units = [json.loads(h.body)["event"]["data"]["unit"] for h in receiver.hits]
    assert [u["status"] for u in units] == ["occupied", "overlocked", "occupied"][::-1]
    stamps = [u["updated_at"] for u in units]
    assert stamps == sorted(stamps, reverse=True)
    sandbox.set_unit_status("unit_acme1", "available")  # the switch was one-shot
    assert sandbox.flush_deliveries()
    assert json.loads(receiver.hits[-1].body)["event"]["data"]["unit"]["status"] == "available"


def test_stale_t_signs_with_an_old_timestamp(sandbox: Sandbox, client: httpx.Client,
                                             acme: dict[str, str], receiver: Receiver) -> None:
    secret = create(client, acme, receiver.url)["secret"]
    client.post("/_sandbox/webhooks", json={"stale_t": 1})
    sandbox.set_unit_status("unit_acme1", "occupied")
    sandbox.set_unit_status("unit_acme1", "available")
    assert sandbox.flush_deliveries()
    stamps = [verify(secret, h.headers["X-Stora-Signature"], h.body) for h in receiver.hits]
    assert stamps == [int(T0) - 3600, int(T0)]  # still a valid signature, just old


@pytest.mark.parametrize("keep", [False, True])
def test_retries_renew_or_keep_t(sandbox: Sandbox, client: httpx.Client,
                                 acme: dict[str, str], keep: bool) -> None:
    receiver = Receiver(statuses=[500])
    try:
        secret = create(client, acme, receiver.url)["secret"]
        sandbox.webhook_faults(retry_s=[3600], keep_t_on_retry=keep)  # no retry by itself
        sandbox.set_unit_status("unit_acme1", "occupied")
        assert sandbox.flush_deliveries()
        sandbox.advance(1800)  # half an hour, like Stora's third retry
        assert sandbox.flush_deliveries()
        stamps = [verify(secret, h.headers["X-Stora-Signature"], h.body)
                  for h in receiver.hits]
        assert stamps == [int(T0), int(T0) if keep else int(T0) + 1800]
        assert sandbox.deliveries()[0]["state"] == "delivered"
    finally:
        receiver.close()


def test_bad_signature(sandbox: Sandbox, client: httpx.Client, acme: dict[str, str],
                       receiver: Receiver) -> None:
    secret = create(client, acme, receiver.url)["secret"]
    client.post("/_sandbox/webhooks", json={"bad_signature": 1})
    sandbox.set_unit_status("unit_acme1", "occupied")
    sandbox.set_unit_status("unit_acme1", "available")
    assert sandbox.flush_deliveries()
    with pytest.raises(AssertionError, match="bad signature"):
        verify(secret, receiver.hits[0].headers["X-Stora-Signature"], receiver.hits[0].body)
    verify(secret, receiver.hits[1].headers["X-Stora-Signature"], receiver.hits[1].body)


def test_forged_and_hand_made_deliveries(sandbox: Sandbox, client: httpx.Client,
                                         acme: dict[str, str]) -> None:
    receiver = Receiver(statuses=[401, 200, 200])
    try:
        endpoint = create(client, acme, receiver.url)
        path = f"/_sandbox/webhook_endpoints/{endpoint['id']}/deliver"
        forged = client.post(path, json={"body": '{"event": {}}', "secret": "not-the-secret"})
        assert forged.json()["attempt"]["status"] == 401
        with pytest.raises(AssertionError):
            verify(endpoint["secret"], receiver.hits[0].headers["X-Stora-Signature"],
                   receiver.hits[0].body)
        made = client.post(path, json={"body": "raw", "t": 12345})
        assert made.json()["attempt"]["status"] == 200
        assert verify(endpoint["secret"], receiver.hits[1].headers["X-Stora-Signature"],
                      b"raw") == 12345
        bare = sandbox.deliver_raw(endpoint["id"], b"{}", sign=False,
                                   headers={"X-Extra": "1"})
        assert bare["status"] == 200
        assert "X-Stora-Signature" not in receiver.hits[2].headers
        assert receiver.hits[2].headers["X-Extra"] == "1"
        assert [d["raw"] for d in sandbox.deliveries()] == [True, True, True]
    finally:
        receiver.close()


@pytest.mark.parametrize(
    "body",
    [{"duplicate": -1}, {"pause": 1}, {"retry_s": [-1]}, {"timeout_s": 0}, {"nope": 1}],
)
def test_the_webhook_switches_refuse_bad_values(client: httpx.Client,
                                                body: dict[str, Any]) -> None:
    r = client.post("/_sandbox/webhooks", json=body)
    assert r.status_code == 400
    assert r.json()["error"]
