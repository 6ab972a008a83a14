"""The operator's pages (contract §7.2): connect, the OAuth callback, the connected page.

Server-rendered (Jinja2, autoescaped), no JavaScript.  After a successful connect the
browser holds a session cookie, the operator's id and an expiry encrypted and
authenticated under the data key (AES-GCM: it cannot be read or forged without the key),
so ``/`` shows that operator's sites and their gateways' health.  Every failure of the
connect flow is a page in plain words with status 400, and nothing is stored.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape

from relay.cli.render import ago
from relay.connect import ConnectError, ConnectResult
from relay.crypto import DecryptError
from relay.operators import OperatorInfo
from relay.scopes import reasons
from relay.services import Services

__all__ = ["SESSION_COOKIE", "SESSION_TTL_S", "pages"]

LOGGER = logging.getLogger(__name__)
SESSION_COOKIE = "relay_session"
SESSION_TTL_S = 12 * 3600
_SESSION_AAD = b"relay session"
_TEMPLATES = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"),
                         autoescape=select_autoescape(["html"]))
_TEMPLATES.globals["ago"] = ago

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


def _session_operator(services: Services, request: Request) -> str | None:
    cookie = request.cookies.get(SESSION_COOKIE)
    if not cookie or len(cookie) > 1024:
        return None
    try:
        doc = json.loads(services.keyring.decrypt(cookie, aad=_SESSION_AAD))
    except (DecryptError, ValueError):
        return None
    operator = doc.get("op") if isinstance(doc, dict) else None
    expires = doc.get("exp") if isinstance(doc, dict) else None
    if not isinstance(operator, str) or not isinstance(expires, int | float):
        return None
    return operator if expires >= services.clock() else None


def _set_session(services: Services, response: Response, operator_id: str) -> None:
    value = services.keyring.encrypt(json.dumps(
        {"op": operator_id, "exp": services.clock() + SESSION_TTL_S}).encode(),
        aad=_SESSION_AAD)
    response.set_cookie(SESSION_COOKIE, value, max_age=SESSION_TTL_S, httponly=True,
                        samesite="lax",
                        secure=services.config.relay.public_url.startswith("https://"))


def _site_rows(services: Services, operator: OperatorInfo) -> list[dict[str, str]]:
    registered = {s.site_id: s for s in services.sites.list(operator.id)}
    names = dict(services.operators.site_names(operator.id))
    rows = []
    for site_id in operator.sites:
        site = registered.get(site_id)
        if site is None or site.revoked_at is not None:
            health, css, heard = "no gateway", "unknown", "-"
        elif site.online is None:
            health, css, heard = "never seen", "unknown", "-"
        else:
            health, css = ("online", "online") if site.online else ("offline", "offline")
            heard = ago(site.status_at)
        rows.append({"id": site_id, "name": names.get(site_id) or site_id, "health": health,
                     "health_class": css, "heard": heard})
    return rows


def _connected(services: Services, operator: OperatorInfo, *, result: ConnectResult | None,
               ) -> HTMLResponse:
    return _page(services, "connected.html", title=operator.name, operator=operator,
                 sites=_site_rows(services, operator), just_connected=result is not None,
                 webhook=result.webhook if result else "", connect_url="/connect")


def pages(services: Services, *,
          on_connected: Callable[[str], None] | None = None) -> APIRouter:
    """The routes of the operator's pages; ``on_connected(operator_id)`` runs after an
    operator connects (reconciliation)."""
    router = APIRouter()

    @router.get("/", response_class=HTMLResponse)
    def home(request: Request) -> HTMLResponse:
        operator_id = _session_operator(services, request)
        operator = services.operators.get(operator_id) if operator_id else None
        if operator is not None:
            return _connected(services, operator, result=None)
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
        operator = services.operators.get(result.operator_id)
        if operator is None:  # pragma: no cover (just stored)
            raise RuntimeError(f"operator {result.operator_id} vanished")
        response = _connected(services, operator, result=result)
        _set_session(services, response, result.operator_id)
        return response

    return router
