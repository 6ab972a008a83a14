"""Timeline Event records and bodies (contract §6, stora-api §3.2)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.outbox.timeline import (
    DETAIL_SEPARATOR,
    KINDS,
    LATE_AFTER_S,
    MAX_DESCRIPTION,
    EventRecord,
    event_body,
    external_id_for,
    make_event,
)

T0 = 1_796_000_000.0  # 2026-11-30T00:53:20Z

#: Contract §6, copied by hand so a change to KINDS has to change this test too.
CONTRACT_WORDING = {
    "unlocked": "Unit unlocked via YourApp",
    "locked": "Unit locked via YourApp",
    "overlocked": "Unit overlocked via YourApp",
    "overlock_removed": "Overlock removed via YourApp",
    "unlock_refused": "Unlock refused via YourApp",
    # Added by issue 11 (CHANGELOG): an accepted signed config.set is audited in Stora.
    "config_changed": "Gateway configuration changed via YourApp",
}


def one_line(text: str) -> bool:
    """No line break of any kind and no control character (unassigned code points pass)."""
    return text.splitlines() == [text] and not re.search(r"[\x00-\x1f\x7f-\x9f]", text)


def event(kind: str = "unlocked", **kwargs: Any) -> EventRecord:
    args: dict[str, Any] = {
        "app_name": "YourApp",
        "site_id": "site_123",
        "unit": "unit_abc",
        "reference": "A-101",
        "external_id": external_id_for("site_123", "jti-1", kind),
        "occurred_at": T0,
    }
    args.update(kwargs)
    return make_event(kind, **args)


# -- wording ---------------------------------------------------------------------------------


def test_kinds_are_exactly_the_contract_kinds() -> None:
    assert set(KINDS) == set(CONTRACT_WORDING)


@pytest.mark.parametrize("kind", sorted(CONTRACT_WORDING))
def test_each_kind_is_worded_as_the_contract_says(kind: str) -> None:
    assert event(kind).description == CONTRACT_WORDING[kind]
    detailed = event(kind, detail="unit A-101; by tenant app").description
    assert detailed == CONTRACT_WORDING[kind] + " — unit A-101; by tenant app"


def test_the_record_keeps_its_fields() -> None:
    record = event("locked", contact="con_1", actor="operator dashboard")
    assert record == EventRecord(
        external_id=external_id_for("site_123", "jti-1", "locked"),
        kind="locked",
        unit="unit_abc",
        reference="A-101",
        site_id="site_123",
        description="Unit locked via YourApp",
        contact="con_1",
        actor="operator dashboard",
        occurred_at=T0,
    )


def test_empty_contact_actor_and_detail_mean_none() -> None:
    record = event(contact="", actor="", detail="")
    assert record.contact is None
    assert record.actor is None
    assert record.description == "Unit unlocked via YourApp"


def test_detail_is_made_single_line() -> None:
    record = event(detail="by tenant\napp\r\n\tInjected: line\u2028x\x00y")
    assert record.description == "Unit unlocked via YourApp — by tenant app Injected: line x y"


def test_actor_is_single_line_and_short() -> None:
    record = event(actor="tenant\napp " + "x" * 500)
    assert record.actor is not None
    assert "\n" not in record.actor
    assert len(record.actor) <= 100


def test_a_long_detail_is_cut_with_an_ellipsis() -> None:
    record = event(detail="x" * 2_000)
    assert len(record.description) == MAX_DESCRIPTION
    assert record.description.startswith("Unit unlocked via YourApp — xxx")
    assert record.description.endswith("…")


def test_an_absurd_app_name_still_keeps_the_bound() -> None:
    record = event(app_name="A" * 1_000, detail="d")
    assert len(record.description) <= MAX_DESCRIPTION
    assert record.description.startswith("Unit unlocked via AAA")


@given(detail=st.text(max_size=1_500), app=st.text(min_size=1, max_size=40))
def test_description_is_always_one_bounded_line(detail: str, app: str) -> None:
    record = event(detail=detail, app_name=app.strip() or "App")
    assert len(record.description) <= MAX_DESCRIPTION
    assert one_line(record.description)
    assert record.description.startswith(CONTRACT_WORDING["unlocked"].split(" via ")[0])
    body = event_body(record, source_id="tsrc_1", template_id=None, delivered_at=T0 + 3_600)
    assert len(body["description"]) <= MAX_DESCRIPTION
    assert one_line(body["description"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"external_id": ""}, "external id"),
        ({"external_id": "has space"}, "external id"),
        ({"external_id": "x" * 65}, "external id"),
        ({"external_id": "caf\u00e9"}, "external id"),
        ({"occurred_at": float("nan")}, "finite"),
    ],
)
def test_bad_arguments_are_programming_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        event(**kwargs)


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown Timeline Event kind"):
        event("opened")


# -- the POST body ---------------------------------------------------------------------------


def test_body_shape_per_stora_api() -> None:
    record = event(contact="con_9", actor="tenant app", detail="unit A-101")
    body = event_body(record, source_id="tsrc_1", template_id="aetpl_2", delivered_at=T0 + 1)
    assert body == {
        "source": {"id": "tsrc_1"},
        "template": {"id": "aetpl_2"},
        "site": {"id": "site_123"},
        "contact": {"id": "con_9"},
        "external": {"id": record.external_id},
        "description": "Unit unlocked via YourApp — unit A-101",
        "variables": {
            "unit": "unit_abc",
            "reference": "A-101",
            "action": "unlocked",
            "actor": "tenant app",
            "occurred_at": "2026-11-30T00:53:20Z",
        },
    }


def test_body_leaves_out_what_is_not_known() -> None:
    body = event_body(event(), source_id="tsrc_1", template_id="")
    assert "template" not in body
    assert "contact" not in body
    assert "actor" not in body["variables"]
    assert "delivered_late" not in body["variables"]


def test_late_delivery_says_when_it_happened() -> None:
    record = event(detail="unit A-101")
    on_time = event_body(record, source_id="s", template_id=None, delivered_at=T0 + LATE_AFTER_S)
    assert on_time["description"] == "Unit unlocked via YourApp — unit A-101"
    late = event_body(record, source_id="s", template_id=None, delivered_at=T0 + LATE_AFTER_S + 1)
    assert late["description"] == (
        "Unit unlocked via YourApp — unit A-101; happened at 2026-11-30T00:53:20Z"
    )
    assert late["variables"]["delivered_late"] is True
    assert late["variables"]["occurred_at"] == "2026-11-30T00:53:20Z"


def test_late_delivery_without_detail_uses_the_separator() -> None:
    late = event_body(event(), source_id="s", template_id=None, delivered_at=T0 + 86_400)
    assert late["description"] == "Unit unlocked via YourApp — happened at 2026-11-30T00:53:20Z"


def test_late_note_survives_a_long_detail() -> None:
    record = event(detail="y" * 2_000)
    late = event_body(record, source_id="s", template_id=None, delivered_at=T0 + 600)
    assert len(late["description"]) <= MAX_DESCRIPTION
    assert late["description"].endswith("…; happened at 2026-11-30T00:53:20Z")
    assert late["description"].count(DETAIL_SEPARATOR) == 1


# -- external ids ----------------------------------------------------------------------------


def test_external_id_is_stable_and_bounded() -> None:
    a = external_id_for("site_123", "jti-1", "unlocked")
    assert a == external_id_for("site_123", "jti-1", "unlocked")
    assert re.fullmatch(r"sgw-[0-9a-f]{60}", a)
    assert len(a) == 64
    # A known value pins the encoding: changing it would re-send every queued event.
    pinned = "sgw-cd65ea2c2ad99e94a85b1b6df72efef9cb2ed0ae933a60c32ce16317f7d7"
    assert external_id_for("x") == pinned


def test_external_id_separates_its_parts() -> None:
    assert external_id_for("a", "bc") != external_id_for("ab", "c")
    assert external_id_for("a,b") != external_id_for("a", "b")
    assert external_id_for("site", "jti", "unlocked") != external_id_for("site", "jti", "locked")


def test_external_id_needs_a_part() -> None:
    with pytest.raises(ValueError, match="at least one part"):
        external_id_for()


@given(st.lists(st.text(), min_size=1, max_size=5))
def test_every_external_id_is_a_valid_idempotency_key(parts: list[str]) -> None:
    ext = external_id_for(*parts)
    assert len(ext) <= 64
    assert event(external_id=ext).external_id == ext
