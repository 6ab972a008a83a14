"""The command outbox in the database: what to publish, what expired, what to send again.

Rows of ``commands`` are written by other code in the same transaction as their cause
(a webhook's lockout, an unlock call) with ``published_at`` NULL.  The MQTT link
(:mod:`relay.link`) asks this module what to do: the functions here are synchronous and
take a :class:`~sqlalchemy.orm.Session`; :class:`Outbox` runs each step the link needs
in a short transaction of its own, in one of the link's worker threads.
:class:`Waiters` holds the futures of callers awaiting a command's result.

``published_at`` is the time of the **last** publish the broker acknowledged.  A row
is due when it is ``pending``, not expired, and either never published or published
longer ago than the re-publish gap: the same token again (same ``jti``: the gateway
runs it at most once and answers a copy with the first result, ``duplicate: true``),
so a command lost by a broker restart, or queued for a gateway that lost its session,
still arrives before ``exp``.  Re-publishing pauses for a site whose retained status
says offline; its rows go out again when it comes back.

Lockout and clear are intents per unit (:class:`~relay.db.models.UnitState`): see
:func:`resend_intents` for when a new command (new ``jti``, same ``ver``) is made.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import threading
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import ColumnElement, and_, func, or_, select, update
from sqlalchemy.orm import Session

from relay.commands import RESULT_STATUSES, Commands, apply_result
from relay.db.engine import Database
from relay.db.models import Command, Site, UnitState
from relay.metrics import command_result
from sitelink.codes import Cmd

__all__ = [
    "INTENT_COMMANDS",
    "Due",
    "Outbox",
    "ResendPolicy",
    "Waiters",
    "claim_commands",
    "due_commands",
    "expire_commands",
    "finished",
    "mark_published",
    "offline_sites",
    "record_result",
    "release_claims",
    "resend_intents",
]

LOGGER = logging.getLogger(__name__)
PENDING: Final = "pending"
TIMEOUT: Final = "timeout"
INTENT_COMMANDS: Final = (Cmd.LOCKOUT.value, Cmd.CLEAR_LOCKOUT.value)
#: Answers that do not confirm a lockout's ``ver`` (a ``done`` or ``stale_version``
#: does): each one doubles the wait before the next new command for that ``ver``.
_REFUSED: Final = frozenset({"rejected", "failed", "unknown"})


@dataclass(frozen=True, slots=True)
class Due:
    """A command to publish: its topic's site and the token bytes."""

    jti: str
    site_id: str
    token: bytes
    republish: bool


@dataclass(frozen=True, slots=True)
class ResendPolicy:
    """When a lockout or clear that the gateway refused is made again.

    A command that simply got no answer by ``exp`` is followed at once (its lifetime,
    300 s, already paced it).  One the gateway answered without confirming (``failed``
    ``hardware_error``, ``rejected`` ``clock_untrusted``, …) waits ``first_s``, doubled
    for each such answer to that ``ver``, at most ``cap_s``: a gateway that keeps
    refusing is asked again, but not in a tight loop.
    """

    first_s: float = 30.0
    cap_s: float = 3600.0

    def wait(self, refusals: int) -> float:
        """Seconds between the newest command and the next one, after ``refusals``."""
        if refusals <= 0:
            return 0.0
        return min(self.cap_s, self.first_s * 2.0 ** min(refusals - 1, 30))


def offline_sites(session: Session) -> set[str]:
    """The live sites whose gateway's retained status says ``"online": false``."""
    rows = session.execute(select(Site.site_id, Site.status_json).where(
        Site.revoked_at.is_(None), Site.status_json.is_not(None))).all()
    offline = set()
    for site_id, text in rows:
        if not text:
            continue
        try:
            status = json.loads(text)
        except ValueError:
            continue
        if isinstance(status, dict) and status.get("online") is False:
            offline.add(site_id)
    return offline


def expire_commands(session: Session, now: float) -> list[str]:
    """Mark ``timeout`` every pending command past its ``exp``; their jtis.

    Nothing publishes an expired command (the gateway would refuse it ``expired``); a
    result that comes later still updates the record (contract §7.2).
    """
    rows = session.execute(update(Command).where(
        Command.status == PENDING, Command.expires_at <= now).values(
            status=TIMEOUT, reason=TIMEOUT, result_at=now)
        .returning(Command.jti, Command.cmd)).all()
    for _, cmd in rows:
        command_result(cmd, TIMEOUT, TIMEOUT)
    return [str(jti) for jti, _ in rows]


def _due_clause(now: float, *, republish_before: float, offline: Collection[str] = (),
                kicked: Collection[str] = ()) -> ColumnElement[bool]:
    again = Command.published_at <= republish_before
    if offline:
        again = again & Command.site_id.not_in(list(offline))
    wanted = [Command.published_at.is_(None), again]
    if kicked:
        wanted.append(Command.site_id.in_(list(kicked)))
    return and_(Command.status == PENDING, Command.expires_at > now,
                Command.token.is_not(None), or_(*wanted))


def _unclaimed(now: float, replica: str | None) -> ColumnElement[bool]:
    free = or_(Command.publish_claim_until.is_(None), Command.publish_claim_until <= now)
    return free if replica is None else or_(free, Command.publish_claimed_by == replica)


def due_commands(session: Session, now: float, *, republish_before: float,
                 offline: Collection[str] = (), kicked: Collection[str] = (),
                 limit: int = 500, replica: str | None = None) -> list[Due]:
    """Pending, unexpired commands to publish now, oldest first.

    Never published: always.  Published before ``republish_before``: again, unless the
    site is in ``offline``.  Of a site in ``kicked`` (it just came online): every one.
    None that another replica has claimed (:func:`claim_commands`) until its claim ends.
    """
    rows = session.execute(
        select(Command.jti, Command.site_id, Command.token, Command.published_at)
        .where(_due_clause(now, republish_before=republish_before, offline=offline,
                           kicked=kicked), _unclaimed(now, replica))
        .order_by(Command.created_at).limit(limit)).all()
    return [Due(jti, site, token.encode("ascii"), published is not None)
            for jti, site, token, published in rows if token]


def claim_commands(session: Session, jtis: Collection[str], now: float, *, replica: str,
                   claim_s: float, republish_before: float, offline: Collection[str] = (),
                   kicked: Collection[str] = ()) -> set[str]:
    """Claim for ``replica`` those of ``jtis`` that are still due and unclaimed, for
    ``claim_s`` seconds: the ones it may publish now.

    One conditional ``UPDATE``: on PostgreSQL a second replica claiming the same row
    waits for the first one's transaction, then finds the row claimed (or published
    since) and leaves it.  The acknowledged publish ends the claim
    (:func:`mark_published`: from then on ``published_at`` keeps the row from being due
    until its re-publish); a failed one gives it back (:func:`release_claims`); a replica
    killed in between leaves it to end by itself."""
    if not jtis:
        return set()
    claimed = session.scalars(
        update(Command).where(
            Command.jti.in_(list(jtis)),
            _due_clause(now, republish_before=republish_before, offline=offline,
                        kicked=kicked), _unclaimed(now, replica))
        .values(publish_claimed_by=replica, publish_claim_until=now + claim_s)
        .returning(Command.jti)).all()
    return set(claimed)


def release_claims(session: Session, jtis: Collection[str], replica: str) -> None:
    """Give back ``replica``'s claims of ``jtis`` (their publish failed): any replica may
    publish them at once."""
    if jtis:
        session.execute(update(Command).where(
            Command.jti.in_(list(jtis)), Command.publish_claimed_by == replica)
            .values(publish_claimed_by=None, publish_claim_until=None))


def mark_published(session: Session, jtis: Iterable[str], now: float) -> None:
    """The broker acknowledged these (PUBACK): the time of their last publish; their
    publish claims end."""
    batch = list(jtis)
    if batch:
        session.execute(update(Command).where(Command.jti.in_(batch))
                        .values(published_at=now, publish_claimed_by=None,
                                publish_claim_until=None))


def record_result(session: Session, site_id: str, payload: Mapping[str, Any],
                  now: float) -> Command | None:
    """Apply a gateway's result (:func:`relay.commands.apply_result`).

    A copy (``duplicate: true``) of a result the record already holds changes nothing:
    it is the gateway's answer to our own re-publish of the same token, and the record
    keeps the first answer.  A copy that finds no answer yet (the first was lost, or
    came after ``timeout``) is taken: it carries the original outcome.
    """
    jti = payload.get("jti")
    if payload.get("duplicate") is True and isinstance(jti, str):
        row = session.get(Command, jti)
        if row is not None and row.site_id == site_id and row.status in RESULT_STATUSES:
            return row
    return apply_result(session, site_id, payload, now)


def finished(session: Session, jtis: Collection[str]) -> dict[str, str]:
    """The status of each of ``jtis`` that is no longer ``pending``."""
    if not jtis:
        return {}
    rows = session.execute(select(Command.jti, Command.status).where(
        Command.jti.in_(list(jtis)), Command.status != PENDING)).all()
    return {str(jti): str(status) for jti, status in rows}


@dataclass(frozen=True, slots=True)
class _Intent:
    operator_id: str
    unit_id: str
    site_id: str
    cmd: Cmd
    ver: int


def _intents(session: Session) -> list[_Intent]:
    """Units of live sites (of the same operator) whose lockout or clear is unconfirmed."""
    live = (Site.site_id == UnitState.site_id) & Site.revoked_at.is_(None) \
        & (Site.operator_id == UnitState.operator_id)
    confirmed = func.coalesce(UnitState.confirmed_ver, 0)
    found = [_Intent(u.operator_id, u.unit_id, u.site_id, Cmd.LOCKOUT, u.ver)
             for u in session.scalars(select(UnitState).join(Site, live).where(
                 UnitState.lockout.is_(True), confirmed < UnitState.ver)).all()]
    # A clear: the newest clear_lockout sent for the unit (later events that changed no
    # lockout raise UnitState.ver without a command, and are not the gateway's to confirm).
    newest_clear = (select(Command.operator_id, Command.unit_id,
                           func.max(Command.ver).label("ver"))
                    .where(Command.cmd == Cmd.CLEAR_LOCKOUT.value)
                    .group_by(Command.operator_id, Command.unit_id).subquery())
    rows = session.execute(
        select(UnitState, newest_clear.c.ver)
        .join(newest_clear, (newest_clear.c.operator_id == UnitState.operator_id)
              & (newest_clear.c.unit_id == UnitState.unit_id))
        .join(Site, live)
        .where(UnitState.lockout.is_(False), confirmed < newest_clear.c.ver)).all()
    found += [_Intent(u.operator_id, u.unit_id, u.site_id, Cmd.CLEAR_LOCKOUT, int(ver))
              for u, ver in rows]
    # A clear no command was made for (its site was revoked or not yet registered when
    # the lockout ended): the gateway's last word from us is a lockout.
    newest_at = (select(Command.operator_id, Command.unit_id,
                        func.max(Command.created_at).label("at"))
                 .where(Command.cmd.in_(INTENT_COMMANDS))
                 .group_by(Command.operator_id, Command.unit_id).subquery())
    last_lockout = (select(Command.operator_id, Command.unit_id)
                    .join(newest_at, (newest_at.c.operator_id == Command.operator_id)
                          & (newest_at.c.unit_id == Command.unit_id)
                          & (newest_at.c.at == Command.created_at))
                    .where(Command.cmd == Cmd.LOCKOUT.value).subquery())
    found += [_Intent(u.operator_id, u.unit_id, u.site_id, Cmd.CLEAR_LOCKOUT, u.ver)
              for u in session.scalars(
                  select(UnitState)
                  .join(last_lockout, (last_lockout.c.operator_id == UnitState.operator_id)
                        & (last_lockout.c.unit_id == UnitState.unit_id))
                  .join(Site, live).where(UnitState.lockout.is_(False))).all()]
    return found


def _still_wanted(state: UnitState | None, intent: _Intent) -> bool:
    """Whether the unit, as committed now, still wants ``intent``: not yet confirmed,
    and (a lockout) still locked out at that ``ver``, or (a clear) no longer locked out."""
    if state is None or (state.confirmed_ver or 0) >= intent.ver:
        return False
    if intent.cmd is Cmd.LOCKOUT:
        return state.lockout and state.ver == intent.ver
    return not state.lockout


def _due_again(session: Session, intent: _Intent, now: float,
               policy: ResendPolicy) -> bool:
    """No command of this unit's lockout is in flight, and the refusals' wait is over."""
    sent = session.execute(
        select(Command.status, Command.ver, Command.created_at, Command.expires_at)
        .where(Command.operator_id == intent.operator_id,
               Command.unit_id == intent.unit_id, Command.cmd.in_(INTENT_COMMANDS))
        .order_by(Command.created_at.desc()).limit(50)).all()
    if any(status == PENDING and expires > now for status, _, _, expires in sent):
        return False
    same = [(status, created) for status, ver, created, _ in sent if ver == intent.ver]
    refusals = sum(1 for status, _ in same if status in _REFUSED)
    newest = max((created for _, created in same), default=None)
    return newest is None or now >= newest + policy.wait(refusals)


def resend_intents(session: Session, commands: Commands, now: float, *,
                   offline: Collection[str] = (),
                   policy: ResendPolicy | None = None, limit: int = 100) -> list[Command]:
    """New commands (new ``jti``, same ``ver``) for lockouts and clears left unconfirmed.

    A unit qualifies when its site is registered, live and the same operator's, the
    gateway has not confirmed the ``ver`` (``done`` or ``stale_version``), no lockout or
    clear of it is pending and unexpired, and (:class:`ResendPolicy`) the gateway's
    refusals' wait is over.  A site whose retained status says offline is left until it
    comes back (the link then looks at once).  A lockout of a unit whose site was
    registered only after the webhook is sent here too: the intent is the relay's.
    An unlock is never made again: only lockout and clear are intents.
    """
    policy = policy or ResendPolicy()
    made: list[Command] = []
    for intent in _intents(session):
        if len(made) >= limit:
            break
        if intent.site_id in offline:
            continue
        # Row lock on PostgreSQL (a no-op on SQLite, whose BEGIN IMMEDIATE serialises
        # writers): a second replica's scan waits here, then sees this command pending.
        # The unit is read again under the lock: under READ COMMITTED, the scan above may
        # predate a result or a webhook another replica committed since.
        state = session.get(UnitState, (intent.operator_id, intent.unit_id),
                            with_for_update=True, populate_existing=True)
        if not _still_wanted(state, intent) or not _due_again(session, intent, now, policy):
            continue
        row = commands.new(session, operator_id=intent.operator_id, site_id=intent.site_id,
                           unit_id=intent.unit_id, cmd=intent.cmd, origin="resend",
                           ver=intent.ver)
        session.flush()
        made.append(row)
    return made


def _settle(future: asyncio.Future[str], status: str) -> None:
    if not future.done():
        future.set_result(status)


class Waiters:
    """Who awaits which command's result: futures on any event loop, any thread.

    :meth:`wait` registers a future on the caller's loop; :meth:`resolve` (from the
    link's loop or a thread) settles it on that loop with the command's status.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._futures: dict[str, list[asyncio.Future[str]]] = {}

    async def wait(self, jti: str, timeout: float) -> str | None:
        """The status :meth:`resolve` gives ``jti``, or ``None`` after ``timeout`` s."""
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        with self._lock:
            self._futures.setdefault(jti, []).append(future)
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            return None
        finally:
            with self._lock:
                waiting = self._futures.get(jti, [])
                if future in waiting:
                    waiting.remove(future)
                if not waiting:
                    self._futures.pop(jti, None)

    def awaited(self) -> list[str]:
        """The jtis someone waits for now."""
        with self._lock:
            return list(self._futures)

    def resolve(self, done: Mapping[str, str]) -> None:
        """Wake the waiters of these jtis with their statuses."""
        with self._lock:
            ready = [(future, done[jti]) for jti in done for future in self._futures.get(jti, ())]
        for future, status in ready:
            with contextlib.suppress(RuntimeError):  # that caller's loop has closed
                future.get_loop().call_soon_threadsafe(_settle, future, status)


class Outbox:
    """The link's transactions on the outbox, each short, each its own (worker threads).

    With several replicas on one database (PostgreSQL), each command is published by
    one of them: :meth:`plan` claims what it returns for ``claim_s`` seconds
    (:func:`claim_commands`), so the same row committed by one replica and seen by
    another's poll is not published twice.  A SQLite database serves one process
    (relay/db/engine.py's lock), so there it claims nothing.
    """

    def __init__(self, db: Database, commands: Commands, *, policy: ResendPolicy,
                 claim_s: float = 15.0, claim_batch: int = 50,
                 replica: str | None = None) -> None:
        self._db = db
        self._commands = commands
        self._policy = policy
        self._claim_s = claim_s
        #: At most this many rows are claimed a plan: what one publish batch sends within
        #: the claim's time (a claim of 500 would run out before the 10th batch's acks).
        self._claim_batch = claim_batch
        #: This process's name in the claims.
        self.replica = replica or secrets.token_hex(8)
        self._claims = not db.is_sqlite

    def plan(self, now: float, *, republish_before: float, kicked: Collection[str] = (),
             resend: bool = True) -> tuple[list[Due], int]:
        """In one transaction: new commands for unconfirmed lockouts (with ``resend``),
        then what is due (:func:`due_commands`); how many commands were made.  Without
        ``resend`` it only reads, so it takes no write lock.  With replicas, what is due
        is then claimed in a second, short transaction: only the claimed rows are
        returned."""
        replica = self.replica if self._claims else None
        with self._db.session() if resend else self._db.read() as s:
            offline = offline_sites(s)
            made = resend_intents(s, self._commands, now, offline=offline,
                                  policy=self._policy) if resend else []
            for row in made:
                LOGGER.info("%s of %s at %s (ver %s) unconfirmed: sent again as %s",
                            row.cmd, row.unit_id, row.site_id, row.ver, row.jti)
            due = due_commands(s, now, republish_before=republish_before, offline=offline,
                               kicked=kicked, replica=replica)
        if due and replica is not None:
            due = due[:self._claim_batch]
            with self._db.session() as s:
                mine = claim_commands(s, [d.jti for d in due], now, replica=replica,
                                      claim_s=self._claim_s,
                                      republish_before=republish_before, offline=offline,
                                      kicked=kicked)
            due = [d for d in due if d.jti in mine]
        return due, len(made)

    def release(self, jtis: list[str]) -> None:
        """:func:`release_claims` of this replica (a publish that failed)."""
        if self._claims and jtis:
            with self._db.session() as s:
                release_claims(s, jtis, self.replica)

    def mark(self, jtis: list[str], now: float) -> None:
        """:func:`mark_published` in a transaction of its own (relaxed: a mark lost to a
        power cut only publishes the command again, under the same ``jti``)."""
        with self._db.relaxed() as s:
            mark_published(s, jtis, now)

    def apply(self, site_id: str, payload: Mapping[str, Any],
              now: float) -> tuple[str, str] | None:
        """:func:`record_result`: ``(jti, status)`` of the command it answered, or None.
        Durable before an API caller is told (an unlock lives 60 s: a result lost to a
        power cut could not be had again once it expired)."""
        jti = payload.get("jti")
        with self._db.session() as s:
            # Every replica receives every result: the one that finds the command still
            # unanswered counts it (the others wait on the row lock, then find it answered).
            before = s.get(Command, jti, with_for_update=True) \
                if isinstance(jti, str) and 0 < len(jti) <= 64 else None
            was = before.status if before is not None else None
            row = record_result(s, site_id, payload, now)
            if row is None:
                return None
            answered = (row.jti, row.status)
            counted = (row.cmd, row.status, row.reason) \
                if was in (PENDING, TIMEOUT) and row.status != was else None
        if counted is not None:
            command_result(*counted)
        return answered

    def expire(self, now: float) -> list[str]:
        """:func:`expire_commands` in a transaction of its own."""
        with self._db.session() as s:
            return expire_commands(s, now)

    def finished(self, jtis: Collection[str]) -> dict[str, str]:
        """:func:`finished` in a read transaction of its own."""
        with self._db.read() as s:
            return finished(s, jtis)
