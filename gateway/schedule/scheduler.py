"""The job table on APScheduler 3 (:class:`SiteScheduler`), guarded against wall-clock jumps.

:class:`SiteScheduler` runs :data:`gateway.schedule.jobs.JOBS` on a ``BackgroundScheduler``
with an in-memory job store and a small pool of its own; :class:`JumpDetector`, the
jump-safe loop and :class:`_IntervalTrigger` keep each job on the monotonic clock through
a step of the wall clock (fault matrix #39).  See docs/design/scheduling.md.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
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

from gateway.schedule.jobs import JOBS, JobSpec

#: The logger of the module this one was split from (gateway/schedule.py):
#: log lines keep their name, and what reads them (a journal filter) still matches.
LOGGER = logging.getLogger("gateway.schedule")

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

