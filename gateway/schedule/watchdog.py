"""The systemd watchdog: :class:`Watchdog` pings ``$NOTIFY_SOCKET`` while every vital check
passes, and the vital checks themselves (:func:`threads_alive`, :func:`inbound_progress`,
:class:`PoolProbe`).  See docs/design/scheduling.md.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, Final

#: The logger of the module this one was split from (gateway/schedule.py):
#: log lines keep their name, and what reads them (a journal filter) still matches.
LOGGER = logging.getLogger("gateway.schedule")

#: The unit-pool probe's key on the unit executor: not a unit id (those are Stora ids).
PROBE_KEY: Final = "~watchdog-probe"
#: A watchdog period shorter than this is raised to it (below it, a busy Pi could miss
#: pings for no fault of the agent).
MIN_WATCHDOG_S: Final = 2.0

Vital = tuple[str, Callable[[], "str | None"]]


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
