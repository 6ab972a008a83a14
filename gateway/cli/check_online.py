"""``check-config --online``: ask Stora whether the credential and the timeline source work.

A config can be valid in every key and still have every Timeline Event refused: a client
secret Stora does not know, a ``timeline_source_id`` of another operator (issue 12: such
a site passed ``check-config``, ``test --all`` and ``status`` while every event was
dead-lettered).  This module asks, once, the way the agent will ask:

``credential``
    ``client_credentials``: one token request to ``stora.token_url`` with the configured
    scope (:class:`gateway.stora.ClientCredentialsTokens`, the agent's own code).
    ``static`` / ``broker``: the token is read from ``token_file`` as the agent reads it;
    Stora (or the relay) judges it in the next check.
``source``
    ``GET {base_url}/timeline/sources`` (stora-api §3.4), page by page, until
    ``timeline_source_id`` is listed.  The endpoint needs ``public.timeline_source:read``:
    a client credential without it in ``scope`` asks for a second token that adds it,
    and when Stora will not grant it the check is *skipped*, saying why.  With
    ``auth = "broker"`` the relay only brokers event posts (contract §7.4), so this
    check asks it for nothing; it proves only that the relay answers.

Every request goes through the bounded client of :mod:`gateway.stora.http` (deadline,
capped body, no redirects followed) and Stora's rate limit.  Nothing is posted: no check
may leave an event in an operator's timeline.  Each check ends ``ok``, ``failed`` (with
exactly what is wrong: refused credential, unknown source, network) or ``skipped``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

# This module loads only for ``check-config --online`` (the command table's seam,
# gateway/cli/shell.py), so httpx is imported here at the top like everything else.
import httpx

from gateway.stora.client import make_http_client
from gateway.stora.errors import CredentialRejected, TokenUnavailable
from gateway.stora.http import DeadlineExceeded, exchange
from gateway.stora.limits import cap_text, safe_id
from gateway.stora.ratelimit import RateLimiter
from gateway.stora.tokens import ClientCredentialsTokens, FileTokens, TokenSource

if TYPE_CHECKING:
    from gateway.config import StoraConfig

__all__ = ["SOURCE_SCOPE", "Check", "check_online"]

LOGGER = logging.getLogger(__name__)

#: The scope ``GET /timeline/sources`` needs (stora-api §3.4).
SOURCE_SCOPE: Final = "public.timeline_source:read"
#: stora-api §5: at most 100 items a page.
PAGE_LIMIT: Final = 100
#: An operator has a handful of sources and Stora a few dozen global ones; 20 pages
#: (2,000 sources) bounds the requests a wrong answer could make us send.
MAX_PAGES: Final = 20
#: One page is a few KiB; more is not read (gateway/stora/http.py caps every body).
MAX_PAGE_BYTES: Final = 1 << 20
#: The whole exchange of one page, connect to last byte: a person is waiting.
PAGE_DEADLINE_S: Final = 15.0

Status = Literal["ok", "failed", "skipped"]


@dataclass(frozen=True, slots=True)
class Check:
    """The verdict of one online check and one line saying why."""

    name: str
    status: Status
    detail: str

    def as_dict(self) -> dict[str, str]:
        """JSON-ready data for ``check-config --online --json``."""
        return {"name": self.name, "status": self.status, "detail": self.detail}


def check_online(cfg: StoraConfig, *, http: httpx.Client | None = None) -> list[Check]:
    """Run the checks of the module docstring against ``[stora]``; never raises for
    network or API trouble (each becomes a ``failed`` check)."""
    client = http if http is not None else make_http_client()
    # The agent's own limits: a check run beside a running agent adds a few requests
    # to the operator's budget, never a burst.
    limiter = RateLimiter(cfg.max_per_second, cfg.max_per_minute)
    try:
        credential, tokens = _check_credential(cfg, client, limiter)
        if cfg.auth == "broker":
            return [credential, _check_relay(cfg, client)]
        if tokens is None:
            return [credential, Check("source", "skipped", "no token to ask Stora with")]
        return [credential, _check_source(cfg, client, limiter, tokens)]
    finally:
        if http is None:
            client.close()


def _check_credential(cfg: StoraConfig, client: httpx.Client,
                      limiter: RateLimiter) -> tuple[Check, TokenSource | None]:
    tokens: TokenSource
    if cfg.auth == "client_credentials":
        assert cfg.client_secret_file is not None  # the loader requires it
        tokens = ClientCredentialsTokens(
            token_url=cfg.token_url, client_id=cfg.client_id,
            secret_file=cfg.client_secret_file, scope=cfg.scope, http=client,
            limiter=limiter,
        )
    else:
        assert cfg.token_file is not None  # the loader requires it
        tokens = FileTokens(cfg.token_file, cfg.auth)
    try:
        tokens.token()
    except CredentialRejected as exc:
        return Check("credential", "failed", f"refused credential: {exc}"), None
    except TokenUnavailable as exc:
        return Check("credential", "failed", f"network or server: {exc}"), None
    if cfg.auth == "client_credentials":
        return Check("credential", "ok", f"{cfg.token_url} issued a token for client "
                                         f"{cfg.client_id!r}"), tokens
    return Check("credential", "ok", f"{cfg.auth} token read from {cfg.token_file}; "
                                     "the next check shows whether it is accepted"), tokens


def _source_tokens(cfg: StoraConfig, client: httpx.Client, limiter: RateLimiter,
                   tokens: TokenSource) -> TokenSource | Check:
    """A token that may list sources: the one given, or one asked with the scope added."""
    if cfg.auth != "client_credentials" or SOURCE_SCOPE in cfg.scope.split():
        return tokens
    assert cfg.client_secret_file is not None
    wider = ClientCredentialsTokens(
        token_url=cfg.token_url, client_id=cfg.client_id, secret_file=cfg.client_secret_file,
        scope=f"{cfg.scope} {SOURCE_SCOPE}", http=client, limiter=limiter,
    )
    try:
        wider.token()
    except CredentialRejected as exc:
        return Check("source", "skipped", f"the client may not read timeline sources "
                                          f"({SOURCE_SCOPE}: {exc}); Stora will judge "
                                          "the source at the first event")
    except TokenUnavailable as exc:
        return Check("source", "failed", f"network or server: {exc}")
    return wider


def _check_source(cfg: StoraConfig, client: httpx.Client, limiter: RateLimiter,
                  tokens: TokenSource) -> Check:
    chosen = _source_tokens(cfg, client, limiter, tokens)
    if isinstance(chosen, Check):
        return chosen
    try:
        token = chosen.token()
    except (CredentialRejected, TokenUnavailable) as exc:
        return Check("source", "failed", f"no token: {exc}")
    wanted = cfg.timeline_source_id
    seen = 0
    for page in range(1, MAX_PAGES + 1):
        if limiter.acquire(PAGE_DEADLINE_S) > 0:
            return Check("source", "failed", "Stora's rate limit is used up by the "
                                             "running agent; try again in a minute")
        outcome = _get_page(cfg, client, token, page)
        if isinstance(outcome, Check):
            return outcome
        ids, names, last = outcome
        seen += len(ids)
        if wanted in ids:
            name = names.get(wanted)
            called = f" ({name!r})" if name else ""
            return Check("source", "ok", f"{wanted}{called} is a timeline source of this "
                                         "operator")
        if last:
            return Check("source", "failed",
                         f"unknown source: Stora lists no timeline source {wanted} for this "
                         f"credential ({seen} listed); check [stora] timeline_source_id "
                         "against the one Stora gave at onboarding")
    return Check("source", "failed", f"unknown source: {wanted} is not in the first "
                                     f"{MAX_PAGES * PAGE_LIMIT} timeline sources")


def _get_page(cfg: StoraConfig, client: httpx.Client, token: str,
              page: int) -> tuple[set[str], dict[str, str], bool] | Check:
    """One page of sources: ``(ids, names, last page)``, or the failed Check."""
    url = f"{cfg.base_url}/timeline/sources?page={page}&limit={PAGE_LIMIT}"
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    try:
        answer = exchange(client, "GET", url, headers=headers, deadline_s=PAGE_DEADLINE_S,
                          limit=MAX_PAGE_BYTES)
    except DeadlineExceeded:
        return Check("source", "failed", f"network: no complete answer from {cfg.base_url} "
                                         f"within {PAGE_DEADLINE_S:g} s")
    except httpx.HTTPError as exc:
        # Only the class name: the exception holds the request, token included.
        return Check("source", "failed", f"network: cannot reach {cfg.base_url} "
                                         f"({type(exc).__name__})")
    status = answer.status
    if status == 200 and answer.unread is None:
        listed = _sources(answer.body)
        if listed is not None:
            return listed
        return Check("source", "failed", f"{url} answered 200 without a list of sources")
    reason = f"HTTP {status} {_error_text(answer.body)}".rstrip()
    if status == 401:
        return Check("source", "failed", f"refused credential: Stora answered {reason} to "
                                         f"the {cfg.auth} token")
    if status == 403:
        return Check("source", "skipped", f"the credential may not read timeline sources "
                                          f"({SOURCE_SCOPE}): {reason}; Stora will judge "
                                          "the source at the first event")
    if 300 <= status < 400:
        where = cap_text(answer.headers.get("location", "nowhere"))
        return Check("source", "failed", f"{cfg.base_url} redirects ({status} to {where}): "
                                         "check [stora] base_url")
    if status == 404:
        return Check("source", "failed", f"{cfg.base_url} has no /timeline/sources "
                                         f"({reason}): check [stora] base_url")
    return Check("source", "failed", f"Stora answered {reason}")


def _sources(body: bytes) -> tuple[set[str], dict[str, str], bool] | None:
    """Ids, names and "last page" from a list answer, or ``None`` when it is not one.

    The list's key is not documented (stora-api §5: "lists under the plural"), so the
    first list of objects with an ``id`` is taken, ``timeline_sources`` first.
    """
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    candidates = [doc.get("timeline_sources"), doc.get("sources"), *doc.values()]
    items = next((c for c in candidates if isinstance(c, list)), None)
    if items is None:
        return None
    ids: set[str] = set()
    names: dict[str, str] = {}
    for item in items:
        ident = safe_id(item.get("id")) if isinstance(item, dict) else None
        if ident is None:
            continue
        ids.add(ident)
        if isinstance(item.get("name"), str):
            names[ident] = cap_text(item["name"], 80)
    meta = doc.get("meta")
    pagination = meta.get("pagination") if isinstance(meta, dict) else None
    nxt = pagination.get("next") if isinstance(pagination, dict) else None
    return ids, names, nxt is None


def _error_text(body: bytes) -> str:
    """``code: message`` of a stora-api §6 error body, capped; ``""`` for anything else."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return ""
    err = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(err, dict):
        return ""
    return cap_text(f"{err.get('code', '')}: {err.get('message', '')}")


def _check_relay(cfg: StoraConfig, client: httpx.Client) -> Check:
    """Broker mode: whether the relay answers at all (it brokers event posts only)."""
    try:
        answer = exchange(client, "GET", cfg.base_url, headers={"Accept": "application/json"},
                          deadline_s=PAGE_DEADLINE_S, limit=MAX_PAGE_BYTES)
    except DeadlineExceeded:
        return Check("source", "failed", f"network: the relay at {cfg.base_url} gave no "
                                         f"complete answer within {PAGE_DEADLINE_S:g} s")
    except httpx.HTTPError as exc:
        return Check("source", "failed", f"network: cannot reach the relay at {cfg.base_url} "
                                         f"({type(exc).__name__})")
    return Check("source", "skipped", f"the relay at {cfg.base_url} answers (HTTP "
                                      f"{answer.status}); with auth = \"broker\" it checks "
                                      "the source when it forwards events")
