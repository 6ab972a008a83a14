"""Modbus RTU frames for relay boards: pymodbus's PDUs plus what relay boards add.

pymodbus owns the RTU framing (address, PDU, CRC-16) and the standard PDUs; this module
adds the one PDU relay boards bend, the timed pulse, and the pure checks that decide
whether a reply answers the request that was sent.  No I/O, no clock.

The RTU frame, as pymodbus builds and parses it (Modbus over Serial Line V1.02 §2.5.1)::

    [ silence ] [ slave id ][ function ][ data ... ][ CRC lo ][ CRC hi ]
      3.5 chars    1 byte      1 byte     0..252       2 bytes

Function codes the driver uses::

    0x01 read coils             reply: byte count, coil bits (LSB first)
    0x02 read discrete inputs   reply: byte count, input bits (LSB first)
    0x05 write single coil      reply: echo of address and value
    0x06 write single register  reply: echo of address and value
    0x8n exception response     reply: exception code (0x02 illegal data address, …)

Timed pulse ("flash on"): the board switches a relay on and, after a time it counts
itself, off again, so a crashed gateway cannot leave a door open.  Two conventions:

* ``PulseStyle.FLASH_COIL`` (Waveshare "Modbus RTU Relay" and compatibles): function
  0x05 to address ``0x0200 + channel`` whose *value* is the on-time in units of 100 ms
  (``01 05 02 00 00 07 …`` = relay 0 on for 700 ms).  The value is not the standard
  0xFF00/0x0000, so pymodbus's ``WriteSingleCoilRequest`` (which keeps only a bool)
  cannot carry it: ``WriteCoilPDU`` below keeps the raw 16-bit value both ways.
* ``PulseStyle.HOLDING_REGISTER``: function 0x06 to holding register
  ``base + channel`` (default base 0x0000), value = on-time in units of 100 ms.
"""

from __future__ import annotations

import enum
import math
import struct
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerRTU
from pymodbus.pdu import DecodePDU, ExceptionResponse, ModbusPDU
from pymodbus.pdu.bit_message import ReadCoilsRequest, ReadDiscreteInputsRequest
from pymodbus.pdu.register_message import WriteSingleRegisterRequest

from drivers.errors import BadFrameError, DeviceRejectedError

#: The two values function 0x05 accepts for a plain coil write (spec §6.5).
COIL_ON = 0xFF00
COIL_OFF = 0x0000
#: One unit of a board-timed pulse.
PULSE_UNIT_S = 0.1
#: The longest pulse a 16-bit value can ask for (6553.5 s).
MAX_PULSE_UNITS = 0xFFFF
#: Waveshare "flash on": function 0x05 to 0x0200 + relay number (development protocol V2).
FLASH_ON_BASE = 0x0200
#: Slave ids a master may address one at a time (0 is broadcast, 248-255 reserved).
MIN_SLAVE_ID = 1
MAX_SLAVE_ID = 247


class PulseStyle(enum.StrEnum):
    """How a board is asked for a timed pulse (see the module docstring)."""

    FLASH_COIL = "flash_coil"
    HOLDING_REGISTER = "holding_register"

    @property
    def default_base(self) -> int:
        """The address of channel 0's pulse command when the config names none."""
        return FLASH_ON_BASE if self is PulseStyle.FLASH_COIL else 0x0000


def pulse_units(seconds: float) -> int:
    """``seconds`` as a pulse value in 100 ms units, rounded up so a door never opens short.

    Raises ``ValueError`` outside 0 < seconds ≤ 6553.5.
    """
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"pulse time must be a positive number of seconds, got {seconds!r}")
    # Round away float noise first: 0.3 / 0.1 is 2.9999999999999996 and 0.7 / 0.1 is
    # 7.000000000000001; neither should lose or gain a unit.
    units = math.ceil(round(seconds / PULSE_UNIT_S, 6))
    if units > MAX_PULSE_UNITS:
        raise ValueError(
            f"pulse of {seconds} s exceeds the board's maximum of "
            f"{MAX_PULSE_UNITS * PULSE_UNIT_S:.1f} s"
        )
    return units


class WriteCoilPDU(ModbusPDU):
    """Function 0x05 with its raw 16-bit value, as request and as echoed reply.

    ``value`` is 0xFF00 (on) or 0x0000 (off) for a plain coil write, or the pulse length
    in 100 ms units for a Waveshare-style flash at ``FLASH_ON_BASE + channel``.
    """

    function_code = 5
    rtu_frame_size = 8  # id, function, address (2), value (2), CRC (2)

    def __init__(
        self, address: int = 0, value: int = 0, dev_id: int = 0, transaction_id: int = 0
    ) -> None:
        super().__init__(dev_id=dev_id, transaction_id=transaction_id, address=address)
        self.value = value

    def encode(self) -> bytes:
        """The PDU data after the function code: address, value."""
        self.verifyAddress()
        return struct.pack(">HH", self.address, self.value)

    def decode(self, data: bytes) -> None:
        """Parse address and value."""
        self.address, self.value = struct.unpack(">HH", data[:4])

    def __str__(self) -> str:
        return (
            f"WriteCoilPDU(dev_id={self.dev_id}, address={self.address:#06x}, "
            f"value={self.value:#06x})"
        )


def make_decoder(*, is_server: bool) -> Any:
    """pymodbus's PDU decoder with ``WriteCoilPDU`` in place of its function-0x05 classes.

    ``register`` copies pymodbus's table into this one instance, so other pymodbus users
    in the process keep the standard classes.
    """
    decoder = DecodePDU(is_server)
    decoder.register(WriteCoilPDU)
    return decoder


def make_framer(*, is_server: bool) -> Any:
    """An RTU framer (the production frame code) for a master or a simulated slave."""
    return FramerRTU(make_decoder(is_server=is_server))


def exception_name(code: int) -> str:
    """``ILLEGAL_ADDRESS`` for 2, and so on; the number when the code is not standard."""
    try:
        return ExcCodes(code).name
    except ValueError:
        return f"exception code {code:#04x}"


def check_reply(request: Any, reply: Any) -> None:
    """Raise unless ``reply`` is the answer to ``request``.

    RTU has no transaction id, so a late reply to an earlier request can arrive while
    the master waits for the next one.  Every field a reply echoes is compared:
    slave id, function code, bit count, written address and value.  A refusal from the
    right slave to this function raises ``DeviceRejectedError``; anything else that does
    not match raises ``BadFrameError`` (retryable).
    """
    fc = int(request.function_code)
    if reply.dev_id != request.dev_id:
        raise BadFrameError(f"reply from slave {reply.dev_id}, asked slave {request.dev_id}")
    if isinstance(reply, ExceptionResponse):
        if reply.function_code != (fc | 0x80):
            raise BadFrameError(
                f"exception reply to function {reply.function_code & 0x7F:#04x}, "
                f"asked function {fc:#04x}"
            )
        raise DeviceRejectedError(
            f"slave {request.dev_id} refused function {fc:#04x} at address "
            f"{request.address}: {exception_name(reply.exception_code)}"
        )
    if reply.function_code != fc:
        raise BadFrameError(f"reply to function {reply.function_code:#04x}, asked {fc:#04x}")
    if isinstance(request, ReadCoilsRequest | ReadDiscreteInputsRequest):
        # The reply's byte count must be exactly what this count needs.
        expected = 8 * math.ceil(request.count / 8)
        if len(reply.bits) != expected:
            raise BadFrameError(f"reply carries {len(reply.bits)} bits, {request.count} asked")
    elif isinstance(request, WriteCoilPDU):
        if (reply.address, reply.value) != (request.address, request.value):
            raise BadFrameError(
                f"write echo {reply.address:#06x}={reply.value:#06x} does not match "
                f"{request.address:#06x}={request.value:#06x}"
            )
    elif isinstance(request, WriteSingleRegisterRequest) and (
        reply.address != request.address or list(reply.registers) != list(request.registers)
    ):
        raise BadFrameError(
            f"register echo {reply.address}={list(reply.registers)} does not match "
            f"{request.address}={list(request.registers)}"
        )
