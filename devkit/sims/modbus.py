"""Simulated Modbus RTU relay boards, speaking the real protocol on a pty.

Built from the production frame code: requests are parsed and replies built by the same
pymodbus classes the driver uses (``FramerRTU`` over pymodbus's server-side
``DecodePDU``, with the driver's ``WriteCoilPDU`` for function 0x05), so a frame bug
shows up here as it would on a real bus.

``RelayBoard`` is one board's device model: coils (relays), discrete inputs (door
contacts, lock feedback), both pulse conventions of ``drivers.modbus.frames`` (the board
switches the coil off by itself when the time is up, on an injectable clock), exception
responses for addresses the board lacks, and device faults:

* ``jam(channel)``: the lock-feedback input wired to that relay stops following it;
* ``stick_relay(channel)``: writes are acknowledged but the relay does not move;
* ``hold_door_open(input)``: the door contact reads open whatever the door helpers say;
* ``reply_as``: the board answers with another slave id (a mis-set address switch).

``ModbusSimulator`` is the ``Responder`` for a bus of such boards: it answers only the
slave ids it models and stays silent otherwise, like a real RS-485 bus.
``ModbusSimBus`` puts one on a ``PtyPort`` with a ``SimulatorServer`` (transport faults:
no reply, late reply, corruption, garbage).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from pymodbus.constants import ExcCodes
from pymodbus.exceptions import ModbusIOException
from pymodbus.framer.rtu import FramerRTU
from pymodbus.pdu import ExceptionResponse
from pymodbus.pdu.bit_message import (
    ReadCoilsRequest,
    ReadCoilsResponse,
    ReadDiscreteInputsRequest,
    ReadDiscreteInputsResponse,
    WriteMultipleCoilsRequest,
    WriteMultipleCoilsResponse,
)
from pymodbus.pdu.register_message import WriteSingleRegisterRequest, WriteSingleRegisterResponse

from devkit.pty import PtyPort
from devkit.sims.base import SimulatorServer, TransportFaults
from drivers.base import Clock, LockState
from drivers.modbus.frames import (
    COIL_OFF,
    COIL_ON,
    FLASH_ON_BASE,
    PULSE_UNIT_S,
    WriteCoilPDU,
    make_framer,
)

LOGGER = logging.getLogger(__name__)

#: RTU ends a frame at a silence (spec §2.5.1.1); on a pty, scheduling jitter is far
#: longer than 3.5 characters, so a partial frame is dropped after this much silence.
FRAME_SILENCE_S = 0.05
#: Most bits one read may ask for (Modbus Application Protocol §6.1-6.2).
MAX_READ_BITS = 2000

EnergizeTo = Literal["unlock", "lock"]


@dataclass(slots=True)
class ChannelFaults:
    """Device faults of one relay; change the fields while the simulator runs."""

    jammed: bool = False
    relay_stuck: bool = False


class RelayBoard:
    """One simulated relay board (one slave id).  Thread-safe."""

    def __init__(
        self,
        slave_id: int,
        coils: int = 8,
        inputs: int = 8,
        *,
        clock: Clock = time.monotonic,
        flash_base: int = FLASH_ON_BASE,
        register_base: int = 0x0000,
    ) -> None:
        self.slave_id = slave_id
        self.reply_as: int | None = None
        self.flash_base = flash_base
        self.register_base = register_base
        self.faults = [ChannelFaults() for _ in range(coils)]
        self._clock = clock
        self._lock = threading.RLock()
        self._coils = [False] * coils
        self._pulse_until: dict[int, float] = {}
        # Unwired inputs read ON: door contacts closed, the idle state of a site.
        self._inputs = [True] * inputs
        self._feedback: dict[int, tuple[int, EnergizeTo]] = {}
        self._frozen: dict[int, bool] = {}
        self._held_open: set[int] = set()

    @property
    def coil_count(self) -> int:
        """Number of relays."""
        return len(self._coils)

    @property
    def input_count(self) -> int:
        """Number of discrete inputs."""
        return len(self._inputs)

    # -- the world outside the board (test helpers) -----------------------------------
    def coil(self, channel: int) -> bool:
        """The relay's true state now (a pulse that ran out is off)."""
        with self._lock:
            until = self._pulse_until.get(channel)
            if until is not None and self._clock() >= until:
                del self._pulse_until[channel]
                self._coils[channel] = False
            return self._coils[channel]

    def lock_state(self, channel: int, energize_to: EnergizeTo = "unlock") -> LockState:
        """Whether the lock on ``channel`` is truly locked, from the relay's state."""
        energized = self.coil(channel)
        unlocked = energized if energize_to == "unlock" else not energized
        return LockState.UNLOCKED if unlocked else LockState.LOCKED

    def input(self, number: int) -> bool:
        """A discrete input as the board would report it now."""
        with self._lock:
            if number in self._held_open:
                return False
            wired = self._feedback.get(number)
            if wired is None:
                return self._inputs[number]
            channel, energize_to = wired
            value = self.lock_state(channel, energize_to) is LockState.LOCKED
            if self.faults[channel].jammed:
                return self._frozen.setdefault(number, value)
            self._frozen[number] = value
            return value

    def set_input(self, number: int, on: bool) -> None:
        """Drive a plain input (one not wired as lock feedback)."""
        with self._lock:
            self._inputs[number] = on

    def open_door(self, number: int) -> None:
        """Open the door whose contact is on input ``number`` (contact opens: OFF)."""
        self.set_input(number, False)

    def close_door(self, number: int) -> None:
        """Close that door (contact closed: ON)."""
        self.set_input(number, True)

    def hold_door_open(self, number: int, held: bool = True) -> None:
        """Fault: the door on input ``number`` stays open (propped, or contact broken)."""
        with self._lock:
            (self._held_open.add if held else self._held_open.discard)(number)

    def wire_lock_feedback(
        self, channel: int, number: int, energize_to: EnergizeTo = "unlock"
    ) -> None:
        """Wire input ``number`` to the monitor switch of the lock on ``channel`` (ON = locked)."""
        with self._lock:
            self._feedback[number] = (channel, energize_to)
            self._frozen.pop(number, None)

    def jam(self, channel: int, jammed: bool = True) -> None:
        """Fault: the lock on ``channel`` stops moving, so its feedback input freezes."""
        with self._lock:
            for number, (ch, _) in self._feedback.items():
                if ch == channel:
                    self.input(number)  # freeze the value it shows now
            self.faults[channel].jammed = jammed

    def stick_relay(self, channel: int, stuck: bool = True) -> None:
        """Fault: writes to ``channel`` are acknowledged but the relay stays as it is."""
        with self._lock:
            self.faults[channel].relay_stuck = stuck

    def set_coil(self, channel: int, on: bool) -> None:
        """Set a relay as a write would (a stuck relay ignores it), ending any pulse."""
        with self._lock:
            if self.faults[channel].relay_stuck:
                return
            self._pulse_until.pop(channel, None)
            self._coils[channel] = on

    def start_pulse(self, channel: int, seconds: float) -> None:
        """Switch the relay on; the board switches it off after ``seconds``."""
        with self._lock:
            if self.faults[channel].relay_stuck:
                return
            self._coils[channel] = True
            self._pulse_until[channel] = self._clock() + seconds

    # -- the protocol -----------------------------------------------------------------
    def handle(self, request: Any) -> Any:
        """The reply PDU to a decoded request PDU (an ``ExceptionResponse`` if refused)."""
        with self._lock:
            code = self._dispatch(request)
            if isinstance(code, ExcCodes):
                return ExceptionResponse(request.function_code, code)
            return code

    def _dispatch(self, req: Any) -> Any:
        # ReadDiscreteInputsRequest subclasses ReadCoilsRequest: test it first.
        if isinstance(req, ReadDiscreteInputsRequest):
            if err := _check_span(req.address, req.count, self.input_count):
                return err
            bits = [self.input(req.address + i) for i in range(req.count)]
            return ReadDiscreteInputsResponse(bits=bits)
        if isinstance(req, ReadCoilsRequest):
            if err := _check_span(req.address, req.count, self.coil_count):
                return err
            return ReadCoilsResponse(bits=[self.coil(req.address + i) for i in range(req.count)])
        if isinstance(req, WriteCoilPDU):
            return self._write_coil(req)
        if isinstance(req, WriteMultipleCoilsRequest):
            if err := _check_span(req.address, req.count, self.coil_count):
                return err
            for i, bit in enumerate(req.bits[: req.count]):
                self.set_coil(req.address + i, bool(bit))
            return WriteMultipleCoilsResponse(address=req.address, count=req.count)
        if isinstance(req, WriteSingleRegisterRequest):
            return self._write_register(req)
        return ExcCodes.ILLEGAL_FUNCTION

    def _write_coil(self, req: Any) -> Any:
        address, value = req.address, req.value
        if address < self.coil_count:
            if value not in (COIL_ON, COIL_OFF):
                return ExcCodes.ILLEGAL_VALUE
            self.set_coil(address, value == COIL_ON)
        elif 0 <= address - self.flash_base < self.coil_count:
            if value == 0:
                return ExcCodes.ILLEGAL_VALUE
            self.start_pulse(address - self.flash_base, value * PULSE_UNIT_S)
        else:
            return ExcCodes.ILLEGAL_ADDRESS
        return WriteCoilPDU(address, value)

    def _write_register(self, req: Any) -> Any:
        channel = req.address - self.register_base
        if not 0 <= channel < self.coil_count:
            return ExcCodes.ILLEGAL_ADDRESS
        value = int(req.registers[0])
        if value:
            self.start_pulse(channel, value * PULSE_UNIT_S)
        else:
            self.set_coil(channel, False)  # a zero pulse ends one early
        return WriteSingleRegisterResponse(address=req.address, registers=[value])


def _check_span(address: int, count: int, size: int) -> ExcCodes | None:
    if not 1 <= count <= MAX_READ_BITS:
        return ExcCodes.ILLEGAL_VALUE
    if address + count > size:
        return ExcCodes.ILLEGAL_ADDRESS
    return None


class ModbusSimulator:
    """A ``Responder`` for a bus of ``RelayBoard``s: answers their slave ids only.

    ``requests`` counts every well-formed request seen, by slave id (whoever it was for);
    slave id 0 is a broadcast: writes reach every board and nobody replies.
    """

    def __init__(self, boards: Iterable[RelayBoard], *, frame_silence_s: float = FRAME_SILENCE_S):
        self.boards = {board.slave_id: board for board in boards}
        self.requests: Counter[int] = Counter()
        self._framer = make_framer(is_server=True)
        self._buffer = b""
        self._frame_silence_s = frame_silence_s
        self._last_rx = -math.inf

    def feed(self, data: bytes) -> list[bytes]:
        """Take bytes from the bus; return the frames to send back."""
        now = time.monotonic()
        if now - self._last_rx > self._frame_silence_s:
            self._buffer = b""  # a silence ended whatever was half received
        self._last_rx = now
        self._buffer += data
        replies: list[bytes] = []
        while self._buffer:
            try:
                used, pdu = self._framer.handleFrame(self._first_frame(self._buffer), 0, 0)
            except ModbusIOException:
                LOGGER.debug("sim: undecodable frame %s", self._buffer.hex(" "))
                self._buffer = b""
                break
            self._buffer = self._buffer[used:]
            if pdu is None:
                break
            reply = self._answer(pdu)
            if reply is not None:
                replies.append(reply)
        return replies

    def _first_frame(self, buffer: bytes) -> bytes:
        """The leading frame of ``buffer`` when it is whole and sound, else all of it.

        pymodbus's RTU framer assumes one frame per buffer (a master waits for each
        reply) and drops whatever follows the first frame; but a retry can queue behind
        a request the simulator has not read yet, and a real board answers both.
        """
        if len(buffer) < FramerRTU.MIN_SIZE:
            return buffer
        pdu_class = self._framer.decoder.lookupPduClass(buffer)
        if pdu_class is None:
            return buffer
        size = int(pdu_class.calculateRtuFrameSize(buffer) or 0)
        if size < FramerRTU.MIN_SIZE or size > len(buffer):
            return buffer
        crc = int.from_bytes(buffer[size - 2:size], "big")
        if not FramerRTU.check_CRC(buffer[:size - 2], crc):
            return buffer
        return buffer[:size]

    def _answer(self, pdu: Any) -> bytes | None:
        slave = int(pdu.dev_id)
        self.requests[slave] += 1
        if slave == 0:
            for board in self.boards.values():
                board.handle(pdu)
            return None
        addressed = self.boards.get(slave)
        if addressed is None:
            return None
        reply = addressed.handle(pdu)
        reply.dev_id = slave if addressed.reply_as is None else addressed.reply_as
        return bytes(self._framer.buildFrame(reply))


class ModbusSimBus:
    """Simulated relay boards served on a pty at ``path``; a context manager.

    ``faults`` switches transport faults (``devkit.sims.base.TransportFaults``); each
    board's device faults are on ``board(slave)``.  Used by the tests and by
    ``stora-gateway demo``.
    """

    def __init__(
        self,
        path: str | Path,
        slaves: Iterable[int] = (1,),
        coils: int = 8,
        inputs: int = 8,
        *,
        clock: Clock = time.monotonic,
        seed: int = 0,
    ) -> None:
        boards = [RelayBoard(s, coils, inputs, clock=clock) for s in slaves]
        self.simulator = ModbusSimulator(boards)
        self.faults = TransportFaults()
        self.port = PtyPort(path)
        self.server = SimulatorServer(self.port, self.simulator, self.faults, seed=seed)
        self.server.start()

    @property
    def path(self) -> Path:
        """Where the driver opens the bus."""
        return self.port.path

    def board(self, slave: int | None = None) -> RelayBoard:
        """The board with slave id ``slave`` (the first one by default)."""
        if slave is None:
            return next(iter(self.simulator.boards.values()))
        return self.simulator.boards[slave]

    def close(self) -> None:
        """Stop serving and remove the pty."""
        self.server.stop()
        self.port.close()

    def __enter__(self) -> ModbusSimBus:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
