"""The agent's periodic jobs, in one table, on APScheduler 3; and the systemd watchdog.

* :mod:`gateway.schedule.jobs`: the job table, :data:`JOBS`;
* :mod:`gateway.schedule.scheduler`: :class:`SiteScheduler` and its wall-clock jump guards;
* :mod:`gateway.schedule.watchdog`: :class:`Watchdog` and the vital checks.

See docs/design/scheduling.md.
"""

from gateway.schedule.jobs import JOBS, JobSpec
from gateway.schedule.scheduler import (
    JUMP_THRESHOLD_S,
    MAX_WAIT_S,
    POOL_WORKERS,
    JumpDetector,
    SiteScheduler,
)
from gateway.schedule.watchdog import (
    MIN_WATCHDOG_S,
    PROBE_KEY,
    PoolProbe,
    Vital,
    Watchdog,
    inbound_progress,
    threads_alive,
    watchdog_period,
)

__all__ = [
    "JOBS",
    "JUMP_THRESHOLD_S",
    "MAX_WAIT_S",
    "MIN_WATCHDOG_S",
    "POOL_WORKERS",
    "PROBE_KEY",
    "JobSpec",
    "JumpDetector",
    "PoolProbe",
    "SiteScheduler",
    "Vital",
    "Watchdog",
    "inbound_progress",
    "threads_alive",
    "watchdog_period",
]
