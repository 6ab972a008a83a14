"""``stora-relay run``: the HTTP server and the background work, in the foreground.

On SQLite (the default) the process first takes the database's one-process lock
(:class:`relay.db.engine.ProcessLock`), then applies pending migrations, then serves
with uvicorn until SIGINT or SIGTERM.
"""

from __future__ import annotations

import logging

import uvicorn

from relay.app import create_app
from relay.config import RelayConfig
from relay.crypto import Keyring
from relay.db.engine import Database, ProcessLock
from relay.db.migrate import upgrade
from relay.services import Services

__all__ = ["serve"]

LOGGER = logging.getLogger(__name__)


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
            server = uvicorn.Server(uvicorn.Config(
                create_app(services), host=config.relay.listen_host,
                port=config.relay.listen_port, log_level="info", access_log=False,
                proxy_headers=True, server_header=False, lifespan="on"))
            LOGGER.info("stora-relay listening on %s:%d (public URL %s)",
                        config.relay.listen_host, config.relay.listen_port,
                        config.relay.public_url)
            server.run()
        finally:
            services.close()
    finally:
        if lock is not None:
            lock.release()
    return 0
