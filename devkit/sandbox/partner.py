"""The sandbox as "Stora for partners": operators, the partner app, grants, webhooks.

:class:`PartnerState` adds to :class:`~devkit.sandbox.app.SandboxState` the state of
several operators (sites, units, webhook endpoints, budgets), the registered partner app
and its grants, and the Python side of the admin API that tests in-process use.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from devkit.sandbox.app import SandboxState
from devkit.sandbox.delivery import RETRY_S, TIMEOUT_S, Deliverer
from devkit.sandbox.oauth import ACCESS_TTL_S, CODE_TTL_S, AuthCode, Grant, PartnerApp
from devkit.sandbox.operators import (
    ALLOCATED,
    DEFAULT_OPERATOR,
    Operator,
    Site,
    Unit,
    build_site,
    build_unit,
    check_id,
    check_operator_id,
    check_status,
    new_id,
)
from devkit.sandbox.rules import (
    API_VERSION,
    EVENT_SCOPE,
    _error,
    _RateLimiter,
    _Reply,
    _rfc3339,
    _Token,
    max_in_window,
)
from devkit.sandbox.webhooks import Endpoint

#: ``allocation_id`` left out of :meth:`PartnerState.set_unit_status`.
_KEEP: Final = object()
CONSENT_AUTO: Final = frozenset({"approve", "deny"})


class PartnerState(SandboxState):
    """The sandbox's state with operators, a partner app and webhooks.

    ``partner_app`` is the app that may run the Authorization Code flow;
    ``access_token_ttl_s`` / ``refresh_token_ttl_s`` (``inf``: never) / ``code_ttl_s`` are
    that flow's lifetimes on the sandbox's clock; ``webhook_retry_s`` (the delays before
    each retry, real seconds) and ``webhook_timeout_s`` drive deliveries.  The other
    options are :class:`SandboxState`'s.
    """

    def __init__(
        self,
        *,
        partner_app: PartnerApp | None = None,
        access_token_ttl_s: float = ACCESS_TTL_S,
        refresh_token_ttl_s: float = math.inf,
        code_ttl_s: float = CODE_TTL_S,
        webhook_retry_s: Sequence[float] = RETRY_S,
        webhook_timeout_s: float = TIMEOUT_S,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.access_token_ttl_s = access_token_ttl_s
        self.refresh_token_ttl_s = refresh_token_ttl_s
        self.code_ttl_s = code_ttl_s
        self.set_token_lifetimes(access_s=access_token_ttl_s, refresh_s=refresh_token_ttl_s,
                                 code_s=code_ttl_s)
        self._partner = partner_app
        self._operators = {DEFAULT_OPERATOR: Operator(DEFAULT_OPERATOR, "Sandbox operator",
                                                      self._limiter)}
        self._owner: dict[str, str] = {}  # site, unit and endpoint ids -> operator
        self._codes: dict[str, AuthCode] = {}
        self._grants: dict[str, Grant] = {}
        self._refresh: dict[str, Grant] = {}
        self._consent: tuple[str | None, str | None] = (None, None)  # operator, auto
        self._event_operator: dict[str, str] = {}
        self._deliverer = Deliverer(self.now, webhook_retry_s, webhook_timeout_s)

    # -- the partner app ----------------------------------------------------------------
    @property
    def partner_app(self) -> PartnerApp | None:
        """The registered partner app, if any."""
        return self._partner

    def register_partner_app(self, client_id: str, client_secret: str,
                             redirect_uris: Iterable[str], *, name: str = "Sandbox partner app",
                             scopes: Iterable[str] | None = None) -> PartnerApp:
        """Register (or replace) the partner app; grants of an earlier one stay valid."""
        app = PartnerApp(client_id, client_secret, tuple(redirect_uris), name,
                         None if scopes is None else frozenset(scopes))
        with self._lock:
            self._partner = app
        return app

    def set_token_lifetimes(self, *, access_s: float | None = None,
                            refresh_s: float | None = None, code_s: float | None = None) -> None:
        """Lifetimes of what the Authorization Code flow issues, from now on (``None``:
        unchanged; ``refresh_s=math.inf``: refresh tokens never expire)."""
        for value in (access_s, refresh_s, code_s):
            if value is not None and not value > 0:
                raise ValueError("lifetimes must be positive seconds")
        with self._lock:
            self.access_token_ttl_s = access_s or self.access_token_ttl_s
            self.refresh_token_ttl_s = refresh_s or self.refresh_token_ttl_s
            self.code_ttl_s = code_s or self.code_ttl_s

    def set_consent(self, operator: str | None = None, auto: str | None = None) -> None:
        """The consent page's default operator; with ``auto`` ("approve" or "deny") the
        authorization request is answered at once for it, with no page (for scripts)."""
        if auto is not None and auto not in CONSENT_AUTO:
            raise ValueError("auto must be 'approve', 'deny' or None")
        with self._lock:
            if operator is not None and operator not in self._operators:
                raise ValueError(f"no operator {operator!r}")
            if auto is not None and operator is None:
                raise ValueError("auto consent needs an operator")
            self._consent = (operator, auto)

    def revoke_grant(self, operator_id: str) -> int:
        """The operator disconnects the app: every grant's tokens stop working at once
        (API calls 401, refreshes ``invalid_grant``).  How many grants were revoked."""
        with self._lock:
            self._get(operator_id)
            grants = [g for g in self._grants.values()
                      if g.operator == operator_id and not g.revoked]
            for grant in grants:
                self._revoke(grant)
        return len(grants)

    def _revoke(self, grant: Grant) -> None:
        """Caller holds the lock."""
        grant.revoked = True
        for token in grant.access:
            self._tokens.pop(token, None)
        grant.access.clear()
        if grant.refresh is not None:
            self._refresh.pop(grant.refresh, None)
            grant.refresh = None

    # -- operators, sites, units --------------------------------------------------------
    def create_operator(self, operator_id: str, *, name: str | None = None,
                        sites: Iterable[Mapping[str, Any]] = ()) -> dict[str, Any]:
        """A new operator with its sites (each spec: ``id``?, ``name``, ``access_hours``?,
        ``units``: [{``id``?, ``reference_id``, ``status``?, ``unit_type_id``?}]);
        :meth:`operator_state` of it.  All or nothing: ``ValueError`` on a bad spec."""
        check_operator_id(operator_id)
        if name is not None and not isinstance(name, str):
            raise ValueError("an operator's name is a string")
        with self._lock:
            if operator_id in self._operators:
                raise ValueError(f"operator {operator_id!r} already exists")
            op = Operator(operator_id, name or operator_id.title(),
                          _RateLimiter(self.max_per_second, self.max_per_minute))
            try:
                for spec in sites:
                    self._store_site(op, *self._build_site(op, spec))
            except (TypeError, ValueError, KeyError):
                for ident in [*op.sites, *op.units]:
                    self._owner.pop(ident, None)
                raise
            self._operators[operator_id] = op
        return self.operator_state(operator_id)

    def add_site(self, operator_id: str, spec: Mapping[str, Any]) -> dict[str, Any]:
        """Add a site (and its ``units``) to an operator; the site as the API shows it."""
        with self._lock:
            op = self._get(operator_id)
            site, units = self._build_site(op, spec)
            self._store_site(op, site, units)
            return site.as_json()

    def add_unit(self, operator_id: str, site_id: str,
                 spec: Mapping[str, Any]) -> dict[str, Any]:
        """Add a unit to a site of the operator; the unit as the API shows it."""
        with self._lock:
            op = self._get(operator_id)
            if site_id not in op.sites:
                raise ValueError(f"operator {operator_id!r} has no site {site_id!r}")
            unit = build_unit(spec, site_id, self.now(), self._owner)
            self._store_site(op, None, [unit])
            return unit.as_json()

    def _build_site(self, op: Operator, spec: Mapping[str, Any]) -> tuple[Site, list[Unit]]:
        """Caller holds the lock; nothing is stored yet."""
        now = self.now()
        site = build_site({k: v for k, v in spec.items() if k != "units"}, now, self._owner)
        units: list[Unit] = []
        for unit_spec in spec.get("units", ()):
            taken = [*self._owner, *(u.id for u in units)]
            units.append(build_unit(unit_spec, site.id, now, taken))
        return site, units

    def _store_site(self, op: Operator, site: Site | None, units: Iterable[Unit]) -> None:
        if site is not None:
            op.sites[site.id] = site
            self._owner[site.id] = op.id
        for unit in units:
            op.units[unit.id] = unit
            self._owner[unit.id] = op.id

    def set_unit_status(self, unit_id: str, status: str,
                        allocation_id: object = _KEEP) -> dict[str, Any]:
        """Change a unit as Stora's staff would; send ``unit.updated`` to every enabled
        endpoint of its operator that subscribed to it.  The event.

        ``allocation_id`` (``alloc_…`` or ``None``) defaults to: kept (or a new one) in
        an allocated status (reserved, occupied, overlocked), ``None`` otherwise.
        """
        check_status(status)
        if allocation_id is not _KEEP and allocation_id is not None:
            check_id(allocation_id, "alloc_")
        with self._lock:
            op = self._get(self._owner.get(unit_id, ""), f"no unit {unit_id!r}")
            unit = op.units.get(unit_id)
            if unit is None:
                raise ValueError(f"no unit {unit_id!r}")
            if allocation_id is _KEEP:
                allocation = (unit.allocation_id or new_id("alloc_")) if status in ALLOCATED \
                    else None
            else:
                allocation = allocation_id if isinstance(allocation_id, str) else None
            now = self.now()
            unit.change(status, allocation, now)
            event = {"id": new_id("evt_"), "type": "unit.updated", "api_version": API_VERSION,
                     "created_at": _rfc3339(now), "data": {"unit": unit.as_json()}}
            op.webhook_events.append(event)
            endpoints = [e for e in op.endpoints.values()
                         if e.status == "enabled" and "unit.updated" in e.event_types]
            self._deliverer.enqueue(endpoints, event)
        return event

    def unit(self, unit_id: str) -> dict[str, Any]:
        """A unit as the API shows it (whatever its operator)."""
        with self._lock:
            op = self._get(self._owner.get(unit_id, ""), f"no unit {unit_id!r}")
            if unit_id not in op.units:
                raise ValueError(f"no unit {unit_id!r}")
            return op.units[unit_id].as_json()

    def operators(self) -> list[str]:
        """The operators' ids, the default one first."""
        with self._lock:
            return list(self._operators)

    def _get(self, operator_id: str, why: str | None = None) -> Operator:
        """Caller holds the lock; ``ValueError`` for an unknown operator."""
        op = self._operators.get(operator_id)
        if op is None:
            raise ValueError(why or f"no operator {operator_id!r}")
        return op

    # -- webhooks -----------------------------------------------------------------------
    def disable_endpoint(self, endpoint_id: str) -> dict[str, Any]:
        """Disable a webhook endpoint as its operator would (no more deliveries)."""
        with self._lock:
            op = self._get(self._owner.get(endpoint_id, ""), f"no endpoint {endpoint_id!r}")
            endpoint = op.endpoints[endpoint_id]
            if endpoint.status != "disabled":
                endpoint.status, endpoint.disabled_at = "disabled", self.now()
                endpoint.updated_at = self.now()
            return endpoint.as_json()

    def endpoint(self, endpoint_id: str) -> Endpoint:
        """A webhook endpoint, secret included (the sandbox sees everything)."""
        with self._lock:
            op = self._get(self._owner.get(endpoint_id, ""), f"no endpoint {endpoint_id!r}")
            return op.endpoints[endpoint_id]

    def webhook_faults(self, **switches: Any) -> None:
        """Delivery switches: ``duplicate``, ``reorder``, ``stale_t``, ``stale_by_s``,
        ``keep_t_on_retry``, ``bad_signature``, ``retry_s``, ``timeout_s``, ``reset``
        (:meth:`devkit.sandbox.delivery.Deliverer.configure`)."""
        self._deliverer.configure(**switches)

    def pause_deliveries(self) -> None:
        """Hold every webhook delivery until :meth:`resume_deliveries` or a flush."""
        self._deliverer.pause()

    def resume_deliveries(self) -> None:
        """Send the held webhook deliveries."""
        self._deliverer.resume()

    def flush_deliveries(self, timeout: float = 10.0) -> bool:
        """Send everything queued or held now, retries included, and wait for those
        attempts; ``False`` if they took over ``timeout`` seconds."""
        return self._deliverer.flush(timeout)

    def deliver_raw(self, endpoint_id: str, body: bytes, *, secret: str | None = None,
                    t: int | None = None, sign: bool = True,
                    headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        """POST ``body`` to an endpoint now (a forged or hand-made delivery): signed with
        its secret (or ``secret``) unless ``sign`` is false; the attempt's record."""
        endpoint = self.endpoint(endpoint_id)
        return self._deliverer.deliver_raw(endpoint, body, secret=secret, t=t, sign=sign,
                                           headers=headers)

    def deliveries(self, operator: str | None = None,
                   endpoint: str | None = None) -> list[dict[str, Any]]:
        """The delivery log, oldest first: each delivery with its attempts and state."""
        return self._deliverer.log(operator, endpoint)

    def webhook_events(self, operator_id: str) -> list[dict[str, Any]]:
        """The operator's webhook events (``unit.updated`` …), oldest first."""
        with self._lock:
            return [dict(e) for e in self._get(operator_id).webhook_events]

    # -- introspection ------------------------------------------------------------------
    def events(self, operator: str | None = None) -> list[dict[str, Any]]:
        """Every timeline event created (by ``operator``'s tokens only, if given)."""
        every = super().events()
        if operator is None:
            return every
        with self._lock:
            return [e for e in every
                    if self._event_operator.get(e["id"], DEFAULT_OPERATOR) == operator]

    def operator_state(self, operator_id: str) -> dict[str, Any]:
        """One operator's counts and resources, as ``GET /_sandbox/operators/{id}``."""
        records = [r for r in self.requests if (r.operator or DEFAULT_OPERATOR) == operator_id]
        times = [r.at for r in records if not r.refused]
        events = len(self.events(operator_id))
        deliveries = self.deliveries(operator_id)
        with self._lock:
            op = self._get(operator_id)
            now = self.now()
            tokens = [t for t in self._tokens.values() if t.operator == operator_id]
            return {
                "id": op.id, "name": op.name,
                "sites": [s.as_json() for s in op.sites.values()],
                "units": [u.as_json() for u in op.units.values()],
                "tokens_issued": op.tokens_issued, "refreshes": op.refreshes,
                "active_tokens": sum(now < t.expires_at for t in tokens),
                "grants": sum(g.operator == operator_id and not g.revoked
                              for g in self._grants.values()),
                "endpoints": [{**e.as_json(), "secret": e.secret}
                              for e in op.endpoints.values()],
                "deliveries": len(deliveries),
                "delivered": sum(d["state"] == "delivered" for d in deliveries),
                "events": events, "webhook_events": len(op.webhook_events),
                "requests": len(records),
                "rate_limited": sum(r.status == 429 for r in records),
                "max_in_1s": max_in_window(times, 1.0),
                "max_in_60s": max_in_window(times, 60.0),
            }

    def state(self) -> dict[str, Any]:
        """As :meth:`SandboxState.state`, plus operators, the partner app and webhooks."""
        doc = super().state()
        app = self._partner
        doc["operators"] = {op: self.operator_state(op) for op in self.operators()}
        doc["partner_app"] = None if app is None else {
            "client_id": app.client_id, "name": app.name, "redirect_uris": list(app.redirect_uris),
            "scopes": None if app.scopes is None else sorted(app.scopes)}
        refresh = self.refresh_token_ttl_s
        doc["oauth"] = {"access_token_ttl_s": self.access_token_ttl_s,
                        "refresh_token_ttl_s": None if math.isinf(refresh) else refresh,
                        "code_ttl_s": self.code_ttl_s, "consent_operator": self._consent[0],
                        "consent_auto": self._consent[1]}
        doc["webhooks"] = self._deliverer.state()
        return doc

    # -- authentication -----------------------------------------------------------------
    def _authenticate(self, headers: Mapping[str, str],
                      scope: str = EVENT_SCOPE) -> _Token | _Reply:
        """The request's token, or its 401 (unknown, expired, revoked) or 403 (scope)."""
        scheme, _, token = headers.get("authorization", "").partition(" ")
        with self._lock:
            info = self._tokens.get(token.strip()) if scheme.lower() == "bearer" else None
            valid = info is not None and self.now() < info.expires_at
        if info is None or not valid:
            why = "missing Bearer token" if not token else "the access token is invalid or expired"
            return _error(
                "invalid_token", why, (), (("WWW-Authenticate", 'Bearer error="invalid_token"'),)
            )
        if info.scopes is not None and scope not in info.scopes:
            return _error("forbidden", f"the access token lacks the {scope} scope")
        return info

    def _new_grant(self, operator: str, client_id: str, scopes: Iterable[str]) -> Grant:
        """Caller holds the lock."""
        grant = Grant(f"grant_{uuid.uuid4().hex[:16]}", operator, client_id, frozenset(scopes))
        self._grants[grant.id] = grant
        return grant
