"""``stora-relay run``: the HTTP server and the background work, in the foreground.

:func:`build` puts the relay together over one :class:`~relay.services.Services`: the
ASGI app, the MQTT link (:class:`relay.link.RelayLink`: the command outbox, results,
gateways' status) and the reconciliation jobs, the last two running for the app's
lifetime.  :func:`serve` is the command: on SQLite (the default) it first takes the
database's one-process lock (:class:`relay.db.engine.ProcessLock`), then applies pending
migrations, then serves with uvicorn until SIGINT or SIGTERM.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType

import uvicorn
from fastapi import FastAPI

from relay.app import create_app
from relay.config import RelayConfig
from relay.crypto import Keyring
from relay.db.engine import Database, ProcessLock
from relay.db.migrate import upgrade
from relay.jobs import DEFAULT_INTERVAL_S, Jobs
from relay.leases import Leases
from relay.link import LinkTimings, RelayLink
from relay.services import Services

__all__ = ["Relay", "build", "serve"]

LOGGER = logging.getLogger(__name__)


@dataclass
class Relay:
    """The relay's running parts."""

    services: Services
    link: RelayLink
    jobs: Jobs
    app: FastAPI


def build(services: Services, *, timings: LinkTimings | None = None,
          reconcile_interval_s: float = DEFAULT_INTERVAL_S) -> Relay:
    """The app, the link and the jobs over ``services`` (tests and the demo use it too)."""
    link = RelayLink(services.config.mqtt, services.db, services.sites, services.commands,
                     clock=services.clock, timings=timings)
    jobs = Jobs(services.reconciler, services.connector, Leases(services.db),
                interval_s=reconcile_interval_s)
    app = create_app(services, link, on_connected=jobs.request,
                     background=(link.run, jobs.run))
    return Relay(services, link, jobs, app)


@contextlib.contextmanager
def _stopped_cleanly() -> Iterator[list[str]]:
    """SIGTERM and SIGINT stop the server and then return here, so the clean-up below
    runs and the exit status is 0.  uvicorn stops gracefully on them and then raises the
    signal again for whatever handler was there before: this one only records it."""
    stopped: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield stopped
        return

    def remember(signum: int, _frame: FrameType | None) -> None:
        stopped.append(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, remember) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stopped
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve(config: RelayConfig, keyring: Keyring) -> int:
    """Serve until stopped; returns the exit status."""
    db = Database(config.database.url)
    lock = ProcessLock(db.path) if db.path is not None else None
    if lock is not None:
        lock.acquire()
    try:
        applied = upgrade(db)
        if applied:
            LOGGER.info("database migrated: %s", ", ".join(applied))
        services = Services.build(config, keyring, db=db)
        try:
            relay = build(services)
            server = uvicorn.Server(uvicorn.Config(
                relay.app, host=config.relay.listen_host, port=config.relay.listen_port,
                log_level="info", access_log=False, proxy_headers=True, server_header=False,
                lifespan="on"))
            LOGGER.info("stora-relay listening on %s:%d (public URL %s)",
                        config.relay.listen_host, config.relay.listen_port,
                        config.relay.public_url)
            with _stopped_cleanly() as stopped:
                server.run()
            LOGGER.info("stora-relay stopped (%s)", ", ".join(stopped) or "server exit")
        finally:
            services.close()
    finally:
        if lock is not None:
            lock.release()
    return 0
