"""A wall clock the agent can trust, or says why not (contract reason ``clock_untrusted``).

* :mod:`gateway.clock.trusted`: :class:`TrustedClock`, the rule and the second source;
* :mod:`gateway.clock.floor`: the stored floor and proven time, and their reset;
* :mod:`gateway.clock.kernel`: whether the kernel says the clock is synchronized.

Wall time is for judging freshness and for timestamps; waiting (timeouts, backoff)
belongs on the monotonic clock, so a jump cannot stretch or shorten it (fault matrix #39).
See docs/design/clock.md.
"""

from gateway.clock.floor import (
    BUILD_FLOOR,
    FLOOR_KEY,
    FLOOR_MARGIN_S,
    PROVEN_KEY,
    RESET_NOTE_KEY,
    MetaStore,
    reset_stored_floor,
    stored_floor,
)
from gateway.clock.kernel import SYNCHRONIZED_FLAG_FILE, kernel_synchronized
from gateway.clock.trusted import (
    JUMP_THRESHOLD_S,
    SERVER_TIME_PROBE_S,
    SERVER_TIME_TOLERANCE_S,
    STEP_ALARM_S,
    ClockMode,
    TrustedClock,
)
from sitelink.payloads import rfc3339  # the one time format of the gateway (contract §4)

__all__ = [
    "BUILD_FLOOR",
    "FLOOR_KEY",
    "FLOOR_MARGIN_S",
    "JUMP_THRESHOLD_S",
    "PROVEN_KEY",
    "RESET_NOTE_KEY",
    "SERVER_TIME_PROBE_S",
    "SERVER_TIME_TOLERANCE_S",
    "STEP_ALARM_S",
    "SYNCHRONIZED_FLAG_FILE",
    "ClockMode",
    "MetaStore",
    "TrustedClock",
    "kernel_synchronized",
    "reset_stored_floor",
    "rfc3339",
    "stored_floor",
]
