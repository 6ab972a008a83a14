"""The agent's periodic jobs, in one table, on APScheduler 3; and the systemd watchdog.

Every periodic job the agent runs is a row of :data:`JOBS`: an explicit id, its interval,
and a ``misfire_grace_time``, ``coalesce`` and ``max_instances`` chosen for that job, with
the reason written next to it.  :class:`SiteScheduler` runs the table on APScheduler's
``BackgroundScheduler`` with an in-memory job store (the jobs are code: a persistent
store could only bring back stale or duplicate rows after an upgrade, fault matrix #43)
and a small pool of its own (:data:`POOL_WORKERS` threads, made only when needed).

Wall-clock jumps (fault matrix #39)
-----------------------------------
APScheduler 3 keeps its schedule in wall-clock time, but waits with ``threading.Event``,
which counts monotonic time.  So:

* After a step **back** (an hour, say) every interval job waits until the wall clock
  catches up with a time that now lies an hour ahead: reconciliation would stall for an
  hour (APScheduler issues #35 and #526).
* After a step **forward** every job is overdue at once: all of them fire together (a
  burst), those whose delay exceeds their grace are logged as missed, and
  ``Job._get_run_times`` walks every interval in between, one at a time (a day of a 5 s
  job is 17 280 steps; ten years are 63 million: minutes of CPU on a Pi).

Three guards, all on the scheduler's own thread:

1. :class:`JumpDetector` compares ``wall - monotonic`` at every pass of the scheduler's
   loop (the loop wakes at least every :data:`MAX_WAIT_S`, on the monotonic clock).  When
   it moved by more than :data:`JUMP_THRESHOLD_S`, every job's next run time is moved by
   the same step *before* due jobs are looked for: each job keeps its place on the
   monotonic clock, so a jump causes no run, no miss and no wait.  The agent's own
   ``on_jump`` hook then wakes whatever else waits on wall-clock times (the outbox).
2. Every pass, a job due further ahead than one interval is pulled in to one interval
   (a step back that came in the microseconds between the detector's reading of the
   clock and APScheduler's own would otherwise still hang that job).
3. The interval trigger (:class:`_IntervalTrigger`) never returns a next fire time that
   is already in the past: a job found far behind (a step forward in that same window,
   or a pool blocked for long) is due once and then back on its grid, in one step
   rather than one per missed interval.

Relock deadlines are not scheduler jobs: they live on the monotonic clock in
gateway/units/manager.py, and ``units.reconcile`` only backs them up.

Watchdog
--------
:class:`Watchdog` sends ``WATCHDOG=1`` on ``$NOTIFY_SOCKET`` every third of
``WatchdogSec`` (``$WATCHDOG_USEC``, honouring ``$WATCHDOG_PID``), from the agent's main
thread, and only while every *vital* check passes.  A vital check returns ``None`` when
that part is alive, or one sentence saying what is wrong; "alive" means progress within
one watchdog period, not merely a thread object that exists (see ``Agent.start`` for
the list: the MQTT link's threads and inbound progress, the unit workers, the relock
timer, the scheduler and reconciliation).  A wedged agent stops pinging and systemd
restarts it within about two periods.  The tests watch the pings stop by breaking a
vital part on purpose through the agent's ``faults`` hook (``devkit/faults.py``); the
product itself has no way to do that.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from apscheduler.events import (  # type: ignore[import-untyped]
    EVENT_JOB_MAX_INSTANCES,
    EVENT_JOB_MISSED,
    JobEvent,
)
from apscheduler.executors.pool import ThreadPoolExecutor  # type: ignore[import-untyped]
from apscheduler.jobstores.memory import MemoryJobStore  # type: ignore[import-untyped]
from apscheduler.schedulers.background import (  # type: ignore[import-untyped]
    BackgroundScheduler,
)
from apscheduler.triggers.interval import IntervalTrigger  # type: ignore[import-untyped]

__all__ = [
    "JOBS",
    "JUMP_THRESHOLD_S",
    "MAX_WAIT_S",
    "POOL_WORKERS",
    "JobSpec",
    "JumpDetector",
    "PoolProbe",
    "SiteScheduler",
    "Watchdog",
    "inbound_progress",
    "threads_alive",
    "watchdog_period",
]

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class JobSpec:
    """One periodic job: how often, and what happens when it cannot run on time.

    ``misfire_grace_time``: how late (seconds) a run may start and still run; ``None``
    means however late.  ``coalesce``: several overdue runs become one.
    ``max_instances``: runs of this job allowed at the same time.
    """

    id: str
    interval_s: float
    misfire_grace_time: int | None  # APScheduler takes whole seconds
    coalesce: bool
    max_instances: int
    why: str


#: Every periodic job of the agent.  ``Agent.start`` maps each id to its function.
#:
#: Common to all: ``coalesce=True``.  Each job brings some state up to date (hardware,
#: broker, database); one late run does everything the missed ones would have, so
#: running a backlog one after the other is a burst that gains nothing.
#: ``max_instances=1``: a run still going when the next is due (a slow bus, a slow
#: token endpoint) is not doubled; APScheduler logs the skipped start as a warning.
JOBS: Final[tuple[JobSpec, ...]] = (
    JobSpec(
        "units.reconcile", 5.0, None, True, 1,
        "Reads every controller back: relocks found overdue (the backstop of the "
        "monotonic relock timers), lockouts re-applied after drift or a controller "
        "coming back, door alarms, controller health.  One bus pass serves all of "
        "these, so they are one job.  5 s bounds how long drift or a forced door goes "
        "unseen, at a few frames per controller.  Grace None: however late, this "
        "read-back is the freshest state there is and the safety net for relocks, "
        "so it is never skipped as missed."),
    JobSpec(
        "telemetry.publish", 30.0, 30, True, 1,
        "Refreshes the retained status (health, counters) on the broker.  Grace of one "
        "interval: a run later than that is as good as the next one, so it is skipped "
        "(and counted as missed) rather than doubled up."),
    JobSpec(
        "clock.persist", 60.0, 60, True, 1,
        "Saves the last wall time seen while the clock was trusted, the floor of the "
        "next start (gateway/clock.py).  One SQLite write a minute: SD-card wear.  "
        "Grace of one interval, as above; shutdown saves it too."),
    JobSpec(
        "outbox.wake", 30.0, 30, True, 1,
        "Wakes the outbox drainer.  It is woken by every new event and sleeps at "
        "most gateway/outbox/drainer.py IDLE_WAIT_S on its own, so this is only a safety net "
        "(an Event.set); grace of one interval."),
    JobSpec(
        "stora.token_refresh", 60.0, 60, True, 1,
        "Asks the Stora token source for its token: it refreshes a client-credentials "
        "token once less than max(60 s, 10 %) of its life remains (monotonic clock, "
        "gateway/stora/) and re-reads a changed token file.  Done here, the refresh "
        "happens while idle instead of in front of the first event after a quiet "
        "night.  A call with nothing due is a lock and a comparison.  max_instances 1: "
        "a refresh holds the token lock across its request; a second run would only "
        "park a pool thread behind it."),
    JobSpec(
        "store.prune", 3600.0, 3600, True, 1,
        "Deletes ended commands, delivered events and old dead letters that no "
        "guarantee needs any more (gateway/store/ retention), so the database on the "
        "SD card stays bounded.  Hourly: one indexed DELETE pass, a day's growth at "
        "most between runs.  Skipped while the wall clock is untrusted (a clock far "
        "ahead would delete ids that dedupe still needs)."),
    JobSpec(
        "watchdog.heartbeat", 5.0, None, True, 1,
        "Proves the scheduler's thread and pool still run jobs, and probes the unit "
        "workers (PoolProbe); the watchdog pings only while both keep up.  Never "
        "skipped as missed: a late heartbeat still proves the pool runs.  Shortened to "
        "a third of WatchdogSec when that is shorter."),
)

#: Threads of the scheduler's pool, made only when jobs overlap.  Three: reconciliation
#: (bus timeouts when a controller is offline) and a token refresh (an HTTP request up
#: to its deadline) may both be slow at once, and the quick jobs still get a thread.
POOL_WORKERS: Final = 3
#: A step of ``wall - monotonic`` larger than this between two passes of the scheduler's
#: loop counts as a clock jump.  The loop runs every few seconds and NTP slews at most
#: 500 ppm (a few ms per pass), so anything near a second is a step.  Smaller steps are
#: left alone: they move a job by under a second.
JUMP_THRESHOLD_S: Final = 1.0
#: The scheduler's loop wakes at least this often (monotonic), so a jump is noticed
#: within this even when no job is due sooner.
MAX_WAIT_S: Final = 5.0
#: How far past one interval a job's next run may lie before it is pulled in (clock
#: reads a few ms apart must not count).
_SLACK: Final = timedelta(seconds=JUMP_THRESHOLD_S)
#: The unit-pool probe's key on the unit executor: not a unit id (those are Stora ids).
PROBE_KEY: Final = "~watchdog-probe"
#: A watchdog period shorter than this is raised to it (below it, a busy Pi could miss
#: pings for no fault of the agent).
MIN_WATCHDOG_S: Final = 2.0

Vital = tuple[str, Callable[[], "str | None"]]


# ----------------------------------------------------------------------- jump detection
class JumpDetector:
    """Notices steps of the wall clock: ``wall - monotonic`` is constant otherwise.

    ``wall`` and ``mono`` are injectable for tests.  Thread-safe.
    """

    def __init__(self, *, wall: Callable[[], float] = time.time,
                 mono: Callable[[], float] = time.monotonic,
                 threshold_s: float = JUMP_THRESHOLD_S) -> None:
        self._wall = wall
        self._mono = mono
        self._threshold = threshold_s
        self._lock = threading.Lock()
        self._offset = wall() - mono()
        #: Jumps seen, and the last step (seconds, + forward).
        self.jumps = 0
        self.last_step: float | None = None

    def check(self) -> float:
        """The step since the last call, in seconds (+ forward), or 0.0 when none.

        The baseline follows every reading, so slow slewing never adds up to a jump.
        """
        with self._lock:
            offset = self._wall() - self._mono()
            step, self._offset = offset - self._offset, offset
            if abs(step) <= self._threshold:
                return 0.0
            self.jumps += 1
            self.last_step = step
            return step


class _IntervalTrigger(IntervalTrigger):  # type: ignore[misc]
    """An interval trigger whose next fire time is never already past.

    APScheduler's computes ``previous + interval``, and ``Job._get_run_times`` calls it
    again and again until it passes ``now``: one call per missed interval.  Here a fire
    time found behind ``now`` jumps to the first slot of the grid at or after ``now``, so
    a job that fell behind by any amount is due once, then back on its grid.
    """

    def get_next_fire_time(self, previous_fire_time: datetime | None,
                           now: datetime) -> datetime | None:
        nxt: datetime | None = super().get_next_fire_time(previous_fire_time, now)
        if previous_fire_time is None or nxt is None or nxt >= now:
            return nxt
        behind = (now - nxt).total_seconds()
        steps = math.ceil(behind / self.interval_length)
        return nxt + timedelta(seconds=steps * self.interval_length)


class _JumpSafeScheduler(BackgroundScheduler):  # type: ignore[misc]
    """``BackgroundScheduler`` whose every pass first looks for a wall-clock jump."""

    def __init__(self, *, on_pass: Callable[[], bool], **options: Any) -> None:
        self._on_pass = on_pass
        super().__init__(**options)

    def _jumped(self) -> bool:
        try:
            return self._on_pass()
        except Exception:  # a jump must never stop the scheduler
            LOGGER.exception("clock jump handling failed")
            return False

    def _process_jobs(self) -> float:
        # On the scheduler's own thread, before due jobs are computed from wall time.
        self._jumped()
        wait: float | None = super()._process_jobs()
        # And after: a step that landed while this pass ran (after the check above, so
        # its wait was computed from a clock that then moved) is handled now and the
        # jobs looked at again at once, instead of after a whole MAX_WAIT_S.
        if self._jumped():
            return 0.0
        # Waits are monotonic (threading.Event): bounded, the next pass comes soon
        # after any jump, even when no job is due for long.
        return MAX_WAIT_S if wait is None else min(wait, MAX_WAIT_S)


@dataclass
class _JobStats:
    runs: int = 0
    failures: int = 0
    missed: int = 0
    skipped_busy: int = 0
    running: bool = False
    last_start: float | None = None  # monotonic
    last_end: float | None = None  # monotonic
    last_duration_s: float | None = None


class SiteScheduler:
    """The job table on a ``BackgroundScheduler``; start, stop, stats and a vital check.

    ``jobs`` maps every id of ``specs`` to the function it runs (exactly those ids).
    ``intervals`` replaces some intervals (tests shrink them; the agent shortens the
    heartbeat to the watchdog).  A job's exception is logged and counted; it never ends
    the scheduler.  ``on_jump(step)`` is called after every job was moved by a jump.
    """

    def __init__(
        self,
        jobs: Mapping[str, Callable[[], object]],
        *,
        specs: Sequence[JobSpec] = JOBS,
        intervals: Mapping[str, float] | None = None,
        workers: int = POOL_WORKERS,
        detector: JumpDetector | None = None,
        on_jump: Callable[[float], None] | None = None,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        ids = [spec.id for spec in specs]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate job ids in the table: {ids}")
        if set(jobs) != set(ids):
            raise ValueError(f"job functions {sorted(jobs)} do not match the table {ids}")
        intervals = dict(intervals or {})
        unknown = set(intervals) - set(ids)
        if unknown:
            raise ValueError(f"intervals for unknown jobs: {sorted(unknown)}")
        self.specs = tuple(replace(s, interval_s=intervals.get(s.id, s.interval_s))
                           for s in specs)
        self._mono = mono
        self._detector = detector or JumpDetector()
        self._on_jump = on_jump
        self._lock = threading.Lock()
        self._stats = {spec.id: _JobStats() for spec in self.specs}
        self._started_at: float | None = None
        self._scheduler = _JumpSafeScheduler(
            on_pass=self._after_jump_check,
            jobstores={"default": MemoryJobStore()},
            executors={"default": ThreadPoolExecutor(
                workers, pool_kwargs={"thread_name_prefix": "schedule"})},
            timezone=UTC,
            daemon=True,
        )
        self._scheduler.add_listener(self._on_event, EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES)
        for spec in self.specs:
            self._scheduler.add_job(
                self._runner(spec.id, jobs[spec.id]),
                trigger=_IntervalTrigger(seconds=spec.interval_s, timezone=UTC),
                id=spec.id, name=spec.id,
                misfire_grace_time=spec.misfire_grace_time,
                coalesce=spec.coalesce,
                max_instances=spec.max_instances,
                # Explicit ids, replaced rather than added twice: registering the
                # table again can never leave two copies of a job (fault matrix #43).
                replace_existing=True,
            )

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Start the scheduler's thread; the first run of each job is one interval away."""
        self._started_at = self._mono()
        self._detector.check()  # the baseline is now, not construction time
        self._scheduler.start()

    def stop(self, *, wait: bool = True) -> None:
        """Stop scheduling; with ``wait``, also wait for running jobs to end."""
        if self._scheduler.running:
            self._scheduler.shutdown(wait=wait)

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop` (and while the thread lives)."""
        thread = getattr(self._scheduler, "_thread", None)
        return bool(self._scheduler.running) and thread is not None and thread.is_alive()

    # -- jobs ------------------------------------------------------------------------------
    def _runner(self, job_id: str, fn: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            stats = self._stats[job_id]
            started = self._mono()
            with self._lock:
                stats.running, stats.last_start = True, started
            failed = False
            try:
                fn()
            except Exception:  # a job's failure is its own; the schedule goes on
                failed = True
                LOGGER.exception("periodic job %s failed", job_id)
            finally:
                ended = self._mono()
                with self._lock:
                    stats.runs += 1
                    stats.failures += failed
                    stats.running = False
                    stats.last_end, stats.last_duration_s = ended, ended - started
                    runs = stats.runs
                LOGGER.debug("job %s: run %d, %.1f ms", job_id, runs, (ended - started) * 1e3)

        run.__name__ = job_id.replace(".", "_")
        return run

    def _on_event(self, event: JobEvent) -> None:
        stats = self._stats.get(event.job_id)
        if stats is None:
            return
        with self._lock:
            if event.code == EVENT_JOB_MISSED:
                stats.missed += 1
            else:
                stats.skipped_busy += 1

    def _after_jump_check(self) -> bool:
        """Look for a step of the wall clock and handle it; whether there was one."""
        step = self._detector.check()
        if step:
            moved = self.rebase(step)
            LOGGER.warning("wall clock stepped by %+.1f s; %d periodic job(s) moved with "
                           "it (their spacing stays on the monotonic clock)", step, moved)
            if self._on_jump is not None:
                self._on_jump(step)
        pulled = self._pull_in()
        return bool(step) or pulled

    def _pull_in(self) -> bool:
        """No job may be due further ahead than its interval: one that is missed a step
        back (the clock stepped between the detector's reading and APScheduler's own)
        would otherwise wait for the wall clock to catch up.  Checked every pass."""
        now = datetime.now(UTC)
        pulled = False
        for job in self._scheduler.get_jobs():
            interval = timedelta(seconds=job.trigger.interval_length)
            if job.next_run_time is not None and job.next_run_time - now > interval + _SLACK:
                LOGGER.warning("periodic job %s was due in %s: pulled in to one interval "
                               "(a wall-clock step back?)", job.id, job.next_run_time - now)
                self._scheduler.modify_job(job.id, next_run_time=now + interval)
                pulled = True
        return pulled

    def rebase(self, step: float) -> int:
        """Move every job's next run time by ``step`` seconds; how many were moved.

        Called on the scheduler's thread when the wall clock stepped by ``step``: each
        job then comes due at the same monotonic moment as before the step.
        """
        moved = 0
        delta = timedelta(seconds=step)
        for job in self._scheduler.get_jobs():
            if job.next_run_time is None:
                continue  # paused
            self._scheduler.modify_job(job.id, next_run_time=job.next_run_time + delta)
            moved += 1
        return moved

    def reschedule(self, job_id: str, interval_s: float) -> None:
        """Run ``job_id`` every ``interval_s`` from now on (a live ``config.set``)."""
        with self._lock:
            self.specs = tuple(replace(s, interval_s=interval_s) if s.id == job_id else s
                               for s in self.specs)
        self._scheduler.reschedule_job(
            job_id, trigger=_IntervalTrigger(seconds=interval_s, timezone=UTC))

    def next_run_times(self) -> dict[str, datetime | None]:
        """Each job's next wall-clock run time (tests, status)."""
        return {job.id: job.next_run_time for job in self._scheduler.get_jobs()}

    # -- health ----------------------------------------------------------------------------
    def runs(self, job_id: str) -> int:
        """How many times ``job_id`` ran (whatever the outcome)."""
        with self._lock:
            return self._stats[job_id].runs

    def last_end(self, job_id: str) -> float | None:
        """Monotonic time the last run of ``job_id`` ended, or None."""
        with self._lock:
            return self._stats[job_id].last_end

    def stats(self) -> dict[str, Any]:
        """For ``status``: per job runs, failures, missed, skipped, age; the clock jumps."""
        now = self._mono()
        with self._lock:
            jobs = {
                spec.id: {
                    "interval_s": spec.interval_s,
                    "runs": (s := self._stats[spec.id]).runs,
                    "failures": s.failures,
                    "missed": s.missed,
                    "skipped_busy": s.skipped_busy,
                    "running": s.running,
                    "last_run_s_ago": None if s.last_end is None else round(now - s.last_end, 1),
                    "last_duration_ms": None if s.last_duration_s is None
                    else round(s.last_duration_s * 1e3, 1),
                } for spec in self.specs}
        last = self._detector.last_step
        return {"running": self.running, "jobs": jobs, "clock_jumps": self._detector.jumps,
                "last_jump_s": None if last is None else round(last, 1)}

    def stalled(self, job_id: str, stale_s: float) -> str | None:
        """A vital check: ``None`` while ``job_id`` has finished a run within
        ``stale_s`` (or the scheduler started less than that ago), else why not."""
        if not self.running:
            return "the scheduler's thread is not running"
        now = self._mono()
        with self._lock:
            stats = self._stats[job_id]
            since = stats.last_end if stats.last_end is not None else self._started_at
            running, started = stats.running, stats.last_start
        if since is None or now - since <= stale_s:
            return None
        if running and started is not None:
            return f"{job_id} has been running for {now - started:.0f} s"
        return f"{job_id} has not run for {now - since:.0f} s"

    def shutdown_for_test(self) -> None:
        """Stop the scheduler's thread without waiting (a dev-kit test fault:
        devkit/faults.py)."""
        self._scheduler.shutdown(wait=False)


# ----------------------------------------------------------------------------- watchdog
def watchdog_period(environ: Mapping[str, str] | None = None,
                    pid: int | None = None) -> float | None:
    """``WatchdogSec`` in seconds when systemd asks this process for pings, else None.

    systemd sets ``$WATCHDOG_USEC``; ``$WATCHDOG_PID``, when set, names the process it
    means (a child started by the agent must not ping for it).  A period below
    :data:`MIN_WATCHDOG_S` is raised to it.
    """
    env = os.environ if environ is None else environ
    raw = env.get("WATCHDOG_USEC", "").strip()
    if not raw:
        return None
    owner = env.get("WATCHDOG_PID", "").strip()
    if owner and owner != str(os.getpid() if pid is None else pid):
        return None
    try:
        usec = int(raw)
    except ValueError:
        LOGGER.warning("ignoring WATCHDOG_USEC=%r: not an integer", raw)
        return None
    if usec <= 0:
        return None
    return max(usec / 1e6, MIN_WATCHDOG_S)


class Watchdog:
    """Pings systemd every ``period_s / 3`` while every vital check passes.

    ``notify`` sends one sd_notify message.  :meth:`tick` is called by the agent's main
    thread every :attr:`interval_s`; the first failing check is logged (and shown by
    ``systemctl status`` through ``STATUS=``) and the pings stop until all pass again.
    """

    def __init__(self, period_s: float, vitals: Sequence[Vital],
                 notify: Callable[[str], None]) -> None:
        self.period_s = period_s
        self.interval_s = period_s / 3
        self.vitals = list(vitals)
        self._notify = notify
        self._failing: tuple[str, ...] = ()
        #: Pings sent, and ticks that held one back.
        self.pings = 0
        self.withheld = 0

    def check(self) -> list[str]:
        """What is wrong, one sentence per failing vital part; empty when alive."""
        problems = []
        for name, check in self.vitals:
            try:
                problem = check()
            except Exception as exc:  # noqa: BLE001 - a check that cannot tell is a failure
                problem = f"check failed: {type(exc).__name__}: {exc}"
            if problem is not None:
                problems.append(f"{name}: {problem}")
        return problems

    def tick(self) -> bool:
        """Ping when alive; True when a ping was sent."""
        problems = tuple(self.check())
        if problems != self._failing:
            if problems:
                LOGGER.error("watchdog: not pinging systemd (it will restart the agent): %s",
                             "; ".join(problems))
                self._send(f"STATUS=wedged: {'; '.join(problems)}"[:400])
            else:
                LOGGER.warning("watchdog: every vital part is alive again; pinging")
                self._send("STATUS=running")
            self._failing = problems
        if problems:
            self.withheld += 1
            return False
        self.pings += 1
        return self._send("WATCHDOG=1")

    def _send(self, message: str) -> bool:
        try:
            self._notify(message)
        except OSError as exc:
            LOGGER.warning("sd_notify %s failed: %s", message.split("=", 1)[0], exc)
            return False
        return True


def threads_alive(threads: Callable[[], Iterable[threading.Thread]]) -> Callable[[], str | None]:
    """A vital check: every thread ``threads()`` returns is alive (and there is one)."""
    def check() -> str | None:
        found = list(threads())
        if not found:
            return "not started"
        dead = [t.name for t in found if not t.is_alive()]
        return f"thread(s) {', '.join(dead)} ended" if dead else None

    return check


def inbound_progress(stats: Callable[[], Mapping[str, Any]], stale_s: float,
                     mono: Callable[[], float] = time.monotonic) -> Callable[[], str | None]:
    """A vital check on the MQTT link's message worker: messages waiting and none handled
    for ``stale_s`` means the handler is stuck (``on_message`` only verifies and queues,
    so it never legitimately takes that long)."""
    state = {"done": -1, "since": mono()}

    def check() -> str | None:
        s = stats()
        done = int(s.get("handled", 0)) + int(s.get("handler_errors", 0))
        now = mono()
        if done != state["done"] or not s.get("inbound_queued"):
            state["done"], state["since"] = done, now
            return None
        if now - state["since"] > stale_s:
            return (f"{s.get('inbound_queued')} message(s) waiting and none handled for "
                    f"{now - state['since']:.0f} s")
        return None

    return check


class PoolProbe:
    """Probes a worker pool (the unit workers): a no-op task must get a worker in time.

    :meth:`probe` (from the heartbeat job) submits one when none is pending; the check
    fails when one has waited longer than ``stale_s``: every worker is stuck (or busy
    that long, which for lock operations of a few seconds each is as bad).
    """

    def __init__(self, submit: Callable[[Callable[[], None]], Future[Any]], stale_s: float,
                 mono: Callable[[], float] = time.monotonic) -> None:
        self._submit = submit
        self._stale = stale_s
        self._mono = mono
        self._lock = threading.Lock()
        self._pending: Future[Any] | None = None
        self._sent_at = 0.0

    def probe(self) -> None:
        """Submit a probe unless one is still waiting."""
        with self._lock:
            if self._pending is not None and not self._pending.done():
                return
            self._sent_at = self._mono()
            self._pending = self._submit(lambda: None)

    def check(self) -> str | None:
        """``None`` unless a probe has waited longer than ``stale_s``."""
        with self._lock:
            pending, sent_at = self._pending, self._sent_at
        if pending is None or pending.done():
            return None
        waited = self._mono() - sent_at
        if waited > self._stale:
            return f"no worker free for {waited:.0f} s (all stuck?)"
        return None
