"""Webhook endpoints (stora-api §4.1) and signatures (§4.3): validation, shapes, signing.

Pure; :mod:`devkit.sandbox.delivery` sends the deliveries.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

from devkit.sandbox.rules import API_VERSION, _rfc3339

WEBHOOK_READ_SCOPE: Final = "public.webhook_endpoint:read"
WEBHOOK_WRITE_SCOPE: Final = "public.webhook_endpoint:write"
#: The event names stora-api §4.5 saw; any other is refused (422).
EVENT_TYPES: Final = frozenset({
    "unit.updated", "contact.created", "contact.updated", "order.created",
    "invoice.created", "invoice.paid", "credit_note.created", "deal.updated",
    "unit_type.created", "unit_type.updated", "protection_level.created",
})
ENDPOINT_STATUSES: Final = frozenset({"enabled", "disabled"})
USER_AGENT: Final = "Stora-Webhooks/1.0"
#: A deviation from Stora, which takes https:// only: plain http to the local host, so a
#: test's receiver needs no certificate.
LOCAL_HOSTS: Final = frozenset({"127.0.0.1", "localhost", "::1"})
_ENDPOINT_KEYS: Final = frozenset({"name", "api_version", "url", "event_types", "description",
                                   "metadata"})
#: stora-api §7: at most 20 keys of ≤ 40 chars [a-z0-9._:-], string values ≤ 500 chars.
METADATA_MAX_KEYS: Final = 20
METADATA_VALUE_MAX: Final = 500
_METADATA_KEY_RE: Final = re.compile(r"[a-z0-9._:\-]{1,40}")
#: ``metadata[key]=value`` in a list's query string.
METADATA_PARAM_RE: Final = re.compile(r"metadata\[([^\]]*)\]")

Problems = list[tuple[str, str]]


@dataclass(slots=True)
class Endpoint:
    """A webhook endpoint of one operator."""

    id: str
    operator: str
    name: str
    description: str | None
    url: str
    event_types: list[str]
    metadata: dict[str, str]
    creator: str
    secret: str
    created_at: float
    updated_at: float
    status: str = "enabled"
    disabled_at: float | None = None

    def as_json(self, *, with_secret: bool = False) -> dict[str, Any]:
        """The endpoint as the API shows it: the ``secret`` only in the create answer."""
        return {
            "id": self.id,
            "api_version": API_VERSION,
            "name": self.name,
            "description": self.description,
            "url": self.url,
            "event_types": list(self.event_types),
            "metadata": dict(self.metadata),
            "status": self.status,
            "disabled_at": None if self.disabled_at is None else _rfc3339(self.disabled_at),
            "creator": {"id": self.creator},
            "secret": self.secret if with_secret else None,
            "created_at": _rfc3339(self.created_at),
            "updated_at": _rfc3339(self.updated_at),
        }


def allowed_url(url: str) -> bool:
    """``https://host…``, or ``http://`` to the local host (a documented deviation)."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # ValueError for a bad port
    except ValueError:
        return False
    if not parts.hostname or parts.username is not None or parts.password is not None:
        return False
    return parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in LOCAL_HOSTS)


def validate_metadata(value: object, pointer: str = "/metadata") -> Problems:
    """Problems with a ``metadata`` object (stora-api §7)."""
    if value is None:
        return []
    if not isinstance(value, dict):
        return [(pointer, "must be an object of string keys and string values")]
    problems: Problems = []
    if len(value) > METADATA_MAX_KEYS:
        problems.append((pointer, f"must have at most {METADATA_MAX_KEYS} keys"))
    for key, item in value.items():
        where = f"{pointer}/{key}"
        if not _METADATA_KEY_RE.fullmatch(key):
            problems.append((where, "keys are 1–40 of a-z 0-9 . _ : -"))
        if not isinstance(item, str):
            problems.append((where, "must be a string"))
        elif len(item) > METADATA_VALUE_MAX:
            problems.append((where, f"must be at most {METADATA_VALUE_MAX} characters"))
    return problems


def validate_endpoint(doc: object) -> Problems:
    """``(pointer, message)`` for each problem of a ``POST /webhook_endpoints`` body."""
    if not isinstance(doc, dict):
        return [("", "must be a JSON object")]
    problems: Problems = [(f"/{k}", "is not a permitted field") for k in doc
                          if k not in _ENDPOINT_KEYS]
    name = doc.get("name")
    if not isinstance(name, str) or not name.strip():
        problems.append(("/name", "is required" if name is None else "must be a non-empty string"))
    version = doc.get("api_version")
    if version != API_VERSION:
        problems.append(("/api_version", "is required" if version is None
                         else f"must be {API_VERSION!r}"))
    url = doc.get("url")
    if not isinstance(url, str) or not allowed_url(url):
        problems.append(("/url", "is required" if url is None else
                         "must be an https:// URL (http:// only to 127.0.0.1 or localhost)"))
    types = doc.get("event_types")
    if not isinstance(types, list) or not types:
        problems.append(("/event_types", "is required" if types is None
                         else "must be a non-empty array of event names"))
    else:
        problems += [(f"/event_types/{i}", "is not a known event type")
                     for i, t in enumerate(types) if t not in EVENT_TYPES]
    if doc.get("description") is not None and not isinstance(doc["description"], str):
        problems.append(("/description", "must be a string"))
    problems += validate_metadata(doc.get("metadata"))
    return problems


def metadata_filter(params: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The ``metadata[key]=value`` pairs of a query; every one must match."""
    wanted = {}
    for name, value in params:
        match = METADATA_PARAM_RE.fullmatch(name)
        if match:
            wanted[match.group(1)] = value
    return wanted


def matches_metadata(endpoint: Endpoint, wanted: Mapping[str, str]) -> bool:
    """Whether every wanted key has exactly the wanted value."""
    return all(endpoint.metadata.get(k) == v for k, v in wanted.items())


def signature(secret: str, t: int, body: bytes) -> str:
    """The ``X-Stora-Signature`` value: ``t=<t>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>``.

    The key is the secret's UTF-8 bytes (the hex string itself, not the bytes it spells),
    the reading of stora-api §4.3 that docs/design/sandbox.md takes.
    """
    digest = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={digest}"
