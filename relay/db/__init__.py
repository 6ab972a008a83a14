"""The relay's database: models, engine and migrations (SQLite default, PostgreSQL).

Import from the modules: ``relay.db.models`` (tables), ``relay.db.engine`` (engine,
sessions, the one-process lock of SQLite), ``relay.db.migrate`` (Alembic).
"""
