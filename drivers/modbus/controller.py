"""The ``modbus`` driver: locks on the relays of Modbus RTU relay boards.

One coil per lock (``point.channel`` = coil address, 0-based as on the wire).  What an
energized coil means depends on the lock (``point.energize_to``):

* ``"unlock"``: fail-secure strike, coil ON = unlocked, coil OFF = locked;
* ``"lock"``: fail-safe maglock, coil ON = locked, coil OFF = unlocked.

Inputs (discrete inputs, 0-based) are read with the same safe-side convention, so a cut
wire never reads as "secure":

* door contact (``point.door_input``): input ON = door closed (a normally-closed reed
  contact closed by the door's magnet); OFF = open;
* lock feedback (``point.status_input``): input ON = locked (the strike's monitor switch
  closed by the bolt); OFF = unlocked.  When configured, the lock state comes from this
  input; otherwise from reading the coil back.

Nothing is reported that was not read back from the board after the action
(``drivers.base`` truth rule).  Writes are absolute values (coil on/off, a pulse length),
so ``SerialBus`` may safely repeat one whose echo was lost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from drivers.base import (
    ActionResult,
    Clock,
    Controller,
    DoorState,
    Health,
    LockPoint,
    LockState,
    ProbeResult,
    Reading,
)
from drivers.errors import (
    BadFrameError,
    DeviceRejectedError,
    DriverError,
    UnsupportedError,
)
from drivers.health import HealthTracker
from drivers.link import SerialBus
from drivers.modbus.client import ModbusBus
from drivers.modbus.frames import (
    MAX_SLAVE_ID,
    MIN_SLAVE_ID,
    PULSE_UNIT_S,
    PulseStyle,
    pulse_units,
)
from drivers.modbus.settings import ModbusSettings
from drivers.settings import BuildContext, ControllerSettings, Probe

LOGGER = logging.getLogger(__name__)

#: A scan waits this long per address: a relay board answers a one-coil read in a few
#: character times plus its turnaround (tens of ms); 247 addresses take ~25 s.
SCAN_TIMEOUT_S = 0.1
#: Coil addresses are 16-bit (Modbus Application Protocol V1.1b3 §6.1).
MAX_ADDRESS = 0xFFFF


class ModbusController(Controller):
    """One Modbus RTU relay board (one slave id) on a shared ``ModbusBus``.

    ``channels`` and ``inputs`` are the board's coil and discrete-input counts; a point
    outside them is refused before any bus traffic.  With ``pulse`` the board times an
    unlock itself: ``pulse_style`` picks how it is asked (``PulseStyle.FLASH_COIL``, the
    Waveshare "flash on" at ``0x0200 + channel``, by default) and ``pulse_base``
    overrides the address of channel 0's pulse command.
    """

    def __init__(  # noqa: PLR0917 - the positional order is the driver contract's
        self,
        name: str,
        bus: ModbusBus,
        address: int,
        channels: int = 8,
        inputs: int = 8,
        pulse: bool = False,
        *,
        clock: Clock = time.monotonic,
        pulse_style: PulseStyle = PulseStyle.FLASH_COIL,
        pulse_base: int | None = None,
    ) -> None:
        if not MIN_SLAVE_ID <= address <= MAX_SLAVE_ID:
            raise ValueError(f"{name}: Modbus slave id must be 1-247, got {address}")
        if not 1 <= channels <= MAX_ADDRESS + 1 or not 0 <= inputs <= MAX_ADDRESS + 1:
            raise ValueError(f"{name}: bad board size ({channels} coils, {inputs} inputs)")
        self.name = name
        self.bus = bus
        self.address = address
        self.channels = channels
        self.inputs = inputs
        self.pulse = pulse
        self.pulse_style = pulse_style
        self.pulse_base = pulse_style.default_base if pulse_base is None else pulse_base
        self._clock = clock
        self._health = HealthTracker(clock)

    @property
    def self_relocking(self) -> bool:
        """True with ``pulse``: the board ends a timed unlock (fail-secure locks only)."""
        return self.pulse

    # -- actions -----------------------------------------------------------------------
    def unlock(self, point: LockPoint, seconds: float) -> ActionResult:
        """Unlock for ``seconds``: a board-timed pulse with ``pulse``, else a coil write.

        A pulse energizes the coil, which unlocks only a fail-secure lock; a fail-safe
        lock (``energize_to="lock"``) is unlocked by de-energizing, which no board times,
        so it gets a plain coil write and the agent must relock (``self_relocking`` is
        False and the detail says so).
        """
        self._check_point(point)
        if not seconds > 0:
            raise ValueError(f"unlock time must be positive, got {seconds!r} s")
        board_timed = self.pulse and point.energize_to == "unlock"
        with self._health.track(), self.bus.lock:
            if board_timed:
                units = self._pulse(point.channel, seconds)
                detail = f"board-timed pulse of {units * PULSE_UNIT_S:.1f} s; the board relocks"
            else:
                self.bus.write_coil(self.address, point.channel, point.energize_to == "unlock")
                detail = f"coil written; the agent must relock after {seconds:g} s"
                if self.pulse:
                    detail += " (fail-safe lock: a board pulse would lock it, not unlock it)"
            attempts = self.bus.last_attempts
            reading = self._read_points([point])[0]
        confirmed = reading.lock is LockState.UNLOCKED
        if not confirmed:
            detail += f"; read-back shows {reading.lock.value}"
        return ActionResult(confirmed, reading, detail, board_timed, attempts)

    def lock(self, point: LockPoint) -> ActionResult:
        """Lock now: write the coil to the locked polarity (ending any pulse), read back."""
        self._check_point(point)
        with self._health.track(), self.bus.lock:
            self.bus.write_coil(self.address, point.channel, point.energize_to == "lock")
            attempts = self.bus.last_attempts
            reading = self._read_points([point])[0]
        confirmed = reading.lock is LockState.LOCKED
        detail = "coil written" if confirmed else f"read-back shows {reading.lock.value}"
        return ActionResult(confirmed, reading, detail, False, attempts)

    def _pulse(self, channel: int, seconds: float) -> int:
        try:
            units = pulse_units(seconds)
        except ValueError as exc:
            raise UnsupportedError(f"{self.name}: {exc}") from exc
        address = self.pulse_base + channel
        if self.pulse_style is PulseStyle.FLASH_COIL:
            self.bus.write_coil_raw(self.address, address, units)
        else:
            self.bus.write_register(self.address, address, units)
        return units

    # -- reading -----------------------------------------------------------------------
    def read(self, point: LockPoint) -> Reading:
        """Read the coil (and the point's inputs) back from the board."""
        return self.read_many([point])[0]

    def read_many(self, points: Sequence[LockPoint]) -> list[Reading]:
        """Read points with one read-coils and at most one read-inputs request."""
        if not points:
            return []
        for point in points:
            self._check_point(point)
        with self._health.track(), self.bus.lock:
            return self._read_points(points)

    def _read_points(self, points: Sequence[LockPoint]) -> list[Reading]:
        coils = self._read_span(self.bus.read_coils, [p.channel for p in points])
        wanted = [n for p in points for n in (p.door_input, p.status_input) if n is not None]
        inputs = self._read_span(self.bus.read_discrete_inputs, wanted)
        at = self._clock()
        return [Reading(_lock_state(p, coils, inputs), _door_state(p, inputs), at) for p in points]

    def _read_span(self, read: Any, numbers: Iterable[int]) -> dict[int, bool]:
        wanted = sorted(set(numbers))
        if not wanted:
            return {}
        first = wanted[0]
        bits = read(self.address, first, wanted[-1] - first + 1)
        return {first + i: bit for i, bit in enumerate(bits)}

    def _check_point(self, point: LockPoint) -> None:
        if not 0 <= point.channel < self.channels:
            raise UnsupportedError(
                f"{self.name}: channel {point.channel} is not a coil of this "
                f"{self.channels}-channel board (channels are 0-based)"
            )
        for what, n in (("door_input", point.door_input), ("status_input", point.status_input)):
            if n is not None and not 0 <= n < self.inputs:
                raise UnsupportedError(
                    f"{self.name}: {what} {n} is not an input of this board "
                    f"({self.inputs} inputs, 0-based)"
                )

    # -- health ------------------------------------------------------------------------
    def health(self) -> Health:
        """This board's health as last observed (no I/O)."""
        h = self._health
        online = h.last_ok_at is not None and h.failures == 0
        online = online and self.bus.serial_bus.is_open
        if online:
            detail = "ok" if h.last_error is None else f"answering; {h.last_error}"
        elif h.last_error:
            detail = h.last_error
        elif h.last_ok_at is not None:
            detail = self.bus.serial_bus.health().detail
        else:
            detail = "not yet contacted"
        return h.health(online, detail)

    def probe(self) -> Health:
        """Read coil 0 once and return the resulting health."""
        try:
            with self._health.track():
                self.bus.read_coils(self.address, 0, 1)
        except DriverError as exc:
            LOGGER.debug("%s: probe failed: %s", self.name, exc)
        return self.health()


def _lock_state(point: LockPoint, coils: dict[int, bool], inputs: dict[int, bool]) -> LockState:
    if point.status_input is not None:
        return LockState.LOCKED if inputs[point.status_input] else LockState.UNLOCKED
    energized = coils[point.channel]
    unlocked = energized if point.energize_to == "unlock" else not energized
    return LockState.UNLOCKED if unlocked else LockState.LOCKED


def _door_state(point: LockPoint, inputs: dict[int, bool]) -> DoorState:
    if point.door_input is None:
        return DoorState.UNKNOWN
    return DoorState.CLOSED if inputs[point.door_input] else DoorState.OPEN


def scan(
    bus: ModbusBus, addresses: Iterable[int], *, timeout_s: float = SCAN_TIMEOUT_S
) -> list[ProbeResult]:
    """Ask each slave id for coil 0 and list the ones that answered.

    Any reply counts, an exception response too (something with that id is on the
    bus).  Silence is not retried; garbled replies are (by ``SerialBus``) and, if they
    stay garbled, are listed with a hint, since a wrong baud rate looks exactly so.
    ``LinkDownError`` ends the scan: there is no bus to scan.
    """
    found: list[ProbeResult] = []
    for address in addresses:
        try:
            bits = bus.ping(address, timeout_s)
        except DeviceRejectedError as exc:
            found.append(
                ProbeResult(address, "answered with a Modbus exception", {"error": str(exc)})
            )
            continue
        except BadFrameError as exc:
            found.append(
                ProbeResult(
                    address,
                    "garbled replies: check baud rate, parity and A/B wiring",
                    {"error": str(exc)},
                )
            )
            continue
        if bits is not None:
            found.append(
                ProbeResult(address, "Modbus relay board", {"coil0": "on" if bits[0] else "off"})
            )
    return found


def build(settings: ControllerSettings, ctx: BuildContext) -> Controller:
    """A board on its bus (:mod:`drivers.registry`); the boards of one bus share a client."""
    assert isinstance(settings, ModbusSettings)
    assert ctx.bus is not None
    key = ("modbus", ctx.bus.url)
    if key not in ctx.shared:
        ctx.shared[key] = ModbusBus(ctx.bus)
    client = ctx.shared[key]
    assert isinstance(client, ModbusBus)
    return ModbusController(
        ctx.name,
        client,
        settings.address,
        channels=settings.channels,
        inputs=settings.inputs,
        pulse=settings.pulse,
        pulse_style=PulseStyle(settings.pulse_style),
        pulse_base=settings.pulse_base,
    )


def probe(bus: SerialBus, shared: Mapping[tuple[str, str], object] | None,
          timeout_s: float | None) -> Probe:
    """One address of a bus scan (:mod:`drivers.registry`): one transaction each."""
    # The site's own Modbus client for that bus when it has one (no second client).
    found = shared.get(("modbus", bus.url)) if shared is not None else None
    client = found if isinstance(found, ModbusBus) else ModbusBus(bus)
    wait = SCAN_TIMEOUT_S if timeout_s is None else timeout_s

    def ask(address: int) -> ProbeResult | None:
        answered = scan(client, [address], timeout_s=wait)
        return answered[0] if answered else None

    return ask
