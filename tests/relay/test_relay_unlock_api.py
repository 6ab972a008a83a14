"""The unlock API (contract §7.2) over real HTTP: 200 and 202, idempotent retries, late
results, an offline gateway, a double tap, and 401/403/404/422.

The gateway here is a thread that answers the relay's pending commands by recording
results as the MQTT link would (``relay.commands.apply_result``); the MQTT path itself
is tests/relay/test_relay_link.py's.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from relay.commands import apply_result
from relay.db.models import Command, UnitState
from relay.operators import Operators, StoraSite
from relay.services import Services
from relay.stora import TokenSet
from tests.support.relay import PollingDispatch, RelayServer, metric, relay_on_disk

SITE, OTHER = "site_api1", "site_api2"


@dataclass
class FakeGateway:
    """Answers pending commands of one site after ``delay`` seconds (``None``: never)."""

    services: Services
    delay: float | None = 0.05
    answered: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self._stop.wait(0.02):
            if self.delay is None:
                continue
            with self.services.db.session() as s:
                rows = s.scalars(select(Command).where(Command.status == "pending")).all()
                due = [r.jti for r in rows
                       if time.time() - r.created_at >= self.delay and r.jti not in self.answered]
            for jti in due:
                self.answer(jti, "done")

    def answer(self, jti: str, status: str, reason: str | None = None) -> None:
        with self.services.db.session() as s:
            row = s.get(Command, jti)
            assert row is not None
            apply_result(s, row.site_id, {"jti": jti, "status": status, "reason": reason,
                                          "duplicate": False,
                                          "state": {"unit": row.unit_id, "lock": "unlocked"}},
                         time.time())
        self.answered.append(jti)


@dataclass
class Api:
    http: httpx.Client
    key: str
    other_key: str
    gateway: FakeGateway
    dispatch: PollingDispatch
    services: Services

    def unlock(self, unit: str = "unit_1", site: str = SITE, *, key: str | None = None,
               wait: float | None = None, body: object = None,
               idem: str | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key or self.key}"}
        if idem:
            headers["Idempotency-Key"] = idem
        params = {} if wait is None else {"wait": wait}
        return self.http.post(f"/v1/sites/{site}/units/{unit}/unlock", json=body,
                              headers=headers, params=params)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    relay = relay_on_disk(tmp_path / "relay")
    services = relay.services()
    operators: Operators = services.operators
    op = operators.connect(TokenSet("at", "rt", 7200, "", 0), [StoraSite(SITE, "One")])
    other = operators.connect(TokenSet("at2", "rt2", 7200, "", 0), [StoraSite(OTHER, "Two")])
    services.sites.add(SITE, op)
    services.sites.add(OTHER, other)
    with services.db.session() as s:
        for unit, site, owner in (("unit_1", SITE, op), ("unit_2", SITE, op),
                                  ("unit_x", OTHER, other)):
            s.add(UnitState(operator_id=owner, unit_id=unit, site_id=site, status="occupied",
                            ver=1, lockout=False, confirmed_ver=None, updated_at=0))
    _, key = services.api_keys.create(op, "front desk", "staff")
    _, other_key = services.api_keys.create(other, "elsewhere", "staff")
    gateway = FakeGateway(services)
    thread = threading.Thread(target=gateway.run, daemon=True)
    thread.start()
    dispatch = PollingDispatch(services.db)
    with RelayServer(services, dispatch) as server, \
            httpx.Client(base_url=server.url, timeout=30) as http:
        yield Api(http, key, other_key, gateway, dispatch, services)
    gateway._stop.set()
    thread.join()
    services.close()


def test_an_unlock_answered_in_time_is_200_with_the_final_record(api: Api) -> None:
    answer = api.unlock(body={"seconds": 5, "actor": "desk 2"})
    assert answer.status_code == 200
    record = answer.json()
    assert set(record) == {"id", "site", "unit", "cmd", "status", "reason", "duplicate",
                           "created_at", "result_at", "state"}
    assert (record["status"], record["cmd"], record["unit"]) == ("done", "unlock", "unit_1")
    assert record["state"] == {"unit": "unit_1", "lock": "unlocked"}
    assert api.dispatch.notified == 1
    with api.services.db.session() as s:
        row = s.get(Command, record["id"])
        assert row is not None
        assert row.token is not None
        claims = json.loads(_payload(row.token))
    assert (claims["dur"], claims["actor"], claims["aud"]) == (5, "desk 2", SITE)
    assert claims["exp"] - claims["iat"] <= 60


def _payload(token: str) -> bytes:
    part = token.split(".")[1]
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def test_no_result_within_wait_is_202_and_a_late_result_updates_the_record(api: Api) -> None:
    api.gateway.delay = None
    answer = api.unlock(wait=0.3)
    assert answer.status_code == 202
    record = answer.json()
    assert record["status"] == "pending"
    assert answer.headers["location"] == f"/v1/commands/{record['id']}"
    api.gateway.answer(record["id"], "done")
    later = api.http.get(answer.headers["location"],
                         headers={"Authorization": f"Bearer {api.key}"})
    assert later.status_code == 200
    assert later.json()["status"] == "done"


def test_the_same_idempotency_key_returns_the_same_record(api: Api) -> None:
    first = api.unlock(idem="tap-1")
    again = api.unlock(idem="tap-1")
    assert first.json()["id"] == again.json()["id"]
    with api.services.db.session() as s:
        assert len(s.scalars(select(Command)).all()) == 1
    other_unit = api.unlock("unit_2", idem="tap-1")
    assert other_unit.status_code == 422
    assert other_unit.json()["error"]["code"] == "idempotency_key_reused"


def test_a_double_tap_returns_the_pending_unlock(api: Api) -> None:
    api.gateway.delay = None
    first = api.unlock(wait=0)
    second = api.unlock(wait=0)
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    assert api.dispatch.notified == 1


def test_an_offline_gateway_is_refused_at_once_and_nothing_is_sent(api: Api) -> None:
    api.services.sites.record_status(SITE, {"online": False})
    answer = api.unlock()
    assert answer.status_code == 200
    assert (answer.json()["status"], answer.json()["reason"]) == ("rejected",
                                                                  "gateway_offline")
    assert api.dispatch.notified == 0
    with api.services.db.session() as s:
        row = s.get(Command, answer.json()["id"])
        assert row is not None
        assert row.token is None


@pytest.mark.parametrize(("case", "status", "code"), [
    ("no key", 401, "unauthorized"),
    ("bad key", 401, "unauthorized"),
    ("revoked key", 401, "unauthorized"),
    ("other operator's site", 403, "forbidden"),
    ("unknown site", 404, "not_found"),
    ("unknown unit", 404, "not_found"),
    ("unit of another site", 404, "not_found"),
    ("an id longer than any", 404, "not_found"),
    ("seconds 0", 422, "invalid_body"),
    ("unknown field", 422, "invalid_body"),
    ("override without reason", 422, "invalid_body"),
    ("wait over 25", 422, "invalid_body"),
])
def test_errors_are_json_with_their_status(api: Api, case: str, status: int,
                                           code: str) -> None:
    if case == "no key":
        answer = api.http.post(f"/v1/sites/{SITE}/units/unit_1/unlock")
    elif case == "bad key":
        answer = api.unlock(key="srk_aaaaaaaaaaaa.nope")
    elif case == "revoked key":
        key_id = api.services.api_keys.list()[0].id
        api.services.api_keys.revoke(key_id)
        answer = api.unlock()
    elif case == "other operator's site":
        answer = api.unlock("unit_x", OTHER)
    elif case == "unknown site":
        answer = api.unlock(site="site_nope")
    elif case == "unknown unit":
        answer = api.unlock("unit_nope")
    elif case == "unit of another site":
        answer = api.unlock("unit_x")
    elif case == "an id longer than any":
        # Never taken for its prefix: a unit whose id is those 64 characters exists.
        with api.services.db.session() as s:
            op = api.services.api_keys.list()[0].operator_id
            s.add(UnitState(operator_id=op, unit_id="u" * 64, site_id=SITE, status="occupied",
                            ver=1, lockout=False, confirmed_ver=None, updated_at=0))
        answer = api.unlock("u" * 65)
    elif case == "seconds 0":
        answer = api.unlock(body={"seconds": 0})
    elif case == "unknown field":
        answer = api.unlock(body={"secs": 5})
    elif case == "override without reason":
        answer = api.unlock(body={"override": True})
    else:
        answer = api.unlock(wait=26)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["code"] == code
    assert answer.json()["error"]["message"]
    with api.services.db.session() as s:
        assert s.scalars(select(Command)).all() == []


def test_a_command_of_another_operator_is_404(api: Api) -> None:
    record = api.unlock().json()
    answer = api.http.get(f"/v1/commands/{record['id']}",
                          headers={"Authorization": f"Bearer {api.other_key}"})
    assert answer.status_code == 404


def test_lock_and_the_openapi_document(api: Api) -> None:
    answer = api.http.post(f"/v1/sites/{SITE}/units/unit_2/lock", json={"actor": "desk"},
                           headers={"Authorization": f"Bearer {api.key}"})
    assert answer.status_code == 200
    assert answer.json()["cmd"] == "lock"
    doc = api.http.get("/openapi.json").json()
    assert "/v1/sites/{site}/units/{unit}/unlock" in doc["paths"]
    assert "/v1/commands/{command_id}" in doc["paths"]


def test_a_key_answered_by_a_double_tap_keeps_naming_that_command(api: Api) -> None:
    """Found in review: a request whose Idempotency-Key got the pending unlock of a
    double tap, retried after that unlock finished, made a second unlock."""
    api.gateway.delay = None
    first = api.unlock(wait=0).json()
    tap = api.unlock(wait=0, idem="tap-2").json()
    assert tap["id"] == first["id"]
    api.gateway.answer(first["id"], "done")
    retry = api.unlock(wait=0, idem="tap-2")
    assert retry.json()["id"] == first["id"]
    assert retry.json()["status"] == "done"
    with api.services.db.session() as s:
        assert len(s.scalars(select(Command)).all()) == 1
    assert api.unlock("unit_2", idem="tap-2").status_code == 422


def test_an_override_is_never_taken_for_a_double_tap(api: Api) -> None:
    api.gateway.delay = None
    first = api.unlock(wait=0).json()
    override = api.unlock(wait=0, body={"override": True, "reason": "fire drill"}).json()
    assert override["id"] != first["id"]


def test_no_body_over_the_cap_reaches_a_route(api: Api) -> None:
    """Found in review: the API's JSON bodies were read whole, whatever their size,
    before the key was checked."""
    big = b'{"actor": "' + b"x" * (400 * 1024) + b'"}'
    answer = api.http.post(f"/v1/sites/{SITE}/units/unit_1/unlock", content=big,
                           headers={"Authorization": f"Bearer {api.key}",
                                    "Content-Type": "application/json"})
    assert answer.status_code == 413
    assert answer.json()["error"]["code"] == "too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams
        yield b'{"actor": "'
        for _ in range(40):
            yield b"x" * 10_240
        yield b'"}'

    streamed = api.http.post(f"/v1/sites/{SITE}/units/unit_1/unlock", content=chunks(),
                             headers={"Authorization": f"Bearer {api.key}",
                                      "Content-Type": "application/json"})
    assert streamed.status_code == 413
    with api.services.db.session() as s:
        assert s.scalars(select(Command)).all() == []


def test_metrics_time_each_call_by_its_answer_and_count_the_commands(api: Api) -> None:
    def seen() -> tuple[float, ...]:
        return (metric(api.http, "stora_relay_unlock_seconds_count", status="done"),
                metric(api.http, "stora_relay_unlock_seconds_count", status="pending"),
                metric(api.http, "stora_relay_commands_created_total", cmd="unlock",
                       origin="api"),
                metric(api.http, "stora_relay_unlock_seconds_sum", status="pending"))

    before = seen()
    assert api.unlock().status_code == 200
    api.gateway.delay = None
    assert api.unlock("unit_2", wait=0.2).status_code == 202
    after = seen()
    assert [a - b for a, b in zip(after[:3], before[:3], strict=True)] == [1, 1, 2]
    assert after[3] - before[3] >= 0.2  # the 202 waited its 0.2 s


def test_an_admin_key_opens_no_door(api: Api) -> None:
    _, admin_key = api.services.api_keys.create(None, "support", "admin")
    answer = api.unlock(key=admin_key)
    assert answer.status_code == 403
    assert answer.json()["error"]["message"] == "an admin key opens the staff pages, not doors"
