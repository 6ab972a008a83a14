"""Leases on background jobs, so that replicas on one database run each job once.

A lease is a row of ``job_leases``: its holder, until when (the **database's** clock,
so replicas whose clocks differ agree), and a fencing counter raised by every new
holder.  :meth:`Leases.acquire` takes a free or expired lease in one conditional
``UPDATE`` and returns a :class:`Lease` with its fence; the holder then calls
:meth:`Lease.check` inside each transaction that writes the job's results, which
extends the lease only while the fence is still its own, in the same transaction: a
holder that stalled past its lease (a long GC pause, a frozen VM) and lost it to another
replica has that transaction rolled back (:class:`LeaseLostError`) instead of writing
beside the new holder.

Rows, not PostgreSQL's session advisory locks: those live on one connection, and a
transaction-pooling proxy (PgBouncer) hands connections to other clients between
transactions.  On SQLite (one process) the same code runs and always wins.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from sqlalchemy import or_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from relay.db.engine import Database
from relay.db.models import JobLease
from relay.errors import RelayError
from relay.ratelimit import database_now

__all__ = ["Lease", "LeaseLostError", "Leases"]


class LeaseLostError(RelayError):
    """Another replica took the job's lease over: this holder's writes are rolled back."""


@dataclass(frozen=True)
class Lease:
    """A held lease: :meth:`check` it in each transaction that writes the job's work."""

    name: str
    fence: int
    owner: str
    ttl_s: float

    def check(self, session: Session) -> None:
        """Extend the lease by ``ttl_s`` in ``session``'s transaction, or raise
        :class:`LeaseLostError` (the transaction is then rolled back) when another
        holder's fence replaced this one."""
        now = database_now(session)
        renewed = session.execute(
            update(JobLease).where(JobLease.name == self.name, JobLease.fence == self.fence,
                                   JobLease.owner == self.owner)
            .values(until=now + self.ttl_s).returning(JobLease.fence)).first()
        if renewed is None:
            raise LeaseLostError(f"lease {self.name} (fence {self.fence}) was taken over")


class Leases:
    """This process's leases on ``db``; ``owner`` names it (random per process)."""

    def __init__(self, db: Database, *, owner: str | None = None) -> None:
        self._db = db
        self.owner = owner or secrets.token_hex(8)

    def acquire(self, name: str, ttl_s: float) -> Lease | None:
        """Hold ``name`` for ``ttl_s`` seconds if it is free, expired or already this
        process's; ``None`` when another replica holds it."""
        with self._db.session() as s:
            dialect = postgresql if s.get_bind().dialect.name == "postgresql" else sqlite
            s.execute(dialect.insert(JobLease)
                      .values(name=name, owner=None, until=0.0, fence=0)
                      .on_conflict_do_nothing(index_elements=["name"]))
            now = database_now(s)
            fence = s.scalar(
                update(JobLease).where(JobLease.name == name,
                                       or_(JobLease.until <= now, JobLease.owner == self.owner))
                .values(owner=self.owner, until=now + ttl_s, fence=JobLease.fence + 1)
                .returning(JobLease.fence))
        return None if fence is None else Lease(name, int(fence), self.owner, ttl_s)

    def release(self, lease: Lease) -> None:
        """Let ``lease`` go now (if it is still this holder's), for the next to take."""
        with self._db.session() as s:
            s.execute(update(JobLease).where(
                JobLease.name == lease.name, JobLease.fence == lease.fence,
                JobLease.owner == lease.owner).values(owner=None, until=0.0))
