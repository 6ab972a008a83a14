"""The partner endpoints: authorization (consent), the code and refresh grants, sites,
units and webhook endpoints (docs/design/sandbox.md lists them and the [ND] choices).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Final
from urllib.parse import parse_qsl

from devkit.sandbox.listing import multi, ordering, page_reply, paging
from devkit.sandbox.oauth import (
    AuthCode,
    AuthorizeRequest,
    Grant,
    check_authorize,
    client_matches,
    consent_page,
    error_page,
    operator_choice,
    pkce_matches,
    redirect,
)
from devkit.sandbox.operators import DEFAULT_OPERATOR, Operator, Site, Unit, new_id
from devkit.sandbox.partner import PartnerState
from devkit.sandbox.rules import (
    API_VERSION,
    TOKEN_PATH,
    _accepts_json,
    _error,
    _json_reply,
    _media_type,
    _oauth_error,
    _Reply,
    _Token,
)
from devkit.sandbox.webhooks import (
    ENDPOINT_STATUSES,
    WEBHOOK_READ_SCOPE,
    WEBHOOK_WRITE_SCOPE,
    Endpoint,
    matches_metadata,
    metadata_filter,
    validate_endpoint,
)

SITE_SCOPE: Final = "public.site:read"
UNIT_SCOPE: Final = "public.unit:read"
#: The grants of the partner flow; ``client_credentials`` stays the operator's own.
PARTNER_GRANTS: Final = frozenset({"authorization_code", "refresh_token"})
_FORM: Final = "application/x-www-form-urlencoded"
_ROUTE: Final = re.compile(
    rf"/{API_VERSION}/(?P<kind>sites|units|webhook_endpoints)(?:/(?P<id>[^/]+)"
    r"(?P<disable>/disable)?)?/?")
_STATUS_SPELLINGS: Final = {"overlock": "overlocked"}

Handler = Callable[[], _Reply]


class PartnerApi(PartnerState):
    """The partner endpoints' handlers over :class:`PartnerState`."""

    # -- which budget a request is charged to ---------------------------------------------
    def _operator_of(self, path: str, headers: Mapping[str, str], body: bytes) -> str:
        """The operator whose rate limits a request counts against: its Bearer token's,
        or for the token endpoint that of the code or refresh token it presents; the
        default operator for anything else."""
        scheme, _, token = headers.get("authorization", "").partition(" ")
        with self._lock:
            info = self._tokens.get(token.strip()) if scheme.lower() == "bearer" else None
            if info is not None:
                return info.operator
        if path != TOKEN_PATH:
            return DEFAULT_OPERATOR
        try:
            doc = json.loads(body)
        except ValueError:
            return DEFAULT_OPERATOR
        if not isinstance(doc, dict):
            return DEFAULT_OPERATOR
        with self._lock:
            code = self._codes.get(str(doc.get("code")))
            grant = self._refresh.get(str(doc.get("refresh_token")))
        if doc.get("grant_type") == "authorization_code" and code is not None:
            return code.operator
        if doc.get("grant_type") == "refresh_token" and grant is not None:
            return grant.operator
        return DEFAULT_OPERATOR

    # -- the consent page -------------------------------------------------------------------
    def _authorize(self, method: str, headers: Mapping[str, str], body: bytes,
                   query: str) -> _Reply:
        """``GET /oauth2/authorize``: the consent page (or an automatic answer);
        ``POST``: the operator's decision."""
        if method == "POST":
            if _media_type(headers.get("content-type")) != _FORM:
                return error_page(400, "Bad form", "The form must be posted as " + _FORM)
            params = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        elif method == "GET":
            params = dict(parse_qsl(query, keep_blank_values=True))
        else:
            return error_page(405, "Method not allowed", "Use GET or POST.")
        with self._lock:
            app, names = self._partner, list(self._operators)
            default, auto = self._consent
        checked = check_authorize(params, app)
        if isinstance(checked, _Reply):
            return checked
        assert app is not None  # check_authorize refuses a missing app
        if method == "GET":
            offered, selected = operator_choice(names, params.get("operator"), default)
            if not offered:
                return error_page(400, "Unknown operator", "No such test operator.")
            if auto is not None and selected is not None:
                return self._decide(checked, auto, selected)
            return consent_page(app, checked, offered, selected)
        decision, operator = params.get("decision"), params.get("operator", "")
        if decision not in ("approve", "deny"):
            return error_page(400, "No decision", "Choose Approve or Deny.")
        if operator not in names:
            return error_page(400, "Unknown operator", "No such test operator.")
        return self._decide(checked, decision, operator)

    def _decide(self, request: AuthorizeRequest, decision: str, operator: str) -> _Reply:
        """The redirect back: a fresh code on approval, ``access_denied`` otherwise."""
        if decision != "approve":
            return redirect(request.redirect_uri, error="access_denied",
                            error_description="the operator denied the request",
                            state=request.state)
        code = secrets.token_urlsafe(32)
        with self._lock:
            self._codes[code] = AuthCode(request.client_id, request.redirect_uri, operator,
                                         request.scopes, request.challenge,
                                         self.now() + self.code_ttl_s)
        return redirect(request.redirect_uri, code=code, state=request.state)

    # -- the token endpoint's partner grants ------------------------------------------------
    def _is_partner_client(self, client_id: object) -> bool:
        app = self._partner
        return app is not None and client_id == app.client_id

    def _partner_token(self, doc: Mapping[str, Any]) -> _Reply:
        """``grant_type`` ``authorization_code`` or ``refresh_token`` (RFC 6749 §4.1.3, §6)."""
        code_grant = doc.get("grant_type") == "authorization_code"
        fields = (("code", "redirect_uri", "code_verifier") if code_grant
                  else ("refresh_token",)) + ("client_id", "client_secret")
        if not all(isinstance(doc.get(f), str) and doc[f] for f in fields):
            return _oauth_error(400, "invalid_request",
                                f"{', '.join(fields)} are required strings")
        if not client_matches(self._partner, doc["client_id"], doc["client_secret"]):
            return _oauth_error(401, "invalid_client", "client authentication failed")
        with self._lock:
            now = self.now()
            answer = self._exchange(doc, now) if code_grant else self._refresh_grant(doc, now)
        if isinstance(answer, _Reply):
            return answer
        return _json_reply(200, answer, (("Cache-Control", "no-store"),))

    def _exchange(self, doc: Mapping[str, Any], now: float) -> dict[str, Any] | _Reply:
        """A code for tokens; the code is spent by its first presentation, whatever the
        outcome (caller holds the lock)."""
        code = self._codes.get(doc["code"])
        if code is None:
            return _oauth_error(400, "invalid_grant", "unknown authorization code")
        if code.used:
            if code.grant is not None:  # RFC 6749 §4.1.2: revoke what it issued
                self._revoke(code.grant)
            return _oauth_error(400, "invalid_grant", "the authorization code was already "
                                "used; the tokens issued from it are revoked")
        code.used = True
        if now >= code.expires_at:
            return _oauth_error(400, "invalid_grant", "the authorization code expired")
        if code.client_id != doc["client_id"] or code.redirect_uri != doc["redirect_uri"]:
            return _oauth_error(400, "invalid_grant",
                                "the code was issued to another client or redirect_uri")
        if not pkce_matches(doc["code_verifier"], code.challenge):
            return _oauth_error(400, "invalid_grant", "code_verifier does not match the "
                                "code_challenge (PKCE S256)")
        code.grant = self._new_grant(code.operator, code.client_id, code.scopes)
        return self._issue_pair(code.grant, now)

    def _refresh_grant(self, doc: Mapping[str, Any], now: float) -> dict[str, Any] | _Reply:
        """Rotation with immediate revocation: the presented refresh token and every
        access token of its grant stop working now (caller holds the lock)."""
        grant = self._refresh.get(doc["refresh_token"])
        if grant is None or grant.revoked or grant.client_id != doc["client_id"]:
            return _oauth_error(400, "invalid_grant",
                                "the refresh token is unknown, rotated or revoked")
        if now >= grant.refresh_expires_at:
            return _oauth_error(400, "invalid_grant", "the refresh token expired")
        asked = doc.get("scope")
        if asked is not None and (not isinstance(asked, str)
                                  or not set(asked.split()) <= grant.scopes):
            return _oauth_error(400, "invalid_scope",
                                "a refresh may only keep or narrow the granted scopes")
        del self._refresh[doc["refresh_token"]]
        for token in grant.access:
            self._tokens.pop(token, None)
        grant.access.clear()
        if asked:
            grant.scopes = frozenset(asked.split())
        self._operators[grant.operator].refreshes += 1
        return self._issue_pair(grant, now)

    def _issue_pair(self, grant: Grant, now: float) -> dict[str, Any]:
        """A new access and refresh token for ``grant`` (caller holds the lock)."""
        access, refresh = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        creator = f"app_{hashlib.sha256(grant.client_id.encode()).hexdigest()[:16]}"
        self._tokens[access] = _Token(creator, grant.scopes, now + self.access_token_ttl_s, True,
                                      grant.operator, grant.id)
        grant.access.add(access)
        grant.refresh = refresh
        grant.refresh_expires_at = now + self.refresh_token_ttl_s
        self._refresh[refresh] = grant
        self._operators[grant.operator].tokens_issued += 1
        return {"access_token": access, "token_type": "Bearer",
                "expires_in": int(self.access_token_ttl_s), "scope": " ".join(sorted(grant.scopes)),
                "created_at": int(now), "refresh_token": refresh}

    # -- resources ----------------------------------------------------------------------------
    def _partner_route(self, method: str, path: str, headers: Mapping[str, str], body: bytes,
                       query: str) -> Handler | None:
        """The handler of a sites, units or webhook-endpoints request, or ``None``."""
        match = _ROUTE.fullmatch(path)
        if match is None:
            return None
        kind, ident, disable = match.group("kind", "id", "disable")
        if kind == "webhook_endpoints":
            if method == "POST" and ident is None:
                return lambda: self._create_endpoint(headers, body)
            if method == "POST" and disable:
                return lambda: self._disable_endpoint(headers, ident)
        if method != "GET" or disable:
            return None
        if ident is not None:
            return lambda: self._show(headers, kind, ident)
        return lambda: self._list(headers, kind, query)

    def _reader(self, headers: Mapping[str, str], scope: str) -> tuple[_Token, Operator] | _Reply:
        token = self._authenticate(headers, scope)
        if isinstance(token, _Reply):
            return token
        if not _accepts_json(headers.get("accept")):
            return _error("invalid_format", "this endpoint answers application/json only")
        with self._lock:
            return token, self._operators[token.operator]

    def _show(self, headers: Mapping[str, str], kind: str, ident: str) -> _Reply:
        """``GET /sites/{id}``, ``/units/{id}``, ``/webhook_endpoints/{id}``: another
        operator's resource is as unknown as a missing one."""
        scope = {"sites": SITE_SCOPE, "units": UNIT_SCOPE}.get(kind, WEBHOOK_READ_SCOPE)
        auth = self._reader(headers, scope)
        if isinstance(auth, _Reply):
            return auth
        _, op = auth
        with self._lock:
            found = _pool(op, kind).get(ident)
            doc = None if found is None else found.as_json()
        if doc is None:
            return _error("resource_not_found", f"no {kind[:-1]} {ident}")
        return _json_reply(200, {kind[:-1]: doc, "meta": {"request_id": str(uuid.uuid4())}})

    def _list(self, headers: Mapping[str, str], kind: str, query: str) -> _Reply:
        """``GET /sites``, ``/units`` (``site_id``, ``unit_type_id``, ``status``),
        ``/webhook_endpoints`` (``status``, ``metadata[key]=value``), paged and sorted."""
        scope = {"sites": SITE_SCOPE, "units": UNIT_SCOPE}.get(kind, WEBHOOK_READ_SCOPE)
        auth = self._reader(headers, scope)
        if isinstance(auth, _Reply):
            return auth
        _, op = auth
        pairs = parse_qsl(query, keep_blank_values=True)
        params = dict(pairs)
        window, order = paging(params), ordering(params)
        if isinstance(window, _Reply):
            return window
        if isinstance(order, _Reply):
            return order
        keep = self._filter(kind, params, pairs)
        if isinstance(keep, _Reply):
            return keep
        with self._lock:
            chosen = sorted((r for r in _pool(op, kind).values() if keep(r)),
                            key=lambda r: float(getattr(r, order[0])), reverse=order[1])
            items = [r.as_json() for r in chosen]
        return page_reply(kind, items, *window)

    def _filter(self, kind: str, params: Mapping[str, str],
                pairs: list[tuple[str, str]]) -> Callable[[Any], bool] | _Reply:
        if kind == "sites":
            return lambda site: True
        statuses = multi(params, "status")
        if kind == "webhook_endpoints":
            wanted = metadata_filter(pairs)
            if statuses is not None and not statuses <= ENDPOINT_STATUSES:
                return _error("invalid_url_param", "status is enabled or disabled")
            return lambda e: (statuses is None or e.status in statuses) \
                and matches_metadata(e, wanted)
        if statuses is not None:
            statuses = {_STATUS_SPELLINGS.get(s, s) for s in statuses}
            known = {"available", "reserved", "occupied", "overlocked", "repossessed",
                     "unavailable"}
            if not statuses <= known:
                return _error("invalid_url_param", f"status is one of {', '.join(sorted(known))}")
        sites, types = multi(params, "site_id"), multi(params, "unit_type_id")
        return lambda u: (statuses is None or _STATUS_SPELLINGS.get(u.status, u.status)
                          in statuses) and (sites is None or u.site_id in sites) \
            and (types is None or u.unit_type_id in types)

    # -- webhook endpoints ----------------------------------------------------------------------
    def _create_endpoint(self, headers: Mapping[str, str], body: bytes) -> _Reply:
        """``POST /webhook_endpoints``: 201 with the ``secret``, the only time it is shown."""
        auth = self._reader(headers, WEBHOOK_WRITE_SCOPE)
        if isinstance(auth, _Reply):
            return auth
        token, op = auth
        if _media_type(headers.get("content-type")) != "application/json":
            return _error("invalid_request",
                          "request bodies must be JSON (Content-Type: application/json)")
        try:
            doc = json.loads(body)
        except ValueError:
            return _error("invalid_request", "the request body is not valid JSON")
        problems = validate_endpoint(doc)
        if problems:
            return _error("invalid_content", "the request body is invalid", problems)
        with self._lock:
            now = self.now()
            endpoint = Endpoint(new_id("we_"), op.id, doc["name"], doc.get("description"),
                                doc["url"], list(doc["event_types"]),
                                dict(doc.get("metadata") or {}), token.creator,
                                secrets.token_hex(32), now, now)
            op.endpoints[endpoint.id] = endpoint
            self._owner[endpoint.id] = op.id
            shown = endpoint.as_json(with_secret=True)
        return _json_reply(201, {"webhook_endpoint": shown,
                                 "meta": {"request_id": str(uuid.uuid4())}})

    def _disable_endpoint(self, headers: Mapping[str, str], ident: str) -> _Reply:
        """``POST /webhook_endpoints/{id}/disable``: 409 if it already is."""
        auth = self._reader(headers, WEBHOOK_WRITE_SCOPE)
        if isinstance(auth, _Reply):
            return auth
        _, op = auth
        with self._lock:
            endpoint = op.endpoints.get(ident)
            already = endpoint is not None and endpoint.status == "disabled"
            if endpoint is not None and not already:
                endpoint.status, endpoint.disabled_at = "disabled", self.now()
                endpoint.updated_at = self.now()
            doc = None if endpoint is None else endpoint.as_json()
        if doc is None:
            return _error("resource_not_found", f"no webhook_endpoint {ident}")
        if already:
            return _error("conflict", f"webhook_endpoint {ident} is already disabled")
        return _json_reply(200, {"webhook_endpoint": doc,
                                 "meta": {"request_id": str(uuid.uuid4())}})


def _pool(op: Operator, kind: str) -> Mapping[str, Site | Unit | Endpoint]:
    """The operator's resources of one kind."""
    if kind == "sites":
        return op.sites
    if kind == "units":
        return op.units
    return op.endpoints
