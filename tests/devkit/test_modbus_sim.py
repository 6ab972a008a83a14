"""Modbus frames and the relay-board simulator, as pure code over bytes (no pty)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pymodbus.pdu import ExceptionResponse
from pymodbus.pdu.bit_message import (
    ReadCoilsRequest,
    ReadCoilsResponse,
    ReadDiscreteInputsRequest,
    WriteMultipleCoilsRequest,
)
from pymodbus.pdu.register_message import WriteSingleRegisterRequest

from devkit.sims.modbus import ModbusSimulator, RelayBoard
from devkit.testing import FakeClock
from drivers.base import LockState
from drivers.errors import BadFrameError, DeviceRejectedError
from drivers.modbus.frames import (
    COIL_ON,
    FLASH_ON_BASE,
    MAX_PULSE_UNITS,
    PulseStyle,
    WriteCoilPDU,
    check_reply,
    make_framer,
    pulse_units,
)


def frame(pdu: object) -> bytes:
    """A request as the driver puts it on the wire (the client-side framer)."""
    return bytes(make_framer(is_server=False).buildFrame(pdu))


def parse(data: bytes, slave: int) -> object:
    """A reply as the driver reads it."""
    used, pdu = make_framer(is_server=False).handleFrame(data, slave, 0)
    assert pdu is not None
    assert used == len(data)
    return pdu


def sim(*boards: RelayBoard) -> ModbusSimulator:
    return ModbusSimulator(boards or (RelayBoard(1),), frame_silence_s=math.inf)


# -- frames ------------------------------------------------------------------------------


def test_pulse_units_round_up_in_tenths() -> None:
    assert pulse_units(0.7) == 7
    assert pulse_units(0.3) == 3
    assert pulse_units(8) == 80
    assert pulse_units(0.01) == 1
    assert pulse_units(6553.5) == MAX_PULSE_UNITS
    for bad in (0, -1, 6553.6, math.nan, math.inf):
        with pytest.raises(ValueError):
            pulse_units(bad)


@given(st.floats(min_value=0.001, max_value=6553.5))
def test_pulse_is_never_shorter_than_asked(seconds: float) -> None:
    units = pulse_units(seconds)
    assert 1 <= units <= MAX_PULSE_UNITS
    assert units * 0.1 >= seconds - 1e-6
    assert (units - 1) * 0.1 < seconds


def test_the_waveshare_flash_frame_matches_its_documentation() -> None:
    # Waveshare's development protocol: relay 0 flash on for 700 ms is 01 05 02 00 00 07 + CRC.
    data = frame(WriteCoilPDU(FLASH_ON_BASE, pulse_units(0.7), dev_id=1))
    assert data[:6] == bytes.fromhex("01 05 02 00 00 07")
    assert PulseStyle.FLASH_COIL.default_base == 0x0200
    assert PulseStyle.HOLDING_REGISTER.default_base == 0


@given(
    slave=st.integers(1, 247),
    address=st.integers(0, 0xFFFF),
    value=st.integers(0, 0xFFFF),
)
def test_write_coil_pdu_round_trips_through_both_framers(
    slave: int, address: int, value: int
) -> None:
    request = WriteCoilPDU(address, value, dev_id=slave)
    _used, decoded = make_framer(is_server=True).handleFrame(frame(request), 0, 0)
    assert isinstance(decoded, WriteCoilPDU)
    assert (decoded.dev_id, decoded.address, decoded.value) == (slave, address, value)
    check_reply(request, parse(frame(decoded), slave))


def test_check_reply_rejects_what_does_not_answer_the_request() -> None:
    read8 = ReadCoilsRequest(address=0, count=8, dev_id=1)
    check_reply(read8, ReadCoilsResponse(bits=[False] * 8, dev_id=1))
    # a reply from another slave, to another function, or to another count
    with pytest.raises(BadFrameError, match="slave 2"):
        check_reply(read8, ReadCoilsResponse(bits=[False] * 8, dev_id=2))
    with pytest.raises(BadFrameError, match="function"):
        check_reply(
            ReadDiscreteInputsRequest(address=0, count=8, dev_id=1),
            ReadCoilsResponse(bits=[False] * 8, dev_id=1),
        )
    with pytest.raises(BadFrameError, match="bits"):
        check_reply(read8, ReadCoilsResponse(bits=[False] * 16, dev_id=1))
    # a stale write echo: another coil, or another value
    write = WriteCoilPDU(3, COIL_ON, dev_id=1)
    with pytest.raises(BadFrameError, match="echo"):
        check_reply(write, WriteCoilPDU(2, COIL_ON, dev_id=1))
    with pytest.raises(BadFrameError, match="echo"):
        check_reply(write, WriteCoilPDU(3, 0, dev_id=1))
    reg = WriteSingleRegisterRequest(address=4, registers=[80], dev_id=1)
    with pytest.raises(BadFrameError, match="register echo"):
        check_reply(reg, WriteSingleRegisterRequest(address=4, registers=[70], dev_id=1))
    # an exception reply to another function is stale, not a refusal of this one
    with pytest.raises(BadFrameError, match="exception reply"):
        check_reply(read8, ExceptionResponse(5, 2, device_id=1))
    with pytest.raises(DeviceRejectedError, match="ILLEGAL_ADDRESS"):
        check_reply(read8, ExceptionResponse(1, 2, device_id=1))


# -- the simulator, byte by byte --------------------------------------------------------


def test_reads_writes_and_echoes() -> None:
    board = RelayBoard(1)
    s = sim(board)
    [echo] = s.feed(frame(WriteCoilPDU(2, COIL_ON, dev_id=1)))
    assert echo == frame(WriteCoilPDU(2, COIL_ON, dev_id=1))
    assert board.coil(2)
    [reply] = s.feed(frame(ReadCoilsRequest(address=0, count=4, dev_id=1)))
    assert parse(reply, 1).bits[:4] == [False, False, True, False]  # type: ignore[attr-defined]
    [reply] = s.feed(frame(WriteMultipleCoilsRequest(address=0, bits=[True, True], dev_id=1)))
    assert board.coil(0)
    assert board.coil(1)
    assert board.coil(2)
    board.open_door(5)
    [reply] = s.feed(frame(ReadDiscreteInputsRequest(address=4, count=2, dev_id=1)))
    assert parse(reply, 1).bits[:2] == [True, False]  # type: ignore[attr-defined]


def test_request_split_into_single_bytes_is_answered_once() -> None:
    s = sim()
    request = frame(ReadCoilsRequest(address=0, count=8, dev_id=1))
    replies = [r for byte in request for r in s.feed(bytes([byte]))]
    assert len(replies) == 1
    assert s.requests[1] == 1


def test_garbage_and_bad_crc_are_ignored_and_the_next_frame_is_answered() -> None:
    s = sim()
    good = frame(ReadCoilsRequest(address=0, count=8, dev_id=1))
    bad = bytearray(good)
    bad[-1] ^= 0x01
    assert s.feed(bytes(bad)) == []
    assert s.feed(b"\xff\x00\x13") == []
    # a silence ends a broken frame (FRAME_SILENCE_S); this simulator has none, so clear it
    s._buffer = b""
    assert len(s.feed(good)) == 1


def test_a_silence_drops_a_half_received_frame() -> None:
    s = ModbusSimulator([RelayBoard(1)], frame_silence_s=0.0)
    request = frame(ReadCoilsRequest(address=0, count=8, dev_id=1))
    assert s.feed(request[:3]) == []
    assert s.feed(request[3:]) == []  # the first half was dropped after the silence
    assert len(s.feed(request)) == 1


def test_only_its_own_slave_ids_are_answered_broadcast_is_silent() -> None:
    one, two = RelayBoard(1), RelayBoard(2)
    s = sim(one, two)
    assert s.feed(frame(ReadCoilsRequest(address=0, count=1, dev_id=9))) == []
    assert len(s.feed(frame(ReadCoilsRequest(address=0, count=1, dev_id=2)))) == 1
    assert s.feed(frame(WriteCoilPDU(1, COIL_ON, dev_id=0))) == []
    assert one.coil(1)
    assert two.coil(1)
    assert s.requests == {9: 1, 2: 1, 0: 1}


def test_out_of_range_addresses_and_bad_values_get_exception_responses() -> None:
    s = sim(RelayBoard(1, coils=8, inputs=4))
    cases = [
        (ReadCoilsRequest(address=7, count=2, dev_id=1), 1, 2),
        (ReadDiscreteInputsRequest(address=4, count=1, dev_id=1), 2, 2),
        (WriteCoilPDU(8, COIL_ON, dev_id=1), 5, 2),
        (WriteCoilPDU(0, 0x1234, dev_id=1), 5, 3),
        (WriteCoilPDU(FLASH_ON_BASE + 8, 5, dev_id=1), 5, 2),
        (WriteSingleRegisterRequest(address=8, registers=[5], dev_id=1), 6, 2),
    ]
    for request, fc, code in cases:
        [reply] = s.feed(frame(request))
        pdu = parse(reply, 1)
        assert isinstance(pdu, ExceptionResponse)
        assert (pdu.function_code, pdu.exception_code) == (fc | 0x80, code)


def test_both_pulse_conventions_end_by_themselves_on_the_board_clock() -> None:
    clock = FakeClock(100.0)
    board = RelayBoard(1, clock=clock)
    s = sim(board)
    s.feed(frame(WriteCoilPDU(FLASH_ON_BASE + 3, 80, dev_id=1)))  # 8 s
    s.feed(frame(WriteSingleRegisterRequest(address=5, registers=[20], dev_id=1)))  # 2 s
    assert board.coil(3)
    assert board.coil(5)
    clock.now += 1.99
    assert board.coil(3)
    assert board.coil(5)
    clock.now += 0.01
    assert board.coil(3)
    assert not board.coil(5)
    clock.now += 6.0
    assert not board.coil(3)


def test_a_coil_write_ends_a_pulse() -> None:
    clock = FakeClock(100.0)
    board = RelayBoard(1, clock=clock)
    board.start_pulse(0, 5.0)
    board.set_coil(0, True)
    clock.now += 10
    assert board.coil(0)  # the plain write replaced the timed one


def test_device_faults() -> None:
    board = RelayBoard(1)
    board.wire_lock_feedback(0, 7, "unlock")
    assert board.input(7)  # locked
    board.set_coil(0, True)
    assert not board.input(7)  # unlocked, feedback follows
    board.set_coil(0, False)
    board.jam(0)
    board.set_coil(0, True)
    assert board.input(7)  # jammed: still shows locked
    assert board.lock_state(0) is LockState.UNLOCKED
    board.stick_relay(1)
    board.set_coil(1, True)
    board.start_pulse(1, 5)
    assert not board.coil(1)
    board.hold_door_open(2)
    board.close_door(2)
    assert not board.input(2)
    board.hold_door_open(2, held=False)
    assert board.input(2)


def test_reply_as_another_slave_id() -> None:
    board = RelayBoard(1)
    board.reply_as = 3
    [reply] = sim(board).feed(frame(ReadCoilsRequest(address=0, count=1, dev_id=1)))
    assert reply[0] == 3


# -- property: the simulator's receive buffer ---------------------------------------------

_requests = st.one_of(
    st.builds(lambda a, n: ReadCoilsRequest(address=a, count=n, dev_id=1),
              st.integers(0, 7), st.integers(1, 8)),
    st.builds(lambda a, n: ReadDiscreteInputsRequest(address=a, count=n, dev_id=1),
              st.integers(0, 7), st.integers(1, 8)),
    st.builds(lambda a, on: WriteCoilPDU(a, COIL_ON if on else 0, dev_id=1),
              st.integers(0, 7), st.booleans()),
)


@given(st.lists(_requests, min_size=1, max_size=8), st.data())
def test_any_split_of_a_request_stream_gets_the_same_replies(
    requests: list[object], data: st.DataObject
) -> None:
    """However the bytes arrive, the same requests are answered with the same replies."""
    stream = b"".join(frame(r) for r in requests)
    whole = sim(RelayBoard(1)).feed(stream)
    cuts = sorted(data.draw(st.sets(st.integers(1, len(stream) - 1), max_size=12)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    split_sim = sim(RelayBoard(1))
    split = [reply for chunk in chunks for reply in split_sim.feed(chunk)]
    assert split == whole
    assert len(whole) == len(requests)


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise_nor_grow_the_buffer(noise: bytes) -> None:
    s = sim(RelayBoard(1))
    for i in range(0, len(noise), 7):
        s.feed(noise[i:i + 7])
        assert len(s._buffer) <= 256 + 7  # at most one RTU frame (256 B) plus a chunk
