"""Alembic migrations, run from code: ``run`` applies pending ones first, ``db upgrade``
applies them as a separate step.  The scripts live in ``relay/migrations/``, shipped in
the package; no ``alembic.ini`` is needed.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from relay.db.engine import Database

__all__ = ["current_revision", "head_revision", "pending_revisions", "upgrade"]

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def head_revision() -> str:
    """The newest migration of this release."""
    head = ScriptDirectory.from_config(_config()).get_current_head()
    if head is None:  # pragma: no cover (the package ships its migrations)
        raise RuntimeError(f"no migrations in {MIGRATIONS}")
    return head


def current_revision(db: Database) -> str | None:
    """The migration the database is at (``None``: empty)."""
    with db.engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def pending_revisions(db: Database) -> list[str]:
    """The migrations not yet applied, oldest first."""
    script = ScriptDirectory.from_config(_config())
    current = current_revision(db)
    revisions = [r.revision for r in script.iterate_revisions("head", current)]
    return list(reversed(revisions))


def upgrade(db: Database) -> list[str]:
    """Apply every pending migration, each in its transaction; returns what was applied."""
    pending = pending_revisions(db)
    if pending:
        config = _config()
        with db.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    return pending
