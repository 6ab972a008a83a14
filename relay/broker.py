"""The Timeline broker (contract §7.4): gateways post Timeline Events through the relay.

A gateway configured ``[stora] auth = "broker"`` posts to ``public_url`` +
``/stora/2025-09/timeline/events`` with ``Authorization: Bearer <site credential>``
(gateway/stora/client.py, unchanged).  The relay checks the credential and that
``site.id`` in the body is the credential's site, then forwards the body's bytes as they
came to Stora's ``POST timeline/events`` with the operator's access token and the
**same** ``Idempotency-Key``, and answers with Stora's status, body and ``Content-Type``,
``RateLimit-*`` and ``Retry-After`` headers.

What the relay answers itself, and how the gateway reads it (its ``_classify``: a 5xx
with a stora-api §6 error body means "Stora's app failed, nothing was created: next key";
a 5xx without one means "maybe created: same key"):

======  ==============================  =============================================
status  when                            the gateway
======  ==============================  =============================================
401     bad, unknown or revoked         renews its credential file once, then stops
        credential                      posting and alarms
400     no or bad ``Idempotency-Key``,  dead-letters the event (never happens: it
        a body that is not a JSON       always sends both)
        object
403     ``site.id`` is not the          keeps the event, pauses delivery and alarms
        credential's site               ("paused: config": a misconfigured gateway,
                                        every event would be refused)
413     body over 64 KiB                dead-letters it
429     the operator's budget is spent  waits ``Retry-After`` / ``RateLimit-Reset``,
        (relay/ratelimit.py): nothing   same key
        sent to Stora
503     ``reauth_required`` or not      retries later under a new key: nothing was
        connected, no valid token, or   sent, or Stora answered 401 twice (a 401 is
        Stora's 401 after a reload      never processed, and Stora may keep the 401
                                        under the key, so only a new key can succeed)
502     Stora unreachable, or its       retries later under the **same** key: Stora
        answer unusable                 may have processed it.  So this body is
                                        deliberately *not* a §6 error
======  ==============================  =============================================
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from relay.http import read_capped
from relay.ratelimit import TIMELINE_PURPOSE, RateLimitedError, RateLimiter, retry_after
from relay.sites import SiteRegistry
from relay.stora import Forwarded, StoraApi, StoraError
from relay.tokens import (
    NotConnectedError,
    ReauthRequiredError,
    Tokens,
    TokenUnavailableError,
)
from sitelink.errors import ClaimError
from sitelink.jws import strict_json

__all__ = ["BROKER_PATH", "MAX_BODY_BYTES", "BrokerAnswer", "TimelineBroker", "broker_routes"]

LOGGER = logging.getLogger(__name__)

#: Where gateways post (their ``base_url`` is ``public_url`` + ``/stora/2025-09``).
BROKER_PATH: Final = "/stora/2025-09/timeline/events"
#: A Timeline Event is a few hundred bytes; contract §7.4 caps the body at 64 KiB.
MAX_BODY_BYTES: Final = 64 * 1024
#: An ``Idempotency-Key`` is printable ASCII without spaces, at most this long (the
#: gateway's are ``<external id>.<generation>``, far shorter).
MAX_KEY_CHARS: Final = 255
#: ``Retry-After`` of the relay's own 5xx answers: Stora unreachable, no token yet, and
#: an operator who must reconnect (a person has to act: no point asking sooner).
UNREACHABLE_RETRY_S: Final = 5
TOKEN_RETRY_S: Final = 5
REAUTH_RETRY_S: Final = 300
#: Headers of Stora's answer passed on to the gateway (besides ``RateLimit-*``).
_PASSED: Final = frozenset({"content-type", "retry-after"})
_JSON: Final = "application/json"


@dataclass(frozen=True)
class BrokerAnswer:
    """What the route answers: status, body bytes, headers."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


def _error(status: int, code: str, message: str, **headers: str) -> BrokerAnswer:
    """A JSON error as contract §7.2 (``{"error": {"code", "message"}}``)."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    return BrokerAnswer(status, body, {"Content-Type": _JSON, **headers})


def _unanswered(message: str) -> BrokerAnswer:
    """502 whose body is not a stora-api §6 error: the gateway keeps its key."""
    body = json.dumps({"relay_error": {"code": "stora_unreachable", "message": message}})
    return BrokerAnswer(502, body.encode(), {"Content-Type": _JSON,
                                             "Retry-After": str(UNREACHABLE_RETRY_S)})


def _passed_on(answer: Forwarded) -> BrokerAnswer:
    headers = {k: v for k, v in answer.headers.items()
               if k.lower() in _PASSED or k.lower().startswith("ratelimit-")}
    return BrokerAnswer(answer.status, answer.body, headers)


def _key_ok(key: str) -> bool:
    return 0 < len(key) <= MAX_KEY_CHARS and all(33 <= ord(c) < 127 for c in key)


class _UnauthorizedError(StoraError):
    """Stora answered 401 to a forward (for :meth:`relay.tokens.Tokens.call`)."""

    def __init__(self) -> None:
        super().__init__(401, "invalid_token", "Stora refused the operator's access token")


class TimelineBroker:
    """Checks a gateway's Timeline Event and forwards it under the operator's budget."""

    def __init__(self, sites: SiteRegistry, tokens: Tokens, limiter: RateLimiter,
                 stora: StoraApi) -> None:
        self._sites = sites
        self._tokens = tokens
        self._limiter = limiter
        self._stora = stora

    def post(self, authorization: str, idempotency_key: str | None,
             body: bytes) -> BrokerAnswer:
        """Answer one gateway's ``POST timeline/events`` (blocking: run it in a thread)."""
        scheme, _, credential = authorization.partition(" ")
        site = (self._sites.authenticate(credential.strip())
                if scheme.lower() == "bearer" and credential.strip() else None)
        if site is None:
            return _error(401, "invalid_token", "the site credential is missing, unknown "
                          "or revoked", **{"WWW-Authenticate": 'Bearer error="invalid_token"'})
        if idempotency_key is None or not _key_ok(idempotency_key):
            return _error(400, "invalid_request", "an Idempotency-Key header (printable, "
                          f"at most {MAX_KEY_CHARS} characters) is required")
        try:
            # Duplicate keys refused: the site checked must be the one Stora reads.
            doc = strict_json(body)
        except ClaimError:
            doc = None
        if not isinstance(doc, Mapping):
            return _error(400, "invalid_request", "the body must be a JSON object (no "
                          "duplicate keys)")
        given = doc.get("site")
        given_id = given.get("id") if isinstance(given, Mapping) else None
        if given_id != site.site_id:
            return _error(403, "forbidden", "site.id must be the site of this credential "
                          f"({site.site_id})")
        return self._forward(site.operator_id, site.site_id, idempotency_key, body)

    def _forward(self, operator_id: str, site_id: str, key: str, body: bytes) -> BrokerAnswer:
        def send(token: str) -> Forwarded:
            self._limiter.take(operator_id, TIMELINE_PURPOSE)
            answer = self._stora.forward("POST", "timeline/events", token, body,
                                         idempotency_key=key)
            if answer.status == 401:
                raise _UnauthorizedError
            return answer

        try:
            answer = self._tokens.call(operator_id, send)
        except RateLimitedError as exc:
            return _error(429, "too_many_requests", "this operator's Stora rate limit is "
                          "used up; retry after Retry-After",
                          **{"Retry-After": str(retry_after(exc.wait_s)),
                             "RateLimit-Limit": str(exc.limit),
                             "RateLimit-Reset": str(math.ceil(exc.reset_at))})
        except ReauthRequiredError:
            return _error(503, "reauth_required", "the operator must connect Stora again; "
                          "keep the event", **{"Retry-After": str(REAUTH_RETRY_S)})
        except NotConnectedError:
            return _error(503, "operator_not_connected", "the site's operator is not "
                          "connected to Stora; keep the event",
                          **{"Retry-After": str(REAUTH_RETRY_S)})
        except TokenUnavailableError as exc:
            LOGGER.warning("site %s: not forwarded: %s", site_id, exc)
            return _error(503, "token_unavailable", "no Stora token for now; retry later",
                          **{"Retry-After": str(max(TOKEN_RETRY_S,
                                                    math.ceil(exc.retry_after_s)))})
        except _UnauthorizedError:
            LOGGER.warning("site %s: Stora answered 401 twice, the second time to a "
                           "renewed token", site_id)
            return _error(503, "stora_unauthorized", "Stora refused the operator's token; "
                          "retry later", **{"Retry-After": str(TOKEN_RETRY_S)})
        except StoraError as exc:
            LOGGER.warning("site %s: Timeline Event unanswered: %s", site_id, exc)
            return _unanswered("Stora could not be reached or its answer was unusable; "
                               "retry with the same Idempotency-Key")
        return _passed_on(answer)


def broker_routes(broker: TimelineBroker) -> APIRouter:
    """The broker's route (``app.include_router(broker_routes(services.broker))``)."""
    router = APIRouter()

    @router.post(BROKER_PATH)
    async def timeline_event(request: Request) -> Response:
        body = await read_capped(request, MAX_BODY_BYTES)
        if body is None:
            answer = _error(413, "too_large", f"a Timeline Event is at most {MAX_BODY_BYTES} "
                            "bytes")
        else:
            answer = await run_in_threadpool(broker.post,
                                             request.headers.get("authorization", ""),
                                             request.headers.get("idempotency-key"), body)
        return Response(answer.body, status_code=answer.status, headers=answer.headers)

    return router
