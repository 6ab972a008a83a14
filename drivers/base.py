"""The driver interface: what the gateway may ask of any lock controller.

A *controller* is one addressable board (a Modbus relay board, a lock-control board, an
OSDP peripheral, a Zigbee lock bridge).  It drives *points*: one lock each, named by a
channel (relay, coil, lock or output number) and optionally a door contact input.

Truth rule: a state is only ever reported from reading the hardware back.  Having sent a
frame proves nothing; ``ActionResult.confirmed`` is true only when a read-back after the
action shows the asked-for state.  Anything the driver could not read is ``UNKNOWN``.

This module never imports ``gateway``: drivers know bytes, buses and devices, not sites.
"""

from __future__ import annotations

import enum
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

Clock = Callable[[], float]
"""A monotonic clock in seconds (``time.monotonic`` in production, a fake in tests)."""

Sleep = Callable[[float], None]


class LockState(enum.StrEnum):
    """What the hardware says about a lock."""

    LOCKED = "locked"
    UNLOCKED = "unlocked"
    UNKNOWN = "unknown"


class DoorState(enum.StrEnum):
    """What a door contact says; ``UNKNOWN`` when there is no contact or no reading."""

    OPEN = "open"
    CLOSED = "closed"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class LockPoint:
    """One lock on a controller, as the driver needs to know it.

    ``channel`` is 0-based on every driver (the wire numbering is the driver's business).
    ``energize_to`` says what powering the output does: ``"unlock"`` for a fail-secure
    strike (locked without power), ``"lock"`` for a fail-safe maglock (open without power).
    ``status_input`` is an optional lock-feedback input (a strike's monitor switch).
    """

    channel: int
    door_input: int | None = None
    energize_to: Literal["unlock", "lock"] = "unlock"
    status_input: int | None = None
    device: str | None = None


@dataclass(frozen=True, slots=True)
class Reading:
    """A read-back of one point; ``at`` is the monotonic time of the read."""

    lock: LockState
    door: DoorState
    at: float


@dataclass(frozen=True, slots=True)
class ActionResult:
    """The outcome of ``unlock`` or ``lock``.

    ``confirmed`` is true only when the read-back shows the asked-for state.
    ``self_relocking`` is true when the controller itself ends the unlock (a board pulse),
    so a crash of the gateway cannot leave the door open.
    """

    confirmed: bool
    reading: Reading
    detail: str = ""
    self_relocking: bool = False
    attempts: int = 1


@dataclass(frozen=True, slots=True)
class Health:
    """A controller's health as last observed."""

    online: bool
    detail: str
    last_error: str | None = None
    last_ok_at: float | None = None
    consecutive_failures: int = 0


@dataclass(frozen=True, slots=True)
class Notice:
    """Something a controller noticed on its own that a person should hear about.

    ``kind`` is the alarm kind published as is (``"battery_low"``, …); ``device`` or
    ``channel`` names the lock it concerns (``None`` for the controller as a whole).
    """

    kind: str
    detail: str
    device: str | None = None
    channel: int | None = None


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One address on a bus that answered a ``scan``."""

    address: int
    description: str
    extra: dict[str, str] = field(default_factory=dict)


class Controller(ABC):
    """One lock controller.  Methods are blocking and thread-safe per bus.

    Errors: :mod:`drivers.errors`.  ``unlock``/``lock``/``read`` raise a
    ``RetryableError`` when the controller could not be talked to (after the driver's own
    bounded retries) and a ``TechnicianError`` when it refused; a lock that answered but
    did not move returns ``confirmed=False`` instead.
    """

    name: str

    @abstractmethod
    def unlock(self, point: LockPoint, seconds: float) -> ActionResult:
        """Unlock ``point`` for ``seconds`` and confirm by reading back."""

    @abstractmethod
    def lock(self, point: LockPoint) -> ActionResult:
        """Lock ``point`` now and confirm by reading back."""

    @abstractmethod
    def read(self, point: LockPoint) -> Reading:
        """Read the lock and door state of ``point`` from the hardware."""

    def read_many(self, points: Sequence[LockPoint]) -> list[Reading]:
        """Read several points; drivers with a read-all request override this."""
        return [self.read(p) for p in points]

    @abstractmethod
    def health(self) -> Health:
        """The controller's health as last observed (no I/O)."""

    @abstractmethod
    def probe(self) -> Health:
        """Talk to the controller once and return its health (I/O)."""

    @property
    def self_relocking(self) -> bool:
        """True when this controller ends a timed unlock by itself."""
        return False

    def notices(self) -> list[Notice]:
        """Notices raised since the last call, oldest first (no I/O); none by default.

        For what a device reports unasked (a low battery); the gateway publishes each
        as an alarm.  What ``health()`` or a failed read already says is not repeated.
        """
        return []

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release the port or link."""


def unknown_reading(clock: Clock = time.monotonic) -> Reading:
    """A reading that claims nothing."""
    return Reading(LockState.UNKNOWN, DoorState.UNKNOWN, clock())
