"""Connecting an operator (contract §7.2): ``/connect`` and ``/oauth/callback``.

``start`` makes a ``state`` (single use, expiring after :data:`STATE_TTL_S`) and a PKCE
S256 pair, keeps the state's digest and the verifier (encrypted) and gives the URL of
Stora's consent page.  ``finish`` takes the callback's query: it consumes the state in
one conditional update (a replayed callback finds it used), trades the code for tokens,
asks Stora for the operator's sites (how the relay recognises an operator who connects
again, :mod:`relay.operators`), stores the tokens encrypted and registers the
operator's webhook endpoint (§7.3), reusing the one it made before (found by
``metadata.relay``): creating twice would mean every event delivered twice.

Every refusal is a :class:`ConnectError` whose ``kind`` picks the page the operator
sees; nothing about the operator is stored before the exchange succeeds.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from sqlalchemy import delete, update

from relay.config import RelayConfig
from relay.crypto import Keyring, new_state, pkce_pair
from relay.db.engine import Database
from relay.db.models import OAuthState
from relay.errors import RelayError
from relay.operators import Operators, StoraSite
from relay.ratelimit import RateLimiter
from relay.stora import OAuthError, StoraApi, StoraError
from relay.tokens import Tokens

__all__ = ["STATE_TTL_S", "WEBHOOK_EVENTS", "ConnectError", "ConnectResult", "Connector",
           "verifier_aad"]

LOGGER = logging.getLogger(__name__)
#: How long a connect attempt may take at Stora's consent page (contract: ≤ 10 min).
STATE_TTL_S = 600.0
#: How long a spent or expired ``state`` is kept after its expiry.
STATE_KEEP_S = 3600.0
#: What the relay subscribes to (contract §7.3).
WEBHOOK_EVENTS = ("unit.updated",)
_AAD = b"oauth_states.verifier:"
#: The most of a callback parameter read (codes and states are short).
MAX_PARAM = 2048


class ConnectError(RelayError):
    """The connect flow stopped: ``kind`` is ``denied``, ``state``, ``exchange`` or
    ``no_sites``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class ConnectResult:
    """What connecting did, for the page that says so."""

    operator_id: str
    sites: tuple[StoraSite, ...]
    #: ``created``, ``reused`` or ``failed: <why>`` (the connection stands; retried later).
    webhook: str


def verifier_aad(digest: str) -> bytes:
    """What a connect attempt's encrypted PKCE verifier is bound to (its state's digest)."""
    return _AAD + digest.encode()


def _digest(state: str) -> str:
    return hashlib.sha256(state.encode()).hexdigest()


class Connector:
    """The connect flow for one relay."""

    def __init__(self, config: RelayConfig, db: Database, keyring: Keyring, stora: StoraApi,
                 operators: Operators, *, limiter: RateLimiter, tokens: Tokens,
                 clock: Callable[[], float] = time.time) -> None:
        self._limiter = limiter
        self._tokens = tokens
        self._config = config
        self._db = db
        self._keyring = keyring
        self._stora = stora
        self._operators = operators
        self._clock = clock

    @property
    def redirect_uri(self) -> str:
        """Where Stora sends the operator back."""
        return self._config.relay.public_url + "/oauth/callback"

    def webhook_url(self, key: str) -> str:
        """The operator's webhook URL."""
        return f"{self._config.relay.public_url}/webhooks/stora/{key}"

    def start(self) -> str:
        """A new connect attempt: the URL of Stora's consent page."""
        state = new_state()
        verifier, challenge = pkce_pair()
        now = self._clock()
        digest = _digest(state)
        with self._db.session() as s:
            # Attempts an hour past their expiry are no longer worth telling apart
            # ("expired" from "not issued"): gone, so /connect cannot grow the table.
            s.execute(delete(OAuthState).where(OAuthState.expires_at < now - STATE_KEEP_S))
            s.add(OAuthState(digest=digest, created_at=now, expires_at=now + STATE_TTL_S,
                             verifier_enc=self._keyring.encrypt(verifier.encode(),
                                                                aad=verifier_aad(digest)),
                             used_at=None))
        stora = self._config.stora
        query = urllib.parse.urlencode({
            "response_type": "code", "client_id": stora.client_id,
            "redirect_uri": self.redirect_uri, "scope": " ".join(stora.scopes),
            "state": state, "code_challenge": challenge, "code_challenge_method": "S256",
        })
        separator = "&" if "?" in stora.authorize_url else "?"
        return f"{stora.authorize_url}{separator}{query}"

    def _consume(self, state: str) -> str:
        """The verifier of a live, unused ``state``, which is used from now on."""
        digest = _digest(state)
        now = self._clock()
        with self._db.session() as s:
            enc = s.execute(
                update(OAuthState)
                .where(OAuthState.digest == digest, OAuthState.used_at.is_(None),
                       OAuthState.expires_at > now)
                .values(used_at=now)
                .returning(OAuthState.verifier_enc)).scalar_one_or_none()
            if enc is None:
                row = s.get(OAuthState, digest)
                why = ("this sign-in link was already used" if row is not None and row.used_at
                       else "this sign-in link has expired" if row is not None
                       else "this sign-in link is not one this relay issued")
                raise ConnectError("state", why)
        return self._keyring.decrypt(enc, aad=verifier_aad(digest)).decode()

    def finish(self, params: Mapping[str, str]) -> ConnectResult:
        """Complete a connect attempt from the callback's query parameters."""
        state = params.get("state", "")[:MAX_PARAM]
        error = params.get("error", "")[:MAX_PARAM]
        if not state:
            raise ConnectError("state", "the answer from Stora carried no sign-in state")
        verifier = self._consume(state)
        if error:
            kind = "denied" if error == "access_denied" else "exchange"
            raise ConnectError(kind, "Stora did not grant access"
                                if kind == "denied" else f"Stora answered {error!r}")
        code = params.get("code", "")[:MAX_PARAM]
        if not code:
            raise ConnectError("exchange", "the answer from Stora carried no code")
        try:
            tokens = self._stora.exchange_code(code, self.redirect_uri, verifier)
            sites = tuple(
                StoraSite(str(d.get("id", "")), str(d.get("name", "")))
                for d in self._stora.pages("sites", "sites", tokens.access_token))
        except OAuthError as exc:
            raise ConnectError("exchange", f"Stora refused the sign-in ({exc.code})") from None
        except StoraError as exc:
            raise ConnectError("exchange", f"Stora could not be asked ({exc.code})") from None
        if not any(site.id for site in sites):
            raise ConnectError("no_sites", "Stora lists no sites for this account")
        operator_id = self._operators.connect(tokens, [s for s in sites if s.id])
        # The exchange and the site pages went out before the operator was known: counted
        # now against its rate budget, like every later call.
        self._limiter.record(operator_id, "connect", 1 + max(1, -(-len(sites) // 100)))
        webhook = self._register_webhook(operator_id, tokens.access_token)
        return ConnectResult(operator_id, sites, webhook)

    def ensure_webhook(self, operator_id: str) -> str | None:
        """Register the operator's webhook endpoint if an earlier try failed (a periodic
        job calls this); ``None`` when it has one already."""
        if self._operators.has_webhook_secret(operator_id):
            return None
        outcome = self._tokens.call(operator_id,
                                    lambda token: self._register_webhook(operator_id, token))
        LOGGER.info("webhook endpoint of %s: %s", operator_id, outcome)
        return outcome

    def _register_webhook(self, operator_id: str, token: str) -> str:
        """Reuse the operator's endpoint (``metadata.relay`` = its key) or create one."""
        key = self._operators.webhook_key(operator_id)
        known = self._operators.get(operator_id)
        # The fixed key replays a first create whose answer was lost (its secret with it);
        # any later create (the endpoint disabled or deleted since) must be a new one.
        first = known is None or known.webhook_endpoint_id is None
        replace = False
        try:
            self._limiter.acquire(operator_id, "connect")
            for endpoint in self._stora.pages("webhook_endpoints", "webhook_endpoints", token):
                metadata = endpoint.get("metadata")
                if (isinstance(metadata, Mapping) and metadata.get("relay") == key
                        and endpoint.get("status", "enabled") == "enabled"):
                    if self._operators.has_webhook_secret(operator_id):
                        self._operators.set_webhook(operator_id, str(endpoint.get("id")), None)
                        return "reused"
                    # Ours, but its secret is lost (a restored database): Stora shows a
                    # secret only once, so this one is replaced.
                    self._limiter.acquire(operator_id, "connect")
                    self._stora.request("POST", f"webhook_endpoints/{endpoint.get('id')}/disable",
                                        token, idempotency_key=secrets.token_hex(16))
                    replace = True
            self._limiter.acquire(operator_id, "connect")
            made = self._stora.request("POST", "webhook_endpoints", token, body={
                "name": f"{self._config.relay.app_name} smart entry",
                "api_version": "2025-09", "url": self.webhook_url(key),
                "event_types": list(WEBHOOK_EVENTS), "metadata": {"relay": key},
                "description": "Unit changes for smart-entry lockout",
            # The same key replays a create whose answer was lost (its secret included) for
            # 24 h; a replacement must not replay the endpoint it replaces.
            }, idempotency_key=f"relay-webhook-{key}" if first and not replace
                else secrets.token_hex(16))
        except RelayError as exc:  # Stora's refusal, or no rate-limit slot in time
            return f"failed: {exc}"
        made_endpoint = made.get("webhook_endpoint") if isinstance(made, Mapping) else None
        if not isinstance(made_endpoint, Mapping):
            return "failed: Stora's answer held no endpoint"
        secret = made_endpoint.get("secret")
        if not isinstance(secret, str) or not secret:
            return "failed: Stora created the endpoint without its signing secret"
        self._operators.set_webhook(operator_id, str(made_endpoint.get("id")), secret)
        return "created"
