"""The agent's state database when the disk misbehaves, and its upkeep.

Opening it so that a broken disk is never a crash loop (fault matrix #23-25), the
rate-limited storage alarm when a write fails while running, and the ``store.prune``
job.  See docs/design/agent.md.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from gateway.clock import TrustedClock
from gateway.config import CommandsConfig
from gateway.store import (
    COMMAND_KEEP_MIN_S,
    DEAD_KEEP_S,
    DELIVERED_KEEP_S,
    Store,
    StoreCorrupt,
    StoreError,
    StoreFull,
    StoreReadOnly,
    command_dedupe_s,
)

__all__ = ["PRUNE_BATCH", "STORAGE_ALARM_INTERVAL_S", "Alarm", "PendingAlarm",
           "StorageAlarm", "open_store", "prune_store"]

LOGGER = logging.getLogger(__name__)

#: Rows deleted per transaction by the prune job: the first run after an upgrade may
#: find months of history, and a command waits for the store's lock meanwhile.
PRUNE_BATCH: Final = 2000
#: A storage alarm of one kind (disk full, read-only) at most this often.
STORAGE_ALARM_INTERVAL_S = 60.0

#: An alarm to publish: ``(kind, unit, detail)``.
PendingAlarm = tuple[str, str | None, str]
#: Publishes an alarm (the agent's ``alarm``).
Alarm = Callable[[str, str | None, str], None]


def open_store(path: Path, pending_alarms: list[PendingAlarm]) -> Store:
    """The state database; never a crash loop over a broken disk (fault matrix #23-25).

    A corrupt file is moved aside (the alarm says how many undelivered events it
    held) and a fresh one started.  A file or directory that cannot be written
    (read-only filesystem, full disk, a corrupt file that cannot be moved) gives an
    in-memory database instead, with an alarm: locks keep working, and nothing is
    kept across a restart until the storage is fixed.  Anything else (a schema
    newer than this version) stops the start with a clear error.  The alarms are
    appended to ``pending_alarms``, published once the broker is connected.
    """
    def ephemeral(why: str) -> Store:
        detail = (f"{why}; running on a temporary in-memory database: commands and "
                  "Timeline Events are NOT kept across a restart until the storage "
                  "is fixed")
        LOGGER.error("%s", detail)
        pending_alarms.append(("storage_unavailable", None, detail))
        return Store(path, ephemeral=True)

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return ephemeral(f"cannot create {path.parent}: {exc.strerror or exc}")
    try:
        return Store(path)
    except StoreCorrupt as exc:
        # What was lost, counted before the move (best effort, read-only): the
        # alarm must tell staff how many actions Stora will never hear about.
        lost = Store.count_pending(path)
        lost_text = "an unknown number of" if lost is None else str(lost)
        try:
            moved = Store.quarantine(path)
            store = Store(path)
        except StoreError as again:
            return ephemeral(f"{exc}; {lost_text} undelivered Timeline Event(s) in it; "
                             f"it cannot be replaced: {again}")
        detail = (f"{exc}; moved to {moved}; {lost_text} undelivered Timeline Event(s) "
                  "lost with it; starting with an empty database")
        LOGGER.error("%s", detail)  # noqa: TRY400 - no traceback wanted
        pending_alarms.append(("storage_corrupt", None, detail))
        return store
    except (StoreReadOnly, StoreFull) as exc:
        return ephemeral(str(exc))


class StorageAlarm:
    """The store's ``on_write_failed`` hook: a clear alarm, rate limited.

    Lock control goes on (units drive the hardware outside transactions, and a
    relock or lockout is driven even when its record cannot be written); what is
    refused is the record, and Timeline Events refused are counted and reported.
    """

    def __init__(self, store: Store, alarm: Alarm) -> None:
        self._store = store
        self._alarm = alarm
        self._alarmed_at: dict[str, float] = {}

    def __call__(self, exc: Exception, refused: int) -> None:
        """A transaction failed (disk full, read-only, …) refusing ``refused`` events."""
        try:
            kind = {"StoreFull": "storage_full", "StoreReadOnly": "storage_read_only",
                    "StoreBusy": "storage_busy"}.get(type(exc).__name__, "storage")
            now = time.monotonic()
            if now - self._alarmed_at.get(kind, -math.inf) < STORAGE_ALARM_INTERVAL_S:
                return
            self._alarmed_at[kind] = now
            # The counts first: the alarm's detail is capped, the store's message is long.
            self._alarm(kind, None,
                        f"{self._store.events_refused} Timeline Event(s) refused so far "
                        f"({refused} just now); lock control continues; {exc}")
        except Exception:  # the hook must never turn a storage failure into a crash
            LOGGER.exception("raising the storage alarm failed")


def prune_store(store: Store, clock: TrustedClock, commands: CommandsConfig,
                stopping: threading.Event) -> dict[str, int] | None:
    """Delete what no guarantee needs any more (the ``store.prune`` job); how many
    rows went, or ``None`` when skipped because the wall clock is not trusted.

    Times are measured from the trusted-time floor, not the wall clock: a command's
    ``jti`` goes only once it arrived :func:`~gateway.store.command_dedupe_s` before
    the floor, so no clock the agent can trust would take a replay of it as fresh,
    and a forged step forward (which the floor does not follow) deletes nothing
    early.  Found in review: measured from the wall clock, a trusted forward step
    deleted ids that dedupe still needed.
    """
    if not clock.trusted()[0]:
        return None
    base = min(clock.now(), clock.floor)
    gone = {"commands": 0, "delivered": 0, "dead": 0}
    while True:  # in batches: commands wait for the store's lock meanwhile
        with store.transaction() as tx:
            batch: dict[str, int] = tx.prune(
                commands_before=min(base - COMMAND_KEEP_MIN_S, base - command_dedupe_s(
                    commands.max_lifetime_s, commands.clock_skew_s)),
                delivered_before=base - DELIVERED_KEEP_S, dead_before=base - DEAD_KEEP_S,
                limit=PRUNE_BATCH)
        for key, count in batch.items():
            gone[key] += count
        if max(batch.values()) < PRUNE_BATCH or stopping.is_set():
            break
    if any(gone.values()):
        LOGGER.info("database pruned: %d ended commands, %d delivered and %d dead "
                    "Timeline Events", gone["commands"], gone["delivered"], gone["dead"])
    return gone
