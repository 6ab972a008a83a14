"""The Modbus link: pymodbus's RTU client running on a port that ``SerialBus`` owns.

pymodbus brings the PDUs, the RTU framing and the reply hunting; ``SerialBus`` brings
the port (opened by an injected factory from a pyserial URL), the one-transaction-at-a-
time lock, the inter-frame gap, the bounded retries and the reopen backoff.  So that
retry policy lives in exactly one place, pymodbus runs with ``retries=0`` and never
opens or closes the port: ``_BusClient.connect()`` takes the port the bus lends it for
one exchange, and its ``close()`` (which pymodbus calls on a port error) only lets go,
leaving the bus to close and reopen the port.

Every pymodbus or port exception is translated in ``_translate`` (the one boundary):

=====================================  =======================  =====================
what happened                          pymodbus says            driver error
=====================================  =======================  =====================
nothing came back within the timeout   ModbusIOException        NoReplyError
bytes came back but no valid frame     ModbusIOException        BadFrameError
(bad CRC, another slave id, garbage)
the port failed                        ConnectionException,     LinkDownError
                                       OSError
a valid reply to something else        (a PDU)                  BadFrameError
an exception response                  (a PDU, isError())       DeviceRejectedError
=====================================  =======================  =====================

pymodbus discards a frame whose CRC fails or whose slave id is not the one asked and
keeps listening until the timeout, so "no frame" is only known at the timeout; the
packet trace tells a silent line (no reply) from a noisy one (bad frame).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

from pymodbus.client import ModbusSerialClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.pdu.bit_message import ReadCoilsRequest, ReadDiscreteInputsRequest
from pymodbus.pdu.register_message import WriteSingleRegisterRequest

from drivers.errors import BadFrameError, DriverError, LinkDownError, NoReplyError
from drivers.link import SerialBus
from drivers.modbus.frames import COIL_OFF, COIL_ON, WriteCoilPDU, check_reply

LOGGER = logging.getLogger(__name__)


#: Slave id, function code, and the byte count (or first data byte) of a reply.
RTU_HEADER = 3
#: Replies that echo the request: write single coil/register, write multiple.
_ECHO_FUNCTIONS = frozenset({0x05, 0x06, 0x0F, 0x10})
#: Replies that carry a byte count in their third byte: read coils/inputs/registers.
_COUNTED_FUNCTIONS = frozenset({0x01, 0x02, 0x03, 0x04})


def rtu_reply_length(header: bytes) -> int:
    """Total length of the RTU reply that starts with ``header`` (3 bytes).

    An unknown function code yields the header length, so the caller returns what it
    has and pymodbus's frame hunting decides (then the attempt fails and is retried).
    """
    function = header[1]
    if function & 0x80:  # exception response: id, function, code, CRC
        return 5
    if function in _COUNTED_FUNCTIONS:
        return RTU_HEADER + header[2] + 2
    if function in _ECHO_FUNCTIONS:
        return 8
    return len(header)


class _BusClient(ModbusSerialClient):
    """pymodbus's sync RTU client, lent a port by ``SerialBus`` for one exchange."""

    def __init__(self, url: str, baudrate: int, timeout_s: float) -> None:
        super().__init__(
            url,
            baudrate=baudrate,
            timeout=timeout_s,
            retries=0,  # SerialBus.transact retries; two layers would multiply attempts
            trace_packet=self._trace_packet,
        )
        self.register(WriteCoilPDU)  # keeps function 0x05's raw value (timed flash)
        # pymodbus counts timeouts to decide when to give up on a link; that is
        # SerialBus's decision, so the count never runs out here.
        self.set_max_no_responses(sys.maxsize)
        self.heard = False
        self.port_error: BaseException | None = None

    def lend(self, port: Any, timeout_s: float) -> None:
        """Use ``port`` for the next request, waiting ``timeout_s`` for its reply."""
        self.socket = port
        # pymodbus reads its reply timeout from here (_wait_for_data, sync_get_response).
        self.comm_params.timeout_connect = timeout_s
        self.transaction.count_until_disconnect = self.transaction.max_until_disconnect
        self.heard = False
        self.port_error = None

    def connect(self) -> bool:
        """True while the bus has lent a port; pymodbus never opens one itself."""
        return self.socket is not None

    def close(self) -> None:
        """Let go of the port; pymodbus calls this on a port error, the bus closes it.

        pymodbus calls ``close()`` from inside its ``except OSError`` and then raises a
        ``ConnectionException`` without the cause, so the cause is kept here for the
        error message.
        """
        self.port_error = sys.exc_info()[1]
        self.release()

    def release(self) -> None:
        """Forget the lent port (the bus still owns it)."""
        self.socket = None

    def recv(self, size: int | None) -> bytes:
        """Read one reply: exactly as many bytes as its header says, or until timeout.

        pymodbus 3.16 polls ``in_waiting`` until the line has been quiet for a poll
        interval (about 4 ms at 9600 baud), timed with ``time.time()``.  An RTU reply's
        length follows from its first three bytes (``rtu_reply_length``), so reading
        exactly that much returns the moment the last byte arrives: the bus, not the
        polling, sets the pace.  The deadline is monotonic: a wall-clock step (NTP at
        boot on a Pi without an RTC) must not stretch or cut the wait.
        """
        del size  # pymodbus always asks for "whatever comes"
        port = self.socket
        if port is None:
            raise ConnectionException(str(self))
        deadline = time.monotonic() + self.comm_params.timeout_connect
        buf = bytearray()
        want = RTU_HEADER
        try:
            while len(buf) < want:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                port.timeout = remaining
                chunk = port.read(want - len(buf))
                if not chunk:
                    break
                buf += chunk
                if len(buf) >= RTU_HEADER:
                    want = max(want, rtu_reply_length(bytes(buf[:RTU_HEADER])))
        except OSError:
            self.close()
            raise ConnectionException(str(self)) from None
        return bytes(buf)

    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        if not sending and data:
            self.heard = True
        if LOGGER.isEnabledFor(logging.DEBUG):
            LOGGER.debug("%s %s", "tx" if sending else "rx", data.hex(" "))
        return data


def _translate(exc: ModbusException | OSError, client: _BusClient, what: str,
               address: int) -> DriverError:
    """The one place pymodbus and port exceptions become driver errors, each with what a
    technician checks first (``address`` is the slave id asked)."""
    if isinstance(exc, ConnectionException | OSError):  # SerialException is an OSError
        return LinkDownError(f"{what}: port failed: {client.port_error or exc}")
    if isinstance(exc, ModbusIOException) and not client.heard:
        return NoReplyError(f"{what}: no reply from address {address}: check the address, "
                            "A/B polarity, baud rate")
    if isinstance(exc, ModbusIOException):
        return BadFrameError(
            f"{what}: reply garbled or from another slave (bad CRC, wrong slave id, noise): "
            f"check the baud rate and parity, the termination, and that no other board "
            f"has address {address}"
        )
    return BadFrameError(f"{what}: bad reply: {exc}")


class ModbusBus:
    """One RS-485 bus of Modbus RTU boards: one ``SerialBus`` plus one pymodbus client.

    Several ``ModbusController`` objects (one per slave id) share a ``ModbusBus``; the
    ``SerialBus`` lock keeps one transaction at a time on the wire.  Methods raise
    ``drivers.errors`` exceptions only.
    """

    def __init__(self, serial_bus: SerialBus) -> None:
        self.serial_bus = serial_bus
        self._client = _BusClient(serial_bus.url, serial_bus.baudrate, serial_bus.timing.timeout_s)

    @property
    def lock(self) -> Any:
        """The bus lock (re-entrant): hold it to keep a write and its read-back together."""
        return self.serial_bus.lock

    @property
    def last_attempts(self) -> int:
        """How many attempts the last transaction took."""
        return self.serial_bus.last_attempts

    def execute(
        self, request: Any, *, timeout_s: float | None = None, silence_ok: bool = False
    ) -> Any:
        """Send ``request`` (a pymodbus PDU) and return its checked reply.

        Retries, gap and reopen are ``SerialBus.transact``'s; ``timeout_s`` overrides the
        bus's per-request timeout for this request.  With ``silence_ok`` (a scan asking
        "is anyone there?") no reply is an answer: it returns ``None`` at once instead of
        raising ``NoReplyError`` and being retried.
        """
        timeout = self.serial_bus.timing.timeout_s if timeout_s is None else timeout_s
        return self.serial_bus.transact(
            lambda port: self._exchange(port, request, timeout, silence_ok)
        )

    def _exchange(self, port: Any, request: Any, timeout_s: float, silence_ok: bool) -> Any:
        client = self._client
        client.lend(port, timeout_s)
        what = f"slave {request.dev_id} function {request.function_code:#04x}"
        try:
            reply = client.execute(False, request)
        except (ModbusException, OSError) as exc:
            error = _translate(exc, client, what, request.dev_id)
            if silence_ok and isinstance(error, NoReplyError):
                return None
            raise error from exc
        finally:
            client.release()
        check_reply(request, reply)
        return reply

    # -- the requests relay boards understand ------------------------------------------
    def read_coils(
        self, slave: int, address: int, count: int, *, timeout_s: float | None = None
    ) -> list[bool]:
        """Function 0x01: ``count`` coils from ``address``."""
        request = ReadCoilsRequest(address=address, count=count, dev_id=slave)
        return _bits(self.execute(request, timeout_s=timeout_s).bits, count)

    def ping(self, slave: int, timeout_s: float) -> list[bool] | None:
        """Read coil 0 of ``slave`` once; ``None`` when nothing answers (for a scan)."""
        request = ReadCoilsRequest(address=0, count=1, dev_id=slave)
        reply = self.execute(request, timeout_s=timeout_s, silence_ok=True)
        return None if reply is None else _bits(reply.bits, 1)

    def read_discrete_inputs(self, slave: int, address: int, count: int) -> list[bool]:
        """Function 0x02: ``count`` discrete inputs from ``address``."""
        request = ReadDiscreteInputsRequest(address=address, count=count, dev_id=slave)
        return _bits(self.execute(request).bits, count)

    def write_coil(self, slave: int, address: int, on: bool) -> None:
        """Function 0x05: switch one coil on or off (the board echoes the request)."""
        self.execute(WriteCoilPDU(address, COIL_ON if on else COIL_OFF, dev_id=slave))

    def write_coil_raw(self, slave: int, address: int, value: int) -> None:
        """Function 0x05 with a non-standard value (a Waveshare-style timed flash)."""
        self.execute(WriteCoilPDU(address, value, dev_id=slave))

    def write_register(self, slave: int, address: int, value: int) -> None:
        """Function 0x06: write one holding register."""
        request = WriteSingleRegisterRequest(address=address, registers=[value], dev_id=slave)
        self.execute(request)

    def close(self) -> None:
        """Close the port (the bus reopens it on the next request)."""
        self.serial_bus.close()


def _bits(bits: Sequence[bool], count: int) -> list[bool]:
    # Bits come in whole bytes; the padding past ``count`` is not the board's state.
    return [bool(b) for b in bits[:count]]
