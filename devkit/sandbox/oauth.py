"""OAuth 2.0 Authorization Code with PKCE for a partner app: the pieces (pure).

The registered app, authorization codes, grants (one per operator approval, holding
the current access and refresh tokens), the PKCE check (RFC 7636 S256), the checks of an
authorization request (RFC 6749 §4.1.1, §4.1.2.1) and the consent and error pages.
:class:`devkit.sandbox.partner_api.PartnerApi` serves them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import urlencode, urlsplit

from devkit.sandbox.rules import _SCOPE_RE, _Reply

AUTHORIZE_PATH: Final = "/oauth2/authorize"
#: An authorization code lives this long (RFC 6749 §4.1.2 recommends at most 10 min;
#: Doorkeeper's default is 10 min; the sandbox is stricter).
CODE_TTL_S: Final = 60.0
#: stora-api §2.2: OAuth access tokens live 2 hours.
ACCESS_TTL_S: Final = 7200.0
#: RFC 7636 §4.1: 43–128 unreserved characters.
_VERIFIER_RE: Final = re.compile(r"[A-Za-z0-9\-._~]{43,128}")
_CHALLENGE_RE: Final = re.compile(r"[A-Za-z0-9\-_]{43}")
_HTML: Final = "text/html; charset=utf-8"


@dataclass(frozen=True, slots=True)
class PartnerApp:
    """The registered partner app: its credentials and where it may be redirected.

    ``scopes`` (``None``: any ``public.*`` scope) bounds what it may ask for.
    """

    client_id: str
    client_secret: str
    redirect_uris: tuple[str, ...]
    name: str = "Sandbox partner app"
    scopes: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if not self.client_id or not self.client_secret:
            raise ValueError("a partner app needs a client id and a client secret")
        if not self.redirect_uris:
            raise ValueError("a partner app needs at least one redirect URI")
        for uri in self.redirect_uris:
            parts = urlsplit(uri)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.fragment:
                raise ValueError(f"redirect URI {uri!r} must be an absolute http(s) URL "
                                 "without a fragment")


@dataclass(slots=True)
class Grant:
    """One operator's approval of the app: its scopes and current tokens."""

    id: str
    operator: str
    client_id: str
    scopes: frozenset[str]
    access: set[str] = field(default_factory=set)
    refresh: str | None = None
    refresh_expires_at: float = float("inf")
    revoked: bool = False


@dataclass(slots=True)
class AuthCode:
    """An authorization code: single use, short-lived, bound to client, URI, challenge."""

    client_id: str
    redirect_uri: str
    operator: str
    scopes: tuple[str, ...]
    challenge: str
    expires_at: float
    used: bool = False
    grant: Grant | None = None


@dataclass(frozen=True, slots=True)
class AuthorizeRequest:
    """A checked authorization request (RFC 6749 §4.1.1 plus PKCE)."""

    client_id: str
    redirect_uri: str
    scopes: tuple[str, ...]
    state: str | None
    challenge: str

    def hidden_fields(self) -> dict[str, str]:
        """What the consent form posts back."""
        fields = {"response_type": "code", "client_id": self.client_id,
                  "redirect_uri": self.redirect_uri, "scope": " ".join(self.scopes),
                  "code_challenge": self.challenge, "code_challenge_method": "S256"}
        if self.state is not None:
            fields["state"] = self.state
        return fields


def pkce_matches(verifier: str, challenge: str) -> bool:
    """RFC 7636 S256: ``BASE64URL(SHA256(verifier))`` (no padding) equals the challenge."""
    if not _VERIFIER_RE.fullmatch(verifier):
        return False
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    computed = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    return hmac.compare_digest(computed, challenge)


def client_matches(app: PartnerApp | None, client_id: str, secret: str) -> bool:
    """Whether ``client_id``/``secret`` are the partner app's (constant-time)."""
    return app is not None and hmac.compare_digest(app.client_id.encode(), client_id.encode()) \
        and hmac.compare_digest(app.client_secret.encode(), secret.encode())


def check_authorize(
    params: Mapping[str, str], app: PartnerApp | None
) -> AuthorizeRequest | _Reply:
    """The request, or the answer to a bad one: an HTML 400 while the client or the
    redirect URI cannot be trusted (RFC 6749 §4.1.2.1: never redirect then), else a
    302 back to the redirect URI with ``error``."""
    client_id = params.get("client_id", "")
    if app is None or not client_id or client_id != app.client_id:
        return error_page(400, "Unknown application",
                          "The client_id of this link is not a registered application.")
    redirect_uri = params.get("redirect_uri", "")
    if redirect_uri not in app.redirect_uris:
        return error_page(400, "Redirect URI not registered",
                          "The redirect_uri of this link is not one the application "
                          "registered, so the sandbox will not send you there.")
    state = params.get("state")

    def fail(error: str, description: str) -> _Reply:
        return redirect(redirect_uri, error=error, error_description=description, state=state)

    if params.get("response_type") != "code":
        return fail("unsupported_response_type", "response_type must be code")
    challenge = params.get("code_challenge", "")
    if not challenge:
        return fail("invalid_request", "code_challenge is required (PKCE)")
    if params.get("code_challenge_method") != "S256":
        return fail("invalid_request", "code_challenge_method must be S256")
    if not _CHALLENGE_RE.fullmatch(challenge):
        return fail("invalid_request", "code_challenge must be 43 base64url characters")
    scopes = tuple(params.get("scope", "").split())
    if not scopes or not all(_SCOPE_RE.fullmatch(s) for s in scopes):
        return fail("invalid_scope", "scope must list public.<resource>:read|write scopes")
    if app.scopes is not None and not set(scopes) <= app.scopes:
        return fail("invalid_scope", "the application may not ask for "
                    + " ".join(sorted(set(scopes) - app.scopes)))
    return AuthorizeRequest(client_id, redirect_uri, scopes, state, challenge)


def redirect(uri: str, **params: str | None) -> _Reply:
    """A 302 to ``uri`` with ``params`` (``None`` left out) added to its query."""
    query = urlencode({k: v for k, v in params.items() if v is not None})
    joiner = "&" if urlsplit(uri).query else "?"
    return _Reply(302, b"", (("Location", f"{uri}{joiner}{query}"),
                             ("Cache-Control", "no-store")))


def error_page(status: int, title: str, text: str) -> _Reply:
    """A plain HTML page that says what went wrong, with no redirect."""
    return _page(status, title, f"<h1>{_e(title)}</h1>\n<p id=\"error\">{_e(text)}</p>")


def consent_page(app: PartnerApp, request: AuthorizeRequest, operators: Sequence[str],
                 selected: str | None) -> _Reply:
    """The consent form: the app, the scopes asked for, a test operator, two buttons."""
    scopes = "\n".join(f"  <li class=\"scope\">{_e(s)}</li>" for s in request.scopes)
    options = "\n".join(
        f"    <option value=\"{_e(op)}\"{' selected' if op == selected else ''}>{_e(op)}"
        "</option>" for op in operators)
    hidden = "\n".join(f"  <input type=\"hidden\" name=\"{_e(k)}\" value=\"{_e(v)}\">"
                       for k, v in request.hidden_fields().items())
    body = f"""<h1>Authorize {_e(app.name)}</h1>
<p id="app-name">{_e(app.name)} asks to access your Stora account with these
permissions:</p>
<ul id="scopes">
{scopes}
</ul>
<form method="post" action="{AUTHORIZE_PATH}" id="consent">
{hidden}
  <label for="operator">Test operator</label>
  <select id="operator" name="operator">
{options}
  </select>
  <button type="submit" id="approve" name="decision" value="approve">Approve</button>
  <button type="submit" id="deny" name="decision" value="deny">Deny</button>
</form>"""
    return _page(200, f"Authorize {app.name}", body)


def operator_choice(operators: Iterable[str], asked: str | None,
                    default: str | None) -> tuple[list[str], str | None]:
    """The operators the form offers and the one selected: only ``asked`` when the link
    names one, else all with ``default`` selected."""
    names = sorted(operators)
    if asked:
        return ([asked] if asked in names else []), asked
    return names, default if default in names else None


def _page(status: int, title: str, body: str) -> _Reply:
    page = (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title></head>\n<body>\n{body}\n</body>\n</html>\n")
    return _Reply(status, page.encode(), (("Content-Type", _HTML), ("Cache-Control", "no-store"),
                                          ("X-Frame-Options", "DENY")))


def _e(text: str) -> str:
    return html.escape(text, quote=True)
