"""The command path: a message on ``P/S/cmd`` screened, verified, claimed and queued on
its unit, and its result published; and, at start, the commands a restart interrupted.

The screen sheds a flood before the Ed25519 check costs anything
(gateway/intake/screen.py); rejection results go out through a token bucket, so a flood
of garbage is never amplified onto the broker.  See docs/design/agent.md.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future

from gateway.clock import TrustedClock
from gateway.config import Config
from gateway.intake.commands import MAX_COMMAND_BYTES, Command, CommandVerifier, Rejection
from gateway.intake.mgmt import MGMT_PREFIX
from gateway.intake.screen import RecentIds, Screen, TokenBucket
from gateway.link.message import Message
from gateway.link.mqtt import MqttLink
from gateway.store import Store, StoreError
from gateway.units.manager import Outcome, UnitManager
from sitelink.codes import Cmd, Reason, Status
from sitelink.topics import Topics

__all__ = ["RECENT_JTIS_MAX", "UNSENT_RESULTS_MAX", "CommandPath", "rejection_outcome"]

LOGGER = logging.getLogger(__name__)

#: Command ids remembered in memory to answer a late duplicate without a query.
RECENT_JTIS_MAX = 10_000
#: Results kept while the broker is unreachable (the oldest go first beyond this).
UNSENT_RESULTS_MAX = 1000


def rejection_outcome(rejection: Rejection) -> Outcome:
    """The published result of a rejected token.

    The ids of a token whose signature did not verify are the sender's word: echoing
    them would let a forger publish a "rejected" result under the ``jti`` of a genuine
    command still on its way, and the relay would take it for that command's answer
    (found in review).  They are published as ``null``; only verified claims are echoed.
    """
    if rejection.claims_verified:
        return Outcome(rejection.jti, rejection.cmd, rejection.unit, Status.REJECTED,
                       rejection.reason, None, time.time())
    return Outcome(None, None, None, Status.REJECTED, rejection.reason, None, time.time())


class CommandPath:
    """Commands from ``P/S/cmd`` to their unit's queue, and their results back."""

    def __init__(self, config: Config, *, clock: TrustedClock, store: Store,
                 units: UnitManager, link: MqttLink, topics: Topics,
                 rejections: TokenBucket, stopping: threading.Event) -> None:
        self._clock = clock
        self._store = store
        self._units = units
        self._link = link
        self._topics = topics
        self._stopping = stopping
        self.rejections = rejections
        self.verifier = CommandVerifier(config, clock)
        self._counters_lock = threading.Lock()
        self.counters = {"received": 0, "rejected": 0, "executed": 0, "duplicates": 0,
                         "refused_again": 0, "shed": 0}
        self.rejected_by_reason: dict[str, int] = {}
        self._recent_jtis = RecentIds(RECENT_JTIS_MAX)
        self.screen = Screen(self.verifier, rejections, max_bytes=MAX_COMMAND_BYTES,
                             counters=self.counters, recent=self._recent_jtis)
        self._unsent: deque[Outcome] = deque(maxlen=UNSENT_RESULTS_MAX)
        #: Queued before a restart, held while the clock was untrusted (_run_queued).
        self.held: set[str] = set()

    def reconfigure(self, config: Config) -> None:
        """Verify with ``config``'s keys and rules; verdicts under the old ones go."""
        self.verifier = CommandVerifier(config, self._clock)
        self.screen.reset(self.verifier)

    # -- results --------------------------------------------------------------------------
    def publish_result(self, outcome: Outcome) -> None:
        """Publish a command's result on ``P/S/cmd/result``, or keep it for the next
        connect."""
        data = json.dumps(outcome.payload(), separators=(",", ":")).encode()
        if not self._link.publish(self._topics.cmd_result, data, qos=1):
            # Not connected: kept (bounded) and sent on the next connect, so a result
            # is not lost to a broker outage; the sender can also re-send the command
            # and get it as a duplicate.
            self._unsent.append(outcome)

    def flush_unsent(self) -> None:
        """After a (re)connect: the results kept while the broker was unreachable."""
        while self._unsent:
            outcome = self._unsent.popleft()
            self.publish_result(outcome)
            if not self._link.connected:
                break

    # -- commands -------------------------------------------------------------------------
    def on_command(self, message: Message) -> None:
        """A message on ``P/S/cmd``: screen and verify, then queue on the unit (or
        reject).  See "Load shedding" in docs/design/agent.md for what the screen sheds."""
        self.counters["received"] += 1
        verdict = self.screen.check(message.payload, retained=bool(message.retain))
        if verdict is None:
            return
        if isinstance(verdict, Rejection):
            self._rejected(verdict)
            return
        command = verdict
        # Durable before this returns, so before the link acknowledges the delivery: a
        # crash up to here means the broker delivers again; after it, the row remains.
        try:
            with self._store.transaction() as tx:
                fresh = tx.queue_command(command.jti, command.cmd, command.unit, time.time(),
                                         message.payload)
                first = None if fresh else tx.command(command.jti)
            self._recent_jtis.add(command.jti)
        except StoreError as exc:
            # Without a durable inbox, at-most-once cannot be promised: refuse, loudly.
            # The store's hook has raised the (rate-limited) storage alarm already; one
            # alarm per refused command would flood the broker while the disk is bad.
            LOGGER.error("command %s refused: %s", command.jti, exc)  # noqa: TRY400
            if command.cmd in (Cmd.LOCK, Cmd.LOCKOUT) and command.unit is not None:
                # Locking is safe to repeat and must never wait for the disk: the door
                # is locked anyway; the command is still answered "failed" (not kept).
                self._units.lock_unrecorded(command.unit, f"{command.cmd} {command.jti}")
            self.publish_result(Outcome(command.jti, command.cmd, command.unit,
                                        Status.FAILED, Reason.HARDWARE_ERROR, None,
                                        time.time()))
            return
        if (first is not None and first.status == "queued" and command.jti in self.held
                and (first.cmd, first.unit) == (command.cmd, command.unit)):
            # Received before a restart and held there for an untrusted clock: this copy
            # verified now, so it runs (found in review: it was answered as a duplicate
            # and never ran).  Only the same action on the same unit: a reused jti never
            # moves another lock.  The store's queued -> executing step still lets only
            # one copy execute.
            self.held.discard(command.jti)
            self._submit(command)
            return
        if first is not None:
            # Seen before: answered from the first outcome, behind the first command's
            # unit, whatever unit this copy names (a reused jti never moves a lock).
            future = self._units.answer_duplicate(command, first.unit)
            future.add_done_callback(functools.partial(self._done, command))
            return
        self._submit(command)

    def _rejected(self, rejection: Rejection) -> None:
        self.counters["rejected"] += 1
        # Debug only: a flood would otherwise write thousands of lines a second; the
        # counts per reason are in `status`.
        LOGGER.debug("command rejected: %s (%s)", rejection.reason, rejection.detail)
        self.rejected_by_reason[rejection.reason] = (
            self.rejected_by_reason.get(rejection.reason, 0) + 1)
        if not self.rejections.take():
            return  # a flood is not amplified onto the broker, duplicates included
        # Only a jti this agent answered recently can be a late duplicate; anything
        # else (a flood of replayed tokens) costs no database lookup.
        stored = (self._store.command(rejection.jti)
                  if rejection.claims_verified and rejection.jti is not None
                  and rejection.jti in self._recent_jtis else None)
        if stored is not None and stored.result:
            # A genuine command we already answered, redelivered after it expired:
            # the original result, as a duplicate (contract §4).
            self.publish_result(Outcome.from_result(stored.result, duplicate=True))
            return
        self.publish_result(rejection_outcome(rejection))

    def _submit(self, command: Command) -> None:
        # A duplicate is queued behind its original on the unit's queue, so it answers
        # with the original's final result.
        try:
            future = self._units.submit(command)
        except RuntimeError:
            if not self._stopping.is_set():
                raise
            # Stopping: the unit workers are gone.  The command is already `queued` in
            # SQLite, so the next start verifies it again and runs it if still fresh.
            LOGGER.info("stopping: command %s stays queued for the next start", command.jti)
            return
        future.add_done_callback(functools.partial(self._done, command))

    def _done(self, command: Command, future: Future[Outcome]) -> None:
        if future.cancelled():
            return  # shutting down: still `queued` in SQLite, run at the next start
        try:
            outcome = future.result()
        except Exception:
            # A bug or a storage failure, possibly after the door moved: the honest
            # answer is `unknown`, and the row says so too, so it is never run again.
            LOGGER.exception("command %s failed inside the agent", command.jti)
            outcome = Outcome(command.jti, command.cmd, command.unit, Status.UNKNOWN, None,
                              None, time.time())
            try:
                with self._store.transaction() as tx:
                    row = tx.command(command.jti)
                    if row is not None and row.status in ("queued", "executing"):
                        tx.finish_command(command.jti, Status.UNKNOWN, None, outcome.record())
            except Exception:  # the store itself may be what failed
                LOGGER.exception("could not record %s as unknown", command.jti)
        with self._counters_lock:  # this runs on the unit threads, several at once
            self.counters["duplicates" if outcome.duplicate else "executed"] += 1
        self.publish_result(outcome)

    # -- after a restart ------------------------------------------------------------------
    def recover(self) -> None:
        """After a crash: interrupted commands become ``unknown`` (never re-run); commands
        received but never started are verified again and run if still fresh.

        Runs before the link starts, so nothing of this run is mistaken for last run's;
        the results go out once the broker is connected (:meth:`flush_unsent`).
        """
        for row in self._store.recover_interrupted(time.time(),
                                                   self._units.audit_interrupted):
            LOGGER.warning("command %s was interrupted by a restart: outcome unknown", row.jti)
            if row.cmd.startswith(MGMT_PREFIX):
                continue  # a re-send gets `unknown` from the store; never re-run
            self._unsent.append(Outcome.from_result(row.result, duplicate=False))
        self.run_queued()

    def run_queued(self, only: set[str] | None = None) -> None:
        """Commands received but never started: verified again and run if still fresh.

        One the clock cannot judge yet (``clock_untrusted``) stays queued and its id is
        kept in :attr:`held`; :meth:`retry_held` tries those again once the clock is
        trusted, and answers them ``expired`` if that came too late.  Found in review:
        they were left queued for good.  ``only`` limits the pass to those ids, so a
        command queued live meanwhile is never submitted twice.
        """
        for row, payload in self._store.queued_commands():
            if only is not None and row.jti not in only:
                continue
            self.held.discard(row.jti)
            try:
                command = self.verifier.verify(payload, retained=False)
            except Rejection as rejection:
                if rejection.reason == Reason.CLOCK_UNTRUSTED:
                    self.held.add(row.jti)  # not final: tried again when it is trusted
                    continue
                LOGGER.warning("queued command %s dropped at restart: %s", row.jti,
                               rejection.reason)
                outcome = Outcome(row.jti, row.cmd, row.unit, Status.REJECTED,
                                  rejection.reason, None, time.time())
                with self._store.transaction() as tx:
                    tx.finish_command(row.jti, Status.REJECTED, rejection.reason,
                                      outcome.record())
                self.publish_result(outcome)
                continue
            LOGGER.info("running command %s received before the restart", row.jti)
            self._submit(command)
        if self.held:
            LOGGER.warning("%d command(s) received before the restart wait for a trusted "
                           "clock", len(self.held))

    def run_held(self) -> None:
        """Run the commands :meth:`run_queued` held for an untrusted clock (the caller
        checked that it is trusted now, and holds the intake lock)."""
        held, self.held = self.held, set()
        # Only those still queued: one a re-send ran meanwhile is not run again.
        self.run_queued(only=held)
