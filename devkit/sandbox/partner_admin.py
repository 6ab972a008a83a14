"""The admin API of "Stora for partners" (``/_sandbox/…``), over :class:`PartnerApi`'s
Python methods; never rate limited, authenticated or recorded.  The routes are listed
in docs/design/sandbox.md.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any, Final
from urllib.parse import parse_qsl

from devkit.sandbox.partner_api import PartnerApi
from devkit.sandbox.rules import (
    ADMIN_PREFIX,
    _is_bool,
    _is_count,
    _is_seconds,
    _json_object,
    _json_reply,
    _Reply,
)

_OPERATOR: Final = re.compile(
    rf"{ADMIN_PREFIX}/operators/(?P<op>[^/]+)(?P<action>/sites|/units|/revoke|/webhook_events)?")
_UNIT: Final = re.compile(rf"{ADMIN_PREFIX}/units/(?P<unit>[^/]+)")
_ENDPOINT: Final = re.compile(
    rf"{ADMIN_PREFIX}/webhook_endpoints/(?P<we>[^/]+)/(?P<action>disable|deliver)")
#: ``POST /_sandbox/webhooks`` keys and their validators.
_WEBHOOK_SETTINGS: Final[Mapping[str, Callable[[object], bool]]] = {
    "reset": _is_bool, "pause": _is_bool, "resume": _is_bool, "flush": _is_bool,
    "duplicate": _is_count, "reorder": _is_count, "stale_t": _is_count,
    "stale_by_s": _is_count, "keep_t_on_retry": _is_bool, "bad_signature": _is_count,
    "retry_s": lambda v: isinstance(v, list) and all(_is_seconds(s) for s in v),
    "timeout_s": _is_seconds,
}
_OAUTH_SETTINGS: Final = frozenset({"access_token_ttl_s", "refresh_token_ttl_s", "code_ttl_s",
                                    "consent"})


class PartnerAdmin(PartnerApi):
    """Admin routes for operators, the partner app, OAuth settings and webhooks."""

    def _partner_admin(self, method: str, path: str, body: bytes, query: str) -> _Reply | None:
        """The answer to an admin request of this part, or ``None`` if none matches."""
        try:
            return self._admin_route(method, path.rstrip("/"), body,
                                     dict(parse_qsl(query, keep_blank_values=True)))
        except (TypeError, ValueError, KeyError) as exc:
            return _json_reply(400, {"error": str(exc)})

    def _admin_route(self, method: str, path: str, body: bytes,
                     params: Mapping[str, str]) -> _Reply | None:
        route = (method, path)
        if route == ("GET", f"{ADMIN_PREFIX}/operators"):
            return _json_reply(200, {"operators": [self.operator_state(op)
                                                   for op in self.operators()]})
        if route == ("POST", f"{ADMIN_PREFIX}/operators"):
            doc = _json_object(body)
            _only(doc, {"id", "name", "sites"})
            state = self.create_operator(doc["id"], name=doc.get("name"),
                                         sites=_list(doc.get("sites", [])))
            return _json_reply(201, {"operator": state})
        if route == ("POST", f"{ADMIN_PREFIX}/partner_app"):
            doc = _json_object(body)
            _only(doc, {"client_id", "client_secret", "redirect_uris", "name", "scopes"})
            app = self.register_partner_app(
                _text(doc, "client_id"), _text(doc, "client_secret"),
                [str(u) for u in _list(doc["redirect_uris"])],
                name=doc.get("name", "Sandbox partner app"),
                scopes=None if doc.get("scopes") is None else _list(doc["scopes"]))
            return _json_reply(200, {"partner_app": {"client_id": app.client_id,
                                                     "redirect_uris": list(app.redirect_uris)}})
        if route == ("POST", f"{ADMIN_PREFIX}/oauth"):
            self._configure_oauth(_json_object(body))
            return _json_reply(200, {"oauth": self.state()["oauth"]})
        if route == ("POST", f"{ADMIN_PREFIX}/webhooks"):
            self._configure_webhooks(_json_object(body))
            return _json_reply(200, {"webhooks": self._deliverer.state()})
        if route == ("GET", f"{ADMIN_PREFIX}/deliveries"):
            return _json_reply(200, {"deliveries": self.deliveries(params.get("operator"),
                                                                   params.get("endpoint"))})
        return self._admin_item(method, path, body)

    def _admin_item(self, method: str, path: str, body: bytes) -> _Reply | None:
        """Routes that name an operator, a unit or a webhook endpoint."""
        if match := _OPERATOR.fullmatch(path):
            op, action = match.group("op", "action")
            if method == "GET" and action is None:
                return _json_reply(200, {"operator": self.operator_state(op)})
            if method == "GET" and action == "/webhook_events":
                return _json_reply(200, {"webhook_events": self.webhook_events(op)})
            if method == "POST" and action == "/sites":
                return _json_reply(201, {"site": self.add_site(op, _json_object(body))})
            if method == "POST" and action == "/units":
                doc = _json_object(body)
                unit = self.add_unit(op, _text(doc, "site_id"),
                                     {k: v for k, v in doc.items() if k != "site_id"})
                return _json_reply(201, {"unit": unit})
            if method == "POST" and action == "/revoke":
                return _json_reply(200, {"revoked": self.revoke_grant(op)})
        if match := _UNIT.fullmatch(path):
            unit_id = match.group("unit")
            if method == "GET":
                return _json_reply(200, {"unit": self.unit(unit_id)})
            if method == "POST":
                doc = _json_object(body)
                _only(doc, {"status", "allocation_id"})
                args = {"allocation_id": doc["allocation_id"]} if "allocation_id" in doc else {}
                event = self.set_unit_status(unit_id, _text(doc, "status"), **args)
                return _json_reply(200, {"unit": event["data"]["unit"], "event": event})
        if (match := _ENDPOINT.fullmatch(path)) and method == "POST":
            endpoint, action = match.group("we", "action")
            if action == "disable":
                return _json_reply(200, {"webhook_endpoint": self.disable_endpoint(endpoint)})
            return _json_reply(200, {"attempt": self._admin_deliver(endpoint, body)})
        return None

    def _admin_deliver(self, endpoint: str, body: bytes) -> dict[str, Any]:
        doc = _json_object(body)
        _only(doc, {"body", "headers", "secret", "t", "sign"})
        headers = doc.get("headers") or {}
        if not isinstance(headers, dict) or not all(isinstance(v, str)
                                                    for v in headers.values()):
            raise TypeError("headers must be an object of strings")
        t = doc.get("t")
        if t is not None and not _is_count(t):
            raise ValueError("t must be a non-negative integer")
        return self.deliver_raw(endpoint, _text(doc, "body").encode(), secret=doc.get("secret"),
                                t=t, sign=bool(doc.get("sign", True)), headers=headers)

    def _configure_oauth(self, doc: Mapping[str, Any]) -> None:
        _only(doc, _OAUTH_SETTINGS)
        lifetimes: dict[str, float | None] = {}
        for key, arg in (("access_token_ttl_s", "access_s"), ("refresh_token_ttl_s", "refresh_s"),
                         ("code_ttl_s", "code_s")):
            if key in doc:
                value = doc[key]
                if value is None and key == "refresh_token_ttl_s":
                    value = math.inf  # null: refresh tokens never expire
                if not _is_seconds(value) and value != math.inf:
                    raise ValueError(f"bad value for {key!r}: {value!r}")
                lifetimes[arg] = value
        consent = doc.get("consent")
        if consent is not None and not isinstance(consent, dict):
            raise TypeError("consent is an object {operator, auto}")
        self.set_token_lifetimes(**lifetimes)
        if consent is not None:
            self.set_consent(consent.get("operator"), consent.get("auto"))

    def _configure_webhooks(self, doc: Mapping[str, Any]) -> None:
        _only(doc, set(_WEBHOOK_SETTINGS))
        for key, value in doc.items():
            if not _WEBHOOK_SETTINGS[key](value):
                raise ValueError(f"bad value for {key!r}: {value!r}")
        switches = {k: v for k, v in doc.items() if k not in ("pause", "resume", "flush")}
        self.webhook_faults(**switches)
        if doc.get("pause"):
            self.pause_deliveries()
        if doc.get("resume"):
            self.resume_deliveries()
        if doc.get("flush") and not self.flush_deliveries():
            raise ValueError("the flush did not finish within 10 s")


def _only(doc: Mapping[str, Any], known: set[str] | frozenset[str]) -> None:
    unknown = sorted(set(doc) - set(known))
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r}; known: {', '.join(sorted(known))}")


def _text(doc: Mapping[str, Any], key: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key} must be a non-empty string")
    return value


def _list(value: object) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError("expected a JSON array")
    return value
