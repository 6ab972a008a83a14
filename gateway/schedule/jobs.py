"""The agent's periodic jobs, in one table (:data:`JOBS`): each with an explicit id, its
interval, and a ``misfire_grace_time``, ``coalesce`` and ``max_instances`` chosen for it,
with the reason written next to it.  See docs/design/scheduling.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


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
        "next start (gateway/clock/).  One SQLite write a minute: SD-card wear.  "
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
