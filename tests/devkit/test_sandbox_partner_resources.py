"""The partner sandbox's operators over real HTTP (devkit/sandbox/): sites and units as
stora-api §5 and §8 shape them, paging and filters, scopes, isolation between operators,
per-operator rate limits and timeline events, and the admin API that builds operators.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest

from devkit.sandbox import Sandbox
from devkit.testing import FakeClock
from tests.devkit.test_sandbox_partner_helpers import (
    add_operators,
    api_error,
    bearer,
    connect,
    options,
)
from tests.support.sandbox import STATIC, event_body

PAGINATION = {"count", "page", "pages", "limit", "next", "prev", "last"}
UNIT_KEYS = {"id", "reference_id", "status", "site", "unit_type", "unit_allocation",
             "created_at", "updated_at"}


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


def _ids(r: httpx.Response, name: str) -> list[str]:
    assert r.status_code == 200, r.text
    return [item["id"] for item in r.json()[name]]


# -- sites and units -------------------------------------------------------------------------
def test_sites_have_the_documented_fields_and_access_hours(
        client: httpx.Client, acme: dict[str, str]) -> None:
    doc = client.get("/2025-09/sites/site_acme1", headers=acme).json()
    site = doc["site"]
    assert set(site) >= {"id", "name", "description", "phone", "address", "directions",
                         "images", "opened_at", "access_hours"}
    assert site["name"] == "Acme North"
    hours = site["access_hours"]
    assert list(hours) == ["monday", "tuesday", "wednesday", "thursday", "friday",
                           "saturday", "sunday"]
    assert hours["monday"] == {"status": "set_hours", "open": "08:00", "close": "20:00"}
    assert hours["sunday"] == {"status": "closed", "open": None, "close": None}
    assert hours["tuesday"] == {"status": "twenty_four_hours", "open": None, "close": None}
    assert doc["meta"]["request_id"]
    r = client.get("/2025-09/sites", headers=acme)
    assert set(_ids(r, "sites")) == {"site_acme1", "site_acme2"}
    assert set(r.json()["meta"]["pagination"]) == PAGINATION


def test_units_have_the_documented_fields(client: httpx.Client, acme: dict[str, str]) -> None:
    unit = client.get("/2025-09/units/unit_acme_occ", headers=acme).json()["unit"]
    assert set(unit) == UNIT_KEYS
    assert unit["reference_id"] == "A-200"
    assert unit["status"] == "occupied"
    assert unit["site"] == {"id": "site_acme1"}
    assert unit["unit_type"]["id"].startswith("utype_")
    assert unit["unit_allocation"]["id"].startswith("alloc_")
    assert unit["created_at"].endswith("Z")
    assert len(unit["created_at"]) == len("2027-01-15T08:00:00.500Z")
    free = client.get("/2025-09/units/unit_acme1", headers=acme).json()["unit"]
    assert free["status"] == "available"
    assert free["unit_allocation"] is None


def test_updated_at_strictly_increases_on_each_change_even_on_a_frozen_clock(
        sandbox: Sandbox, client: httpx.Client, acme: dict[str, str]) -> None:
    stamps = []
    for status in ("occupied", "overlocked", "occupied", "available"):
        event = sandbox.set_unit_status("unit_acme1", status)
        assert event["data"]["unit"]["status"] == status
        unit = client.get("/2025-09/units/unit_acme1", headers=acme).json()["unit"]
        assert unit == event["data"]["unit"]
        stamps.append(datetime.fromisoformat(unit["updated_at"]))
    assert stamps == sorted(set(stamps))
    assert unit["unit_allocation"] is None


def test_lists_page_as_documented(client: httpx.Client, acme: dict[str, str]) -> None:
    r = client.get("/2025-09/units", params={"limit": 3}, headers=acme)
    assert r.json()["meta"]["pagination"] == {"count": 7, "page": 1, "pages": 3, "limit": 3,
                                              "next": 2, "prev": None, "last": 3}
    seen = _ids(r, "units")
    for page in (2, 3):
        r = client.get("/2025-09/units", params={"limit": 3, "page": page}, headers=acme)
        seen += _ids(r, "units")
    assert r.json()["meta"]["pagination"]["next"] is None
    assert r.json()["meta"]["pagination"]["prev"] == 2
    assert len(seen) == len(set(seen)) == 7
    assert _ids(client.get("/2025-09/units", params={"page": 9}, headers=acme), "units") == []
    default = client.get("/2025-09/units", headers=acme).json()["meta"]["pagination"]
    assert default["limit"] == 50
    asc = _ids(client.get("/2025-09/units", params={"sort_direction": "ASC"}, headers=acme),
               "units")
    assert asc[0] == "unit_acme1"


@pytest.mark.parametrize(
    "query",
    [{"page": "0"}, {"page": "x"}, {"limit": "0"}, {"limit": "101"}, {"status": "lost"},
     {"sort_by": "name"}, {"sort_direction": "UP"}],
)
def test_bad_list_parameters_are_422(client: httpx.Client, acme: dict[str, str],
                                     query: dict[str, str]) -> None:
    api_error(client.get("/2025-09/units", params=query, headers=acme), 422, "invalid_url_param")


def test_units_filter_by_site_and_status(
        sandbox: Sandbox, client: httpx.Client, acme: dict[str, str]) -> None:
    def units(**query: str) -> set[str]:
        return set(_ids(client.get("/2025-09/units", params=query, headers=acme), "units"))

    assert units(site_id="site_acme2") == {"unit_acme_s1"}
    assert units(status="occupied") == {"unit_acme_occ"}
    sandbox.set_unit_status("unit_acme2", "overlocked")
    sandbox.set_unit_status("unit_acme_s1", "repossessed")
    assert units(status="overlock") == units(status="overlocked") == {"unit_acme2"}
    assert units(status="occupied,repossessed") == {"unit_acme_occ", "unit_acme_s1"}
    assert units(status="occupied", site_id="site_acme2") == set()
    assert units(site_id="site_bolt1") == set()  # another operator's site: nothing


def test_scopes_are_required(client: httpx.Client) -> None:
    only_units = bearer(connect(client, "acme", scope="public.unit:read")["access_token"])
    api_error(client.get("/2025-09/sites", headers=only_units), 403, "forbidden")
    api_error(client.get("/2025-09/sites/site_acme1", headers=only_units), 403, "forbidden")
    api_error(client.get("/2025-09/webhook_endpoints", headers=only_units), 403, "forbidden")
    api_error(client.get("/2025-09/units"), 401, "invalid_token")
    api_error(client.get("/2025-09/units", headers={**only_units, "Accept": "text/csv"}),
              406, "invalid_format")


def test_another_operators_resources_are_not_found(
        client: httpx.Client, acme: dict[str, str]) -> None:
    bolt = bearer(connect(client, "bolt")["access_token"])
    for path in ("/2025-09/units/unit_acme1", "/2025-09/sites/site_acme1"):
        assert client.get(path, headers=acme).status_code == 200
        api_error(client.get(path, headers=bolt), 404, "resource_not_found")
    api_error(client.get("/2025-09/units/unit_nope", headers=acme), 404, "resource_not_found")
    assert _ids(client.get("/2025-09/units", headers=bolt), "units") == ["unit_bolt1"]
    # the default operator (static tokens) has none of them
    assert _ids(client.get("/2025-09/units", headers=bearer(STATIC)), "units") == []


# -- per-operator budgets and events -----------------------------------------------------------
def test_each_operator_has_its_own_rate_limit(clock: FakeClock) -> None:
    with Sandbox(**options(clock, max_per_second=3, max_per_minute=100)) as sb, \
            httpx.Client(base_url=sb.url, timeout=5) as c:
        add_operators(sb)
        sb.set_consent("acme", "approve")
        tokens = {op: bearer(connect(c, op)["access_token"]) for op in ("acme", "bolt")}
        clock.advance(1.0)  # the exchanges counted against each operator's budget
        for _ in range(3):
            assert c.get("/2025-09/units", headers=tokens["acme"]).status_code == 200
        r = c.get("/2025-09/units", headers=tokens["acme"])
        api_error(r, 429, "too_many_requests")
        assert r.headers["ratelimit-limit"] == "3"
        for _ in range(3):  # bolt's budget is untouched, and so is the default's
            assert c.get("/2025-09/units", headers=tokens["bolt"]).status_code == 200
            assert c.get("/2025-09/units", headers=bearer(STATIC)).status_code == 200
        state = sb.state()["operators"]
        assert state["acme"]["rate_limited"] == 1
        assert state["bolt"]["rate_limited"] == 0
        assert state["acme"]["max_in_1s"] == 4  # the refused one is counted as arriving
        clock.advance(1.0)
        assert c.get("/2025-09/units", headers=tokens["acme"]).status_code == 200


def test_timeline_events_belong_to_the_operator_of_the_token(
        sandbox: Sandbox, client: httpx.Client, acme: dict[str, str]) -> None:
    r = client.post("/2025-09/timeline/events", json=event_body("e-acme"), headers=acme)
    assert r.status_code == 201
    assert r.json()["event"]["creator"]["id"].startswith("app_")
    r = client.post("/2025-09/timeline/events", json=event_body("e-default"),
                    headers=bearer(STATIC))
    assert r.status_code == 201
    assert [e["external"]["id"] for e in sandbox.events("acme")] == ["e-acme"]
    assert [e["external"]["id"] for e in sandbox.events("default")] == ["e-default"]
    assert len(sandbox.events()) == 2
    listed = client.get("/_sandbox/events", params={"operator": "acme"}).json()["events"]
    assert [e["external"]["id"] for e in listed] == ["e-acme"]
    assert len(client.get("/_sandbox/events").json()["events"]) == 2
    assert sandbox.operator_state("acme")["events"] == 1


def test_idempotency_keys_belong_to_an_operator(
        client: httpx.Client, acme: dict[str, str]) -> None:
    key = {"Idempotency-Key": "same-key"}
    a = client.post("/2025-09/timeline/events", json=event_body("a"), headers={**acme, **key})
    d = client.post("/2025-09/timeline/events", json=event_body("d"),
                    headers={**bearer(STATIC), **key})
    assert a.json()["event"]["external"]["id"] == "a"
    assert d.json()["event"]["external"]["id"] == "d"
    again = client.post("/2025-09/timeline/events", json=event_body("a"),
                        headers={**acme, **key})
    assert again.content == a.content


# -- the admin API of operators ------------------------------------------------------------------
def test_operators_sites_and_units_through_the_admin_api(client: httpx.Client) -> None:
    r = client.post("/_sandbox/operators", json={
        "id": "cove", "name": "Cove", "sites": [{"name": "Cove One", "access_hours": {
            "saturday": {"status": "set_hours", "open": "09:00", "close": "17:00"}},
            "units": [{"reference_id": "C-1", "status": "reserved"}]}]})
    assert r.status_code == 201, r.text
    op = r.json()["operator"]
    site = op["sites"][0]["id"]
    assert site.startswith("site_")
    assert op["sites"][0]["access_hours"]["saturday"]["open"] == "09:00"
    assert op["units"][0]["status"] == "reserved"
    r = client.post("/_sandbox/operators/cove/sites", json={"id": "site_cove2", "name": "Two"})
    assert r.status_code == 201
    r = client.post("/_sandbox/operators/cove/units", json={
        "site_id": "site_cove2", "id": "unit_cove9", "reference_id": "C-9"})
    assert r.json()["unit"]["site"] == {"id": "site_cove2"}
    r = client.post("/_sandbox/units/unit_cove9", json={"status": "occupied"})
    assert r.json()["unit"]["status"] == "occupied"
    assert r.json()["event"]["type"] == "unit.updated"
    assert client.get("/_sandbox/units/unit_cove9").json()["unit"]["status"] == "occupied"
    r = client.post("/_sandbox/units/unit_cove9", json={"status": "available",
                                                         "allocation_id": None})
    assert r.json()["unit"]["unit_allocation"] is None
    state = client.get("/_sandbox/operators/cove").json()["operator"]
    assert len(state["units"]) == 2
    assert state["webhook_events"] == 2
    events = client.get("/_sandbox/operators/cove/webhook_events").json()["webhook_events"]
    assert [e["data"]["unit"]["status"] for e in events] == ["occupied", "available"]
    ids = [o["id"] for o in client.get("/_sandbox/operators").json()["operators"]]
    assert ids == ["default", "acme", "bolt", "cove"]


@pytest.mark.parametrize(
    ("path", "body"),
    [("/_sandbox/operators", {"id": "Bad Id"}),
     ("/_sandbox/operators", {"id": "acme"}),  # exists
     ("/_sandbox/operators", {"id": "x", "sites": [{"units": [{"status": "lost"}]}]}),
     ("/_sandbox/operators", {"id": "x", "sites": [{"access_hours": {"funday": "24h"}}]}),
     ("/_sandbox/operators", {"id": "x", "sites": [{"access_hours": {"monday": "8-20"}}]}),
     ("/_sandbox/operators", {"id": "x", "sites": [{"id": "site_acme1"}]}),  # taken
     ("/_sandbox/operators", {"id": "x", "colour": "red"}),
     ("/_sandbox/operators/nope/sites", {"name": "n"}),
     ("/_sandbox/operators/acme/units", {"site_id": "site_bolt1"}),
     ("/_sandbox/units/unit_acme1", {"status": "gone"}),
     ("/_sandbox/units/unit_nope", {"status": "occupied"}),
     ("/_sandbox/units/unit_acme1", {"status": "occupied", "allocation_id": "x"}),
     ("/_sandbox/oauth", {"consent": {"operator": "nope"}}),
     ("/_sandbox/oauth", {"consent": {"auto": "approve"}})],
)
def test_the_admin_api_refuses_bad_specs(client: httpx.Client, path: str,
                                         body: dict[str, Any]) -> None:
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]
    assert [o["id"] for o in client.get("/_sandbox/operators").json()["operators"]] == [
        "default", "acme", "bolt"]
