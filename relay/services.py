"""What the relay's routes and jobs work with, built once from the config."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from relay.apikeys import ApiKeys
from relay.broker import TimelineBroker
from relay.commands import Commands
from relay.config import RelayConfig
from relay.connect import Connector
from relay.crypto import Keyring
from relay.db.engine import Database
from relay.keys import SigningKeys
from relay.operators import Operators
from relay.ratelimit import RateLimiter
from relay.reconcile import Reconciler
from relay.sites import SiteRegistry
from relay.stora import StoraApi
from relay.tokens import Tokens
from relay.unlock import UnlockService
from relay.webhooks import WebhookIntake

__all__ = ["Services"]


@dataclass
class Services:
    """The relay's parts over one database."""

    config: RelayConfig
    db: Database
    keyring: Keyring
    stora: StoraApi
    operators: Operators
    sites: SiteRegistry
    api_keys: ApiKeys
    signing_keys: SigningKeys
    connector: Connector
    commands: Commands
    webhooks: WebhookIntake
    unlock: UnlockService
    limiter: RateLimiter
    tokens: Tokens
    broker: TimelineBroker
    reconciler: Reconciler
    clock: Callable[[], float]

    @classmethod
    def build(cls, config: RelayConfig, keyring: Keyring, *, db: Database | None = None,
              transport: httpx.BaseTransport | None = None,
              clock: Callable[[], float] = time.time) -> Services:
        """Everything over ``config``'s database (or ``db``)."""
        db = db or Database(config.database.url)
        stora = StoraApi(config.stora, transport=transport)
        operators = Operators(db, keyring, clock=clock)
        signing_keys = SigningKeys(db, keyring, clock=clock)
        commands = Commands(signing_keys, clock=clock)
        api_keys = ApiKeys(db, clock=clock)
        sites = SiteRegistry(db, clock=clock)
        limiter = RateLimiter(db, max_per_second=config.stora.max_per_second,
                              max_per_minute=config.stora.max_per_minute)
        tokens = Tokens(db, keyring, stora, limiter, clock=clock)
        return cls(
            config=config, db=db, keyring=keyring, stora=stora, operators=operators,
            sites=sites, api_keys=api_keys, signing_keys=signing_keys,
            connector=Connector(config, db, keyring, stora, operators, limiter=limiter,
                                tokens=tokens, clock=clock),
            commands=commands,
            webhooks=WebhookIntake(db, keyring, commands,
                                   tolerance_s=config.stora.webhook_tolerance_s, clock=clock),
            unlock=UnlockService(db, api_keys, commands, clock=clock),
            limiter=limiter, tokens=tokens,
            broker=TimelineBroker(sites, tokens, limiter, stora),
            reconciler=Reconciler(db, stora, tokens, commands, limiter=limiter, clock=clock),
            clock=clock)

    def close(self) -> None:
        """Close the HTTP client and the database pool."""
        self.stora.close()
        self.db.close()
