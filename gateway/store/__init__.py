"""The agent's durable state: one SQLite file (``[storage] path``).

``faults``       the :class:`StoreError` tree; sqlite3 errors translated in one place
``schema``       :data:`MIGRATIONS`, :func:`migrate`, command statuses, retention times
``rows``         :class:`CommandRow` (the inbox), :class:`UnitRow`, :class:`EventRow` (the outbox)
``transaction``  :class:`Transaction`: what one open transaction can do
``database``     the connection: open and check, the lock, transactions, recovery
``store``        :class:`Store`: the reads and single writes everyone else uses

This module is the package's interface: import from ``gateway.store``.
See docs/design/store-durability.md.
"""

from gateway.store.database import BUSY_TIMEOUT_S
from gateway.store.faults import (
    StoreBusy,
    StoreCorrupt,
    StoreError,
    StoreFull,
    StoreReadOnly,
)
from gateway.store.rows import CommandRow, EventRow, UnitRow
from gateway.store.schema import (
    COMMAND_KEEP_MIN_S,
    COMMAND_STATUSES,
    DEAD_KEEP_S,
    DELIVERED_KEEP_S,
    EVENT_STATES,
    MIGRATIONS,
    SEND_HISTORY_KEEP_S,
    Migration,
    command_dedupe_s,
    migrate,
)
from gateway.store.store import Store
from gateway.store.transaction import Transaction

__all__ = [
    "BUSY_TIMEOUT_S",
    "COMMAND_KEEP_MIN_S",
    "COMMAND_STATUSES",
    "DEAD_KEEP_S",
    "DELIVERED_KEEP_S",
    "EVENT_STATES",
    "MIGRATIONS",
    "SEND_HISTORY_KEEP_S",
    "CommandRow",
    "EventRow",
    "Migration",
    "Store",
    "StoreBusy",
    "StoreCorrupt",
    "StoreError",
    "StoreFull",
    "StoreReadOnly",
    "Transaction",
    "UnitRow",
    "command_dedupe_s",
    "migrate",
]
