"""The operator's pages (contract §7.2) and the partner's staff pages.

Server-rendered (Jinja2, autoescaped), no JavaScript: a page that must stay current
reloads itself every :data:`REFRESH_S` seconds (``<meta http-equiv="refresh">``).

* ``/connect``, ``/oauth/callback``: the connect flow.  Every failure is a page in plain
  words with status 400, and nothing is stored.  After a successful connect the browser
  holds a session cookie, the operator's id and an expiry encrypted and authenticated
  under the data key (AES-GCM: it cannot be read or forged without the key).
* ``/``: with that session, the operator's live view (:mod:`relay.liveview`): sites and
  their gateways, units in lockout, the latest commands, Timeline delivery; paged.
* ``/staff``: sign in with an ``admin`` API key (a form; the key is checked, never
  stored in the browser: the cookie names the key's id, checked live on every page, so
  revoking the key ends its sessions), then every operator, each one's live view read
  only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape

from relay.apikeys import ADMIN
from relay.cli.render import ago, until
from relay.connect import ConnectError, ConnectResult
from relay.crypto import DecryptError
from relay.http import read_capped
from relay.liveview import live_view, operators_overview
from relay.scopes import reasons
from relay.services import Services

__all__ = ["REFRESH_S", "SESSION_COOKIE", "SESSION_TTL_S", "STAFF_COOKIE", "pages", "staff_pages"]

LOGGER = logging.getLogger(__name__)
SESSION_COOKIE = "relay_session"
SESSION_TTL_S = 12 * 3600
_SESSION_AAD = b"relay session"
#: The staff pages' session: an admin key's id, checked live on every page.
STAFF_COOKIE = "relay_staff"
STAFF_SESSION_TTL_S = 8 * 3600
_STAFF_AAD = b"relay staff session"
_TEMPLATES = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"),
                         autoescape=select_autoescape(["html"]))
_TEMPLATES.globals["ago"] = ago
_TEMPLATES.globals["until"] = until
#: The connected page reloads itself this often (a gateway going offline shows within
#: it; no script needed).
REFRESH_S = 10

_PROBLEMS = {
    "denied": ("Stora was not connected",
               "You chose not to give {app} access to your Stora account, so nothing was "
               "connected and nothing was stored.",
               "If that was a mistake, start again and choose Approve on Stora's page."),
    "state": ("This sign-in link cannot be used",
              "{why}: for your safety each sign-in link works once and for ten minutes. "
              "Nothing was connected.",
              "Start again from the beginning."),
    "no_sites": ("No sites to connect",
                 "Stora lists no sites for this account, so {app} would have no doors to "
                 "manage ({why}). Nothing was connected.",
                 "Connect the Stora account that holds your sites."),
    "exchange": ("Stora could not be connected",
                 "Stora did not complete the sign-in ({why}). Nothing was connected.",
                 "Please try again in a few minutes; if it keeps failing, contact support."),
}


def _page(services: Services, template: str, status: int = 200, **values: Any) -> HTMLResponse:
    html = _TEMPLATES.get_template(template).render(app_name=services.config.relay.app_name,
                                                    **values)
    return HTMLResponse(html, status_code=status, headers={"Cache-Control": "no-store"})


def _sealed_value(services: Services, request: Request, cookie_name: str, aad: bytes,
                  field: str) -> str | None:
    """``field`` of the cookie ``cookie_name`` sealed with :func:`_seal`, if it opens and
    has not expired."""
    cookie = request.cookies.get(cookie_name)
    if not cookie or len(cookie) > 1024:
        return None
    try:
        doc = json.loads(services.keyring.decrypt(cookie, aad=aad))
    except (DecryptError, ValueError):
        return None
    value = doc.get(field) if isinstance(doc, dict) else None
    expires = doc.get("exp") if isinstance(doc, dict) else None
    if not isinstance(value, str) or not isinstance(expires, int | float) \
            or expires < services.clock():
        return None
    return value


def _seal(services: Services, aad: bytes, field: str, value: str, ttl_s: float) -> str:
    """``{field: value, exp}`` encrypted and authenticated under the data key."""
    return services.keyring.encrypt(json.dumps(
        {field: value, "exp": services.clock() + ttl_s}).encode(), aad=aad)


def _session_operator(services: Services, request: Request) -> str | None:
    return _sealed_value(services, request, SESSION_COOKIE, _SESSION_AAD, "op")


def _set_session(services: Services, response: Response, operator_id: str) -> None:
    value = _seal(services, _SESSION_AAD, "op", operator_id, SESSION_TTL_S)
    response.set_cookie(SESSION_COOKIE, value, max_age=SESSION_TTL_S, httponly=True,
                        samesite="lax",
                        secure=services.config.relay.public_url.startswith("https://"))


def _connected(services: Services, operator_id: str, *, result: ConnectResult | None,
               page: int = 1, staff: bool = False) -> HTMLResponse | None:
    view = live_view(services.db, operator_id, page=page)
    if view is None:
        return None
    base = f"/staff/operators/{operator_id}" if staff else "/"
    return _page(services, "connected.html", title=view.name, view=view,
                 just_connected=result is not None,
                 webhook=result.webhook if result else "", connect_url="/connect",
                 max_per_minute=services.config.stora.max_per_minute,
                 refresh_s=REFRESH_S, staff=staff, base_url=base,
                 refresh_url=base + (f"?page={view.page}" if view.page > 1 else ""))


def _staff_session(services: Services, request: Request) -> bool:
    """Whether the browser holds a live staff session (an admin key signed in)."""
    key_id = _sealed_value(services, request, STAFF_COOKIE, _STAFF_AAD, "key")
    # Checked live: revoking the key ends its sessions.
    return key_id is not None and services.api_keys.is_live_admin(key_id)


def staff_pages(services: Services) -> APIRouter:
    """The partner's staff pages: sign in with an admin key, then every operator and each
    one's live view (read only)."""
    router = APIRouter(prefix="/staff")

    @router.get("", response_class=HTMLResponse)
    def overview(request: Request, page: int = Query(1, ge=1, le=100_000)) -> HTMLResponse:
        if not _staff_session(services, request):
            return _page(services, "staff_login.html", title="Staff", refused=False)
        rows, shown, pages, total = operators_overview(services.db, page=page)
        return _page(services, "staff.html", title="Every operator", rows=rows, page=shown,
                     pages=pages, total=total, refresh_s=REFRESH_S)

    @router.get("/operators/{operator_id}", response_class=HTMLResponse)
    def operator(operator_id: str, request: Request,
                 page: int = Query(1, ge=1, le=100_000)) -> Response:
        if not _staff_session(services, request):
            return RedirectResponse("/staff", status_code=303)
        shown = _connected(services, operator_id[:64], result=None, page=page, staff=True)
        if shown is None:
            return _page(services, "problem.html", status=404, title="No such operator",
                         message=f"No operator {operator_id[:64]} is connected.",
                         advice="Pick one from the list.", start_url="/staff")
        return shown

    @router.post("/login", response_class=HTMLResponse)
    async def login(request: Request) -> Response:
        body = await read_capped(request, 4096)
        fields = parse_qs((body or b"").decode("utf-8", "replace"))
        text = (fields.get("key") or [""])[0].strip()
        key = services.api_keys.authenticate(text)
        if key is None or key.role != ADMIN:
            LOGGER.warning("staff sign-in refused (%s)", "not an admin key" if key else
                           "unknown or revoked key")
            return _page(services, "staff_login.html", status=401, title="Staff",
                         refused=True)
        LOGGER.info("staff sign-in with admin key %s (%s)", key.id, key.name)
        response = RedirectResponse("/staff", status_code=303)
        value = _seal(services, _STAFF_AAD, "key", key.id, STAFF_SESSION_TTL_S)
        response.set_cookie(STAFF_COOKIE, value, max_age=STAFF_SESSION_TTL_S, httponly=True,
                            samesite="strict", path="/staff",
                            secure=services.config.relay.public_url.startswith("https://"))
        return response

    @router.post("/logout")
    def logout() -> RedirectResponse:
        response = RedirectResponse("/staff", status_code=303)
        response.delete_cookie(STAFF_COOKIE, path="/staff")
        return response

    return router


def pages(services: Services, *,
          on_connected: Callable[[str], None] | None = None) -> APIRouter:
    """The routes of the operator's pages; ``on_connected(operator_id)`` runs after an
    operator connects (reconciliation)."""
    router = APIRouter()

    @router.get("/", response_class=HTMLResponse)
    def home(request: Request, page: int = Query(1, ge=1, le=100_000)) -> HTMLResponse:
        operator_id = _session_operator(services, request)
        shown = _connected(services, operator_id, result=None, page=page) \
            if operator_id else None
        if shown is not None:
            return shown
        return _page(services, "connect.html", title="Connect Stora", connect_url="/connect",
                     scopes=reasons(services.config.stora.scopes))

    @router.get("/connect")
    def connect() -> RedirectResponse:
        return RedirectResponse(services.connector.start(), status_code=302,
                                headers={"Cache-Control": "no-store"})

    @router.get("/oauth/callback", response_class=HTMLResponse)
    def callback(request: Request) -> HTMLResponse:
        params = dict(request.query_params.items())
        try:
            result = services.connector.finish(params)
        except ConnectError as exc:
            LOGGER.warning("connect refused (%s): %s", exc.kind, exc)
            title, message, advice = _PROBLEMS[exc.kind]
            app = services.config.relay.app_name
            return _page(services, "problem.html", status=400, title=title,
                         message=message.format(app=app, why=str(exc).capitalize()
                                                if exc.kind == "state" else str(exc)),
                         advice=advice, start_url="/")
        LOGGER.info("operator %s connected: %d sites, webhook %s", result.operator_id,
                    len(result.sites), result.webhook)
        if on_connected is not None:
            on_connected(result.operator_id)
        response = _connected(services, result.operator_id, result=result)
        if response is None:  # pragma: no cover (just stored)
            raise RuntimeError(f"operator {result.operator_id} vanished")
        _set_session(services, response, result.operator_id)
        return response

    return router
