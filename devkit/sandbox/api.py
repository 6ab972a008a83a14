"""The sandbox's request pipeline: Stora's endpoints and the admin API.

:class:`Sandbox` is :class:`~devkit.sandbox.app.SandboxState` with Stora's endpoints and the
admin API, and the partner side (:mod:`devkit.sandbox.partner_admin` and below); the layers
a request passes are listed in docs/design/sandbox.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import math
import secrets
import threading
import uuid
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl

from devkit.sandbox.listing import page_reply, paging
from devkit.sandbox.oauth import AUTHORIZE_PATH
from devkit.sandbox.partner_admin import PartnerAdmin
from devkit.sandbox.partner_api import PARTNER_GRANTS
from devkit.sandbox.rules import (
    _SCOPE_RE,
    ADMIN_PREFIX,
    EVENTS_PATH,
    FAULT_CODES,
    LOGGER,
    POLL_S,
    SOURCE_SCOPE,
    SOURCES_PATH,
    TOKEN_PATH,
    RequestRecord,
    _accepts_json,
    _error,
    _fingerprint,
    _injected_failure,
    _json_object,
    _json_reply,
    _media_type,
    _oauth_error,
    _Reply,
    _rfc3339,
    _Stored,
    _Token,
    _validate_event,
)
from devkit.sandbox.server import _Server


class Sandbox(PartnerAdmin):
    """A local Stora API: the real HTTP peer of the outbox's and the relay's tests.

    ``clients`` maps OAuth client ids to secrets; ``static_tokens`` are long-lived Bearer
    tokens; both reach the default operator.  ``partner_app`` and
    :meth:`create_operator` make it "Stora for partners" (:class:`PartnerState`).  Use as
    a context manager or call :meth:`start` and :meth:`stop`.  Every method is
    thread-safe.  docs/design/sandbox.md lists the behaviours chosen where Stora's are
    undocumented.
    """

    # -- lifecycle ------------------------------------------------------------------
    def start(self) -> Sandbox:
        """Listen and serve in a background thread; :attr:`port` becomes the real port."""
        if self._server is not None:
            raise RuntimeError("the sandbox is already running")
        self._stopping.clear()
        server = _Server((self.host, self.port), self)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": POLL_S},
            name="stora-sandbox",
            daemon=True,
        )
        self._thread.start()
        self._deliverer.start()
        LOGGER.info("Stora sandbox listening on %s", self.url)
        return self

    def stop(self) -> None:
        """Stop serving and close every connection, idle keep-alive ones included."""
        server, self._server = self._server, None
        if server is None:
            return
        self._deliverer.stop()
        self._stopping.set()  # wakes requests sleeping in "slow"
        server.shutdown()
        server.close_connections()
        server.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the API ---------------------------------------------------------------------
    def _refuse(self, method: str, path: str, key: str | None) -> bool:
        """True (and recorded) when an outage refuses this request."""
        with self._lock:
            if not self._faults.outage:
                return False
            self._log.append(RequestRecord(self.now(), method, path, None, key, refused=True))
            return True

    def _handle(self, method: str, path: str, headers: Mapping[str, str], body: bytes,
                query: str = "") -> _Reply:
        """Answer one API request (layers 2–8 of docs/design/sandbox.md) and record it."""
        key = headers.get("idempotency-key") or None
        if path == AUTHORIZE_PATH:  # a page for a person's browser: not the rate-limited API
            now = self.now()
            page = self._authorize(method, headers, body, query)
            with self._lock:
                self._log.append(RequestRecord(now, method, path, page.status, key))
            return page
        operator = self._operator_of(path, headers, body)
        with self._lock:
            now = self.now()
            reply = self._redirect(path) or self._admit(now, operator)
        replayed = mismatch = False
        if reply is not None:
            pass
        elif method == "POST" and path == TOKEN_PATH:
            self._delay()
            reply = self._issue_token(headers, body)
        elif method == "POST" and path == EVENTS_PATH:
            reply, replayed, mismatch = self._idempotent(
                key, operator, body, lambda: self._create_event(headers, body), events=True)
        elif method == "GET" and path == SOURCES_PATH:
            self._delay()
            reply = self._list_sources(headers, query)
        elif (handler := self._partner_route(method, path, headers, body, query)) is not None:
            if method == "POST":
                reply, replayed, mismatch = self._idempotent(key, operator, body, handler)
            else:
                self._delay()
                reply = handler()
        else:
            self._delay()
            reply = _error("invalid_endpoint", f"no endpoint {method} {path}")
        record = RequestRecord(
            now, method, path, reply.status, key, replayed, reply.drop, False, mismatch, operator
        )
        with self._lock:
            self._log.append(record)
        return reply

    def _redirect(self, path: str) -> _Reply | None:
        """The front proxy's 3xx while ``redirect_next`` lasts (caller holds the lock)."""
        f = self._faults
        if f.redirect_next <= 0:
            return None
        f.redirect_next -= 1
        target = f.redirect_location + path
        page = f'<html><body>Moved to <a href="{target}">{target}</a></body></html>'
        return _Reply(f.redirect_status, page.encode(),
                      (("Content-Type", "text/html"), ("Location", target)))

    def _admit(self, now: float, operator: str) -> _Reply | None:
        """The 429 for a storm (every operator) or an exceeded limit of ``operator``'s
        budget, else ``None`` (caller holds the lock)."""
        storm = self._faults.storm_until
        if storm is not None and now < storm:
            limit, reset = self.max_per_second, storm
        else:
            refusal = self._operators[operator].limiter.admit(now)
            if refusal is None:
                return None
            limit, reset = refusal
        headers = (("RateLimit-Limit", str(limit)), ("RateLimit-Reset", str(math.ceil(reset))))
        return _error(
            "too_many_requests", "Rate limit exceeded; retry after RateLimit-Reset", (), headers
        )

    def _delay(self) -> None:
        with self._lock:
            slow = self._faults.slow_s
        if slow > 0:
            self._stopping.wait(slow)

    def _issue_token(self, headers: Mapping[str, str], body: bytes) -> _Reply:
        if _media_type(headers.get("content-type")) != "application/json":
            return _oauth_error(
                400, "invalid_request", "the body must be JSON (Content-Type: application/json)"
            )
        try:
            doc = json.loads(body)
        except ValueError:
            return _oauth_error(400, "invalid_request", "the body is not valid JSON")
        if isinstance(doc, dict) and doc.get("grant_type") in PARTNER_GRANTS:
            return self._partner_token(doc)
        if isinstance(doc, dict) and self._is_partner_client(doc.get("client_id")):
            return _oauth_error(400, "unauthorized_client",
                                "a partner app must use the authorization_code grant")
        fields = ("grant_type", "client_id", "client_secret", "scope")
        if not isinstance(doc, dict) or not all(
            isinstance(doc.get(f), str) and doc[f] for f in fields
        ):
            return _oauth_error(400, "invalid_request", f"{', '.join(fields)} are required strings")
        if doc["grant_type"] != "client_credentials":
            return _oauth_error(400, "unsupported_grant_type", "use client_credentials, "
                                "authorization_code or refresh_token")
        secret = self._clients.get(doc["client_id"])
        if secret is None or not hmac.compare_digest(
            secret.encode(), doc["client_secret"].encode()
        ):
            return _oauth_error(401, "invalid_client", "client authentication failed")
        scopes = doc["scope"].split()
        if not scopes or not all(_SCOPE_RE.fullmatch(s) for s in scopes):
            return _oauth_error(
                400, "invalid_scope", "scopes look like public.<resource>:read|write"
            )
        token = secrets.token_urlsafe(32)
        creator = f"app_{hashlib.sha256(doc['client_id'].encode()).hexdigest()[:16]}"
        with self._lock:
            now = self.now()
            self._tokens[token] = _Token(creator, frozenset(scopes), now + self.token_ttl_s, True)
        return _json_reply(
            200,
            {
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": int(self.token_ttl_s),
                "scope": " ".join(scopes),
                "created_at": int(now),
                "refresh_token": None,
            },
        )

    def _idempotent(
        self, key: str | None, operator: str, body: bytes, handler: Callable[[], _Reply],
        *, events: bool = False,
    ) -> tuple[_Reply, bool, bool]:
        """Idempotency around a POST's ``handler``: ``(reply, replayed, body_mismatch)``.

        Keys belong to an operator.  ``events``: the event faults (``drop_after_commit``)
        apply.
        """
        fingerprint = _fingerprint(body)
        scoped = (operator, key or "")
        if key is not None:
            with self._lock:
                stored = self._stored.get(scoped)
                if stored is not None and self.now() >= stored.stored_at + self.idempotency_ttl_s:
                    del self._stored[scoped]
                    stored = None
                if stored is not None:
                    return stored.reply, True, stored.fingerprint != fingerprint
                if scoped in self._inflight:
                    return (
                        _error("conflict", "a request with this Idempotency-Key is in progress"),
                        False,
                        False,
                    )
                self._inflight.add(scoped)
        try:
            self._delay()
            reply = handler()
            with self._lock:
                if key is not None and (reply.status != 401 or self.store_unauthorized):
                    self._stored[scoped] = _Stored(reply, self.now(), fingerprint)
                if events and reply.status == 201 and self._faults.drop_after_commit > 0:
                    self._faults.drop_after_commit -= 1
                    reply = dataclasses.replace(reply, drop=True)
        finally:
            if key is not None:
                with self._lock:
                    self._inflight.discard(scoped)
        return reply, False, False

    def _list_sources(self, headers: Mapping[str, str], query: str) -> _Reply:
        """``GET /timeline/sources``: one page of the sources, as stora-api §3.4 and §5."""
        token = self._authenticate(headers, SOURCE_SCOPE)
        if isinstance(token, _Reply):
            return token
        window = paging(dict(parse_qsl(query)))
        if isinstance(window, _Reply):
            return window
        stamp = _rfc3339(self.now())
        sources = [{"id": ident, "name": f"Sandbox source {ident}", "website_url": None,
                    "global": False, "created_at": stamp, "updated_at": stamp}
                   for ident in self.timeline_sources]
        return page_reply("timeline_sources", sources, *window)

    def _create_event(self, headers: Mapping[str, str], body: bytes) -> _Reply:
        """Layers 6 and 7: authenticate, validate and commit one event."""
        token = self._authenticate(headers)
        if isinstance(token, _Reply):
            return token
        with self._lock:
            f = self._faults
            failing = f.fail_next > 0
            if failing:
                f.fail_next -= 1
                status, chars, details = f.fail_status, f.fail_message_chars, f.fail_details
        if failing:
            return _injected_failure(status, chars, details)
        if not _accepts_json(headers.get("accept")):
            return _error("invalid_format", "this endpoint answers application/json only")
        if _media_type(headers.get("content-type")) != "application/json":
            return _error(
                "invalid_request", "request bodies must be JSON (Content-Type: application/json)"
            )
        try:
            doc = json.loads(body)
        except ValueError:
            return _error("invalid_request", "the request body is not valid JSON")
        problems = _validate_event(doc)
        if problems:
            return _error("invalid_content", "the request body is invalid", problems)
        external_id = doc["external"]["id"]
        with self._lock:
            rejected = external_id in self._faults.reject_external_ids
            status = self._faults.reject_status
            if not rejected:
                event = self._new_event(doc, token.creator)
                self._events.append(event)
                self._event_operator[event["id"]] = token.operator
        if rejected:
            return _error(
                FAULT_CODES[status],
                "external id refused (sandbox reject_external_ids)",
                [("/external/id", "is refused")],
            )
        return _json_reply(201, {"event": event, "meta": {"request_id": str(uuid.uuid4())}})

    def _new_event(self, doc: Mapping[str, Any], creator: str) -> dict[str, Any]:
        """The stored event, shaped like stora-api §3.2's response example."""
        stamp = _rfc3339(self.now())
        external = doc["external"]

        def ref(key: str) -> dict[str, str] | None:
            value = doc.get(key)
            return {"id": value["id"]} if isinstance(value, dict) else None

        return {
            "id": f"aevt_{uuid.uuid4().hex[:24]}",
            "contact": ref("contact"),
            "site": ref("site"),
            "unit": None,
            "unit_type": None,
            "tenancy": None,
            "subscription": None,
            "invoice": None,
            "source": ref("source"),
            "template": ref("template"),
            "creator": {"id": creator},
            "description": doc.get("description"),
            "external": {"id": external["id"], "url": external.get("url")},
            "variables": doc.get("variables") or {},
            "created_at": stamp,
            "updated_at": stamp,
        }

    # -- the admin API ------------------------------------------------------------------
    def _admin(self, method: str, path: str, body: bytes, query: str = "") -> _Reply:
        """``/_sandbox/…``: not Stora's; never limited, authenticated or recorded."""
        route = (method, path.rstrip("/"))
        if route == ("GET", f"{ADMIN_PREFIX}/state"):
            return _json_reply(200, self.state())
        if route == ("GET", f"{ADMIN_PREFIX}/events"):
            operator = dict(parse_qsl(query)).get("operator")
            return _json_reply(200, {"events": self.events(operator)})
        if route == ("GET", f"{ADMIN_PREFIX}/requests"):
            return _json_reply(200, {"requests": [r.as_dict() for r in self.requests]})
        if route == ("POST", f"{ADMIN_PREFIX}/faults"):
            try:
                self.configure(_json_object(body))
            except (TypeError, ValueError) as exc:
                return _json_reply(400, {"error": str(exc)})
            return _json_reply(200, {"faults": self.state()["faults"]})
        partner = self._partner_admin(method, path, body, query)
        if partner is not None:
            return partner
        return _json_reply(404, {"error": f"no admin endpoint {method} {path}"})


