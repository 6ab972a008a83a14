"""Relock deadlines on the monotonic clock, and the thread that says when one is due.

A wall-clock step (NTP at boot, ``date -s``) must not postpone a relock, so deadlines
are monotonic; the wall-clock ``relock_at`` in SQLite is only for finding overdue doors
after a restart (:mod:`gateway.units.relock`).
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Callable


class RelockTimers:
    """One deadline per unit; a later one supersedes an earlier one.

    :meth:`start` runs the timer thread, which calls ``on_due(unit)`` once per deadline
    reached (not superseded meanwhile).  The deadline itself stays until
    :meth:`cancel`: the relock that ``on_due`` starts decides whether it is over.
    """

    def __init__(self, mono: Callable[[], float]) -> None:
        self._mono = mono
        self._timers: list[tuple[float, str]] = []  # (monotonic deadline, unit)
        self._deadline: dict[str, float] = {}  # unit -> its current monotonic deadline
        self._timer_cv = threading.Condition()
        self._stop = threading.Event()
        self._on_due: Callable[[str], object] = lambda unit: None
        self.thread = threading.Thread(target=self._timer_loop, name="relock", daemon=True)

    def start(self, on_due: Callable[[str], object]) -> None:
        """Start the timer thread; ``on_due(unit)`` is called on it when a deadline passes."""
        self._on_due = on_due
        self.thread.start()

    def stop(self) -> None:
        """End the timer thread (waits up to 5 s); deadlines are kept (:meth:`units`)."""
        self._stop.set()
        with self._timer_cv:
            self._timer_cv.notify_all()
        if self.thread.is_alive():
            self.thread.join(timeout=5)

    def schedule_in(self, unit: str, seconds: float) -> None:
        """Make ``unit`` due ``seconds`` from now (at once when not positive)."""
        deadline = self._mono() + max(0.0, seconds)
        with self._timer_cv:
            self._deadline[unit] = deadline
            heapq.heappush(self._timers, (deadline, unit))
            self._timer_cv.notify()

    def deadline(self, unit: str) -> float | None:
        """``unit``'s current monotonic deadline, or ``None``."""
        return self._deadline.get(unit)

    def cancel(self, unit: str) -> None:
        """Forget ``unit``'s deadline (its door was locked)."""
        self._deadline.pop(unit, None)

    def units(self) -> list[str]:
        """Every unit with a deadline still set."""
        return list(self._deadline)

    def _timer_loop(self) -> None:
        while not self._stop.is_set():
            with self._timer_cv:
                due: list[str] = []
                now = self._mono()
                while self._timers and self._timers[0][0] <= now:
                    deadline, unit = heapq.heappop(self._timers)
                    if self._deadline.get(unit) == deadline:  # else superseded
                        due.append(unit)
                if not due:
                    wait = self._timers[0][0] - now if self._timers else 1.0
                    self._timer_cv.wait(timeout=min(max(wait, 0.01), 1.0))
                    continue
            for unit in due:
                self._on_due(unit)
