"""Operators, their sites and units: the data of "Stora for partners" (pure).

An operator is internal to the sandbox (an id such as ``"acme"``); Stora's resources
carry prefixed ids (``site_…``, ``unit_…``).  Each operator has its own rate-limit
budget, sites, units, webhook endpoints, and ``unit.updated`` events.  The JSON shapes
follow stora-api §8.2 (units) and §8.6 (sites); where Stora shows no shape (the
``access_hours`` layout) the choice is in docs/design/sandbox.md.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from devkit.sandbox.rules import _RateLimiter, _rfc3339
from devkit.sandbox.webhooks import Endpoint

#: The operator of static tokens and client-credentials tokens: the sandbox of before
#: issue 14, with the sandbox's own rate limiter as its budget.
DEFAULT_OPERATOR: Final = "default"
WEEKDAYS: Final = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday",
                   "sunday")
#: stora-api §8.1; ``overlock`` is the spelling of the list filter's docs, accepted too.
UNIT_STATUSES: Final = frozenset({"available", "reserved", "occupied", "overlocked",
                                  "overlock", "repossessed", "unavailable"})
#: Statuses in which a unit holds an allocation (a tenancy has or awaits access).
ALLOCATED: Final = frozenset({"reserved", "occupied", "overlocked", "overlock"})
#: ``updated_at`` moves at least this much per change, so it strictly increases even
#: on a frozen clock (it is rendered with milliseconds).
TICK_S: Final = 0.001
_OPERATOR_RE: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}")
_ID_RE: Final = re.compile(r"[a-z]+_[A-Za-z0-9_]{1,60}")
_HHMM_RE: Final = re.compile(r"([01]\d|2[0-3]):[0-5]\d")
_SITE_KEYS: Final = frozenset({"id", "name", "description", "phone", "address",
                               "access_hours", "units"})
_UNIT_KEYS: Final = frozenset({"id", "reference_id", "status", "unit_type_id", "site_id"})

Hours = dict[str, dict[str, str | None]]


def new_id(prefix: str) -> str:
    """A fresh opaque id such as ``unit_3f…``."""
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def check_id(value: object, prefix: str) -> str:
    """``value`` if it is an id with ``prefix``; ``ValueError`` otherwise."""
    if not isinstance(value, str) or not value.startswith(prefix) or not _ID_RE.fullmatch(value):
        raise ValueError(f"{value!r} is not an id like {prefix}…")
    return value


def check_operator_id(value: object) -> str:
    """``value`` if it is a usable operator id (lowercase, ``acme``); ``ValueError``."""
    if not isinstance(value, str) or not _OPERATOR_RE.fullmatch(value):
        raise ValueError(f"operator id {value!r} must be 1–40 of a-z 0-9 _ - (e.g. 'acme')")
    return value


@dataclass(slots=True)
class Site:
    """A site (stora-api §8.6)."""

    id: str
    name: str
    access_hours: Hours
    created_at: float
    description: str | None = None
    phone: str | None = None
    address: dict[str, Any] | None = None

    def as_json(self) -> dict[str, Any]:
        """The site as ``GET /sites/{id}`` shows it."""
        stamp = _rfc3339(self.created_at)
        return {
            "id": self.id,
            "name": self.name,
            "description": self.description,
            "phone": self.phone,
            "address": self.address,
            "directions": {"google_maps_url": None},
            "images": [],
            "opened_at": stamp,
            "access_hours": {day: dict(hours) for day, hours in self.access_hours.items()},
            "created_at": stamp,
            "updated_at": stamp,
        }


@dataclass(slots=True)
class Unit:
    """A unit (stora-api §8.2)."""

    id: str
    reference_id: str
    site_id: str
    unit_type_id: str
    status: str
    allocation_id: str | None
    created_at: float
    updated_at: float

    def as_json(self) -> dict[str, Any]:
        """The unit as ``GET /units/{id}`` and ``unit.updated`` show it."""
        return {
            "id": self.id,
            "reference_id": self.reference_id,
            "status": self.status,
            "site": {"id": self.site_id},
            "unit_type": {"id": self.unit_type_id},
            "unit_allocation": {"id": self.allocation_id} if self.allocation_id else None,
            "created_at": _rfc3339(self.created_at),
            "updated_at": _rfc3339(self.updated_at),
        }

    def change(self, status: str, allocation_id: str | None, now: float) -> None:
        """A new status (and allocation); ``updated_at`` strictly increases."""
        self.status = status
        self.allocation_id = allocation_id
        self.updated_at = max(now, self.updated_at + TICK_S)


@dataclass(slots=True)
class Operator:
    """One operator: its resources, webhook endpoints, events and rate-limit budget."""

    id: str
    name: str
    limiter: _RateLimiter
    sites: dict[str, Site] = field(default_factory=dict)
    units: dict[str, Unit] = field(default_factory=dict)
    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    #: The ``unit.updated`` (etc.) events, as delivered, oldest first.
    webhook_events: list[dict[str, Any]] = field(default_factory=list)
    tokens_issued: int = 0
    refreshes: int = 0


def parse_hours(spec: object) -> Hours:
    """``access_hours`` from an admin spec: per weekday ``"24h"``, ``"closed"``,
    ``"HH:MM-HH:MM"`` or ``{"status", "open", "close"}``; days left out are open 24 hours.
    ``ValueError`` names the bad day.
    """
    if spec is None:
        spec = {}
    if not isinstance(spec, Mapping):
        raise TypeError("access_hours must be an object keyed by weekday")
    unknown = sorted(set(spec) - set(WEEKDAYS))
    if unknown:
        raise ValueError(f"access_hours: {unknown[0]!r} is not a weekday ({', '.join(WEEKDAYS)})")
    return {day: _day_hours(day, spec.get(day, "24h")) for day in WEEKDAYS}


def _day_hours(day: str, value: object) -> dict[str, str | None]:
    if isinstance(value, Mapping):
        status, opens, closes = value.get("status"), value.get("open"), value.get("close")
    elif value in ("24h", "twenty_four_hours"):
        status, opens, closes = "twenty_four_hours", None, None
    elif value == "closed":
        status, opens, closes = "closed", None, None
    elif isinstance(value, str) and "-" in value:
        status, (opens, closes) = "set_hours", value.split("-", 1)
    else:
        raise ValueError(f"access_hours.{day}: {value!r} is not '24h', 'closed' or 'HH:MM-HH:MM'")
    if status == "set_hours":
        if not all(isinstance(v, str) and _HHMM_RE.fullmatch(v) for v in (opens, closes)):
            raise ValueError(f"access_hours.{day}: open and close must be HH:MM")
        return {"status": "set_hours", "open": str(opens), "close": str(closes)}
    if status in ("twenty_four_hours", "closed") and opens is None and closes is None:
        return {"status": str(status), "open": None, "close": None}
    raise ValueError(f"access_hours.{day}: bad status {status!r}")


def build_site(spec: Mapping[str, Any], now: float, taken: Iterable[str]) -> Site:
    """A :class:`Site` from an admin spec (its ``units`` are built by the caller)."""
    _no_unknown(spec, _SITE_KEYS, "site")
    site_id = check_id(spec["id"], "site_") if spec.get("id") is not None else new_id("site_")
    if site_id in set(taken):
        raise ValueError(f"site {site_id} already exists")
    name = spec.get("name", f"Sandbox site {site_id}")
    for key in ("description", "phone"):
        if spec.get(key) is not None and not isinstance(spec[key], str):
            raise ValueError(f"site {key} must be a string")
    if not isinstance(name, str) or not name:
        raise ValueError("site name must be a non-empty string")
    address = spec.get("address")
    if address is not None and not isinstance(address, dict):
        raise ValueError("site address must be an object")
    return Site(site_id, name, parse_hours(spec.get("access_hours")), now,
                spec.get("description"), spec.get("phone"), address)


def build_unit(spec: Mapping[str, Any], site_id: str, now: float, taken: Iterable[str]) -> Unit:
    """A :class:`Unit` of ``site_id`` from an admin spec."""
    _no_unknown(spec, _UNIT_KEYS, "unit")
    unit_id = check_id(spec["id"], "unit_") if spec.get("id") is not None else new_id("unit_")
    if unit_id in set(taken):
        raise ValueError(f"unit {unit_id} already exists")
    reference = spec.get("reference_id", unit_id)
    if not isinstance(reference, str) or not reference:
        raise ValueError("unit reference_id must be a non-empty string")
    status = check_status(spec.get("status", "available"))
    unit_type = spec.get("unit_type_id")
    unit_type = check_id(unit_type, "utype_") if unit_type is not None else "utype_standard"
    allocation = new_id("alloc_") if status in ALLOCATED else None
    return Unit(unit_id, reference, site_id, unit_type, status, allocation, now, now)


def check_status(value: object) -> str:
    """``value`` if it is a unit status; ``ValueError`` otherwise."""
    if value not in UNIT_STATUSES:
        raise ValueError(f"unit status {value!r} is not one of {', '.join(sorted(UNIT_STATUSES))}")
    return str(value)


def _no_unknown(spec: Mapping[str, Any], known: frozenset[str], what: str) -> None:
    if not isinstance(spec, Mapping):
        raise TypeError(f"a {what} spec must be an object")
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ValueError(f"unknown {what} key {unknown[0]!r}; known: {', '.join(sorted(known))}")
