"""The health bookkeeping every controller keeps: when it last answered, its last error,
how many operations in a row failed.

:class:`HealthTracker` holds the three and the rules every driver applies to them: an
operation that worked clears the error and the count; one that failed counts; one the
device refused (a :class:`~drivers.errors.TechnicianError`) proves the device is there,
so it counts as an answer that leaves its reason behind.  What ``online`` means and what
the detail says stays each driver's own (a board, a PD and a bridge differ), but every
:class:`~drivers.base.Health` is made here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from drivers.base import Clock, Health
from drivers.errors import DriverError, TechnicianError

__all__ = ["HealthTracker"]


class HealthTracker:
    """``last_ok_at``, ``last_error`` and ``failures`` of one controller.

    Not locked: each driver calls it under whatever lock guards its own state.
    """

    __slots__ = ("_clock", "failures", "last_error", "last_ok_at")

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        #: Monotonic time of the last exchange that proved the device there.
        self.last_ok_at: float | None = None
        self.last_error: str | None = None
        #: Consecutive failed operations.
        self.failures = 0

    def succeeded(self) -> None:
        """An operation worked: the device answered and nothing is wrong."""
        self.last_ok_at = self._clock()
        self.failures = 0
        self.last_error = None

    def answered(self, error: str) -> None:
        """The device answered but refused: it is there; the error is a person's job."""
        self.last_ok_at = self._clock()
        self.failures = 0
        self.last_error = error

    def failed(self, error: str) -> None:
        """An operation failed: one more in a row."""
        self.failures += 1
        self.last_error = error

    def cleared(self) -> None:
        """The device is back (a new session, a report): no failure, no error, for now."""
        self.failures = 0
        self.last_error = None

    @contextmanager
    def track(self) -> Iterator[None]:
        """Record the outcome of the operation run in the block (its error re-raised)."""
        try:
            yield
        except TechnicianError as exc:
            self.answered(str(exc))
            raise
        except DriverError as exc:
            self.failed(str(exc))
            raise
        self.succeeded()

    def health(self, online: bool, detail: str) -> Health:
        """The :class:`Health` to report, with this record's error, time and count."""
        return Health(online, detail, self.last_error, self.last_ok_at, self.failures)
