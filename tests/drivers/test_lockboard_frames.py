"""The lock-board codec and receive buffers, as pure code over bytes (no ports, no clock)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.errors import BadFrameError
from drivers.lockboard.frames import (
    MAX_FRAME_LEN,
    START_OPEN,
    START_READ,
    DoorSense,
    Frame,
    FrameError,
    OpenReply,
    OpenRequest,
    ReadAllReply,
    ReadAllRequest,
    ReadReply,
    ReadRequest,
    ReplyReader,
    RequestReader,
    decode_reply,
    decode_request,
    read_all_reply_len,
    xor_checksum,
)

addresses = st.integers(0, 0xFF)
locks = st.integers(1, 48)


@st.composite
def read_all_replies(draw: st.DrawFn) -> ReadAllReply:
    count = draw(st.integers(1, 48))
    bits = st.lists(st.booleans(), min_size=count, max_size=count).map(tuple)
    return ReadAllReply(draw(addresses), draw(bits), draw(bits))


requests = st.one_of(
    st.builds(OpenRequest, addresses, locks),
    st.builds(ReadRequest, addresses, locks),
    st.builds(ReadAllRequest, addresses),
)
replies = st.one_of(
    st.builds(OpenReply, addresses, locks, st.booleans()),
    st.builds(ReadReply, addresses, locks, st.booleans(), st.sampled_from(DoorSense)),
    read_all_replies(),
)
#: Noise that cannot start a frame, so every valid frame around it must come out.
clean_noise = st.binary(max_size=40).map(
    lambda b: bytes(x for x in b if x not in (START_OPEN, START_READ))
)

FRAME = OpenReply(1, 5, unlocked=True).serialize()


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def feed_all(reader: ReplyReader | RequestReader, chunks: list[bytes]) -> list[Frame]:
    out: list[Frame] = []
    for chunk in chunks:
        out.extend(reader.feed(chunk))
        assert reader.buffered <= MAX_FRAME_LEN - 1
    return out


# -- known bytes, as drawn in the frames docstring -----------------------------------------
@pytest.mark.parametrize(
    ("frame", "wire"),
    [
        (OpenRequest(1, 1), "8a 01 01 11 9b"),
        (ReadRequest(1, 2), "80 01 02 33 b0"),
        (ReadAllRequest(1), "80 01 00 33 b2"),
        (OpenReply(1, 1, unlocked=True), "8a 01 01 11 9b"),
        (OpenReply(1, 1, unlocked=False), "8a 01 01 00 8a"),
        (ReadReply(2, 3, unlocked=False, door=DoorSense.NO_SENSOR), "80 02 03 00 ff 7e"),
        # locks 1 and 9 unlocked, door 16 open, on a 16-lock board
        (
            ReadAllReply(0, (True, *[False] * 7, True, *[False] * 7), (*[False] * 15, True)),
            "80 00 00 10 01 01 00 80 33 23",
        ),
    ],
)
def test_known_bytes(frame: Frame, wire: str) -> None:
    assert frame.serialize() == bytes.fromhex(wire)
    assert type(frame).deserialize(bytes.fromhex(wire)) == (frame, b"")


def test_xor_checksum() -> None:
    assert xor_checksum(b"") == 0
    assert xor_checksum(bytes.fromhex("8a 01 01 11")) == 0x9B


def test_frame_error_is_retried_by_the_bus() -> None:
    assert issubclass(FrameError, BadFrameError)


# -- round trips ----------------------------------------------------------------------------
@given(requests, st.binary(max_size=8))
def test_request_round_trip(frame: Frame, rest: bytes) -> None:
    data = frame.serialize()
    assert xor_checksum(data) == 0  # the last byte cancels the XOR of the others
    assert type(frame).deserialize(data + rest) == (frame, rest)
    assert decode_request(data + rest) == (frame, rest)


@given(replies, st.binary(max_size=8))
def test_reply_round_trip(frame: Frame, rest: bytes) -> None:
    data = frame.serialize()
    assert xor_checksum(data) == 0
    assert type(frame).deserialize(data + rest) == (frame, rest)
    assert decode_reply(data + rest) == (frame, rest)


@given(read_all_replies())
def test_read_all_length_follows_count(frame: ReadAllReply) -> None:
    assert len(frame.serialize()) == read_all_reply_len(frame.count) <= MAX_FRAME_LEN


def test_read_all_pad_bits_are_ignored() -> None:
    data = bytearray(ReadAllReply(0, (True, False, True), (False, True, False)).serialize())
    data[4] |= 0xF8  # pad bits of LMASK above COUNT = 3
    data[-1] = xor_checksum(bytes(data[:-1]))
    assert ReadAllReply.deserialize(bytes(data))[0].unlocked == (True, False, True)


# -- any bytes: only FrameError, never anything else ------------------------------------
@given(st.binary(max_size=30))
def test_arbitrary_bytes_raise_only_frame_error(data: bytes) -> None:
    decoders = [decode_request, decode_reply]
    decoders += [
        cls.deserialize
        for cls in (OpenRequest, ReadRequest, ReadAllRequest, OpenReply, ReadReply, ReadAllReply)
    ]
    for decode in decoders:
        try:
            frame, rest = decode(data)
        except FrameError:
            continue
        assert frame.serialize() + rest == data or isinstance(frame, ReadAllReply)


@settings(deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=20))
def test_readers_never_raise_and_stay_bounded(chunks: list[bytes]) -> None:
    for reader in (ReplyReader(), RequestReader()):
        frames = feed_all(reader, chunks)
        stream = b"".join(chunks)
        # The reader never invents a frame: each one it yields is literally on the wire.
        for frame in frames:
            assert frame.serialize() in stream or isinstance(frame, ReadAllReply)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        ("8a 01 01 22 b8", "lock state 0x22"),
        ("8a 01 00 11 9a", "lock number 0"),
        ("8a 01 31 11 ab", "lock number 49"),
        ("80 01 02 11 05 97", "door state 0x05"),
        ("80 01 00 00 00", "lock count 0"),
        ("80 01 00 31 00", "lock count 49"),
        ("80 00 00 08 01 00 34 bd", "trailer is 0x34"),
        ("80 00 00 08 01 00 33 ff", "bad checksum"),
        ("80 00 00 08 01 00 33", "truncated"),
    ],
)
def test_bad_replies_name_the_fault(data: str, why: str) -> None:
    with pytest.raises(FrameError, match=why):
        decode_reply(bytes.fromhex(data))


def test_bad_requests() -> None:
    with pytest.raises(FrameError, match="command"):
        OpenRequest.deserialize(bytes.fromhex("8a 01 01 33 b9"))
    with pytest.raises(FrameError, match="start byte"):
        decode_request(bytes.fromhex("81 01 01 33 b2"))


def test_constructors_refuse_impossible_fields() -> None:
    with pytest.raises(ValueError, match="lock number"):
        OpenRequest(0, 49)
    with pytest.raises(ValueError, match="lock number"):
        ReadRequest(0, 0)
    with pytest.raises(ValueError, match="address"):
        ReadAllRequest(256)
    with pytest.raises(ValueError, match="one entry per lock"):
        ReadAllReply(0, (True,), (True, False))
    with pytest.raises(ValueError, match=r"1\.\.48"):
        ReadAllReply(0, (), ())


# -- streams: any split, noise between frames ---------------------------------------------
@settings(deadline=None)
@given(st.lists(replies, max_size=8), st.lists(st.integers(0, 10_000), max_size=12))
def test_any_split_of_replies_decodes_the_same(frames: list[Frame], cuts: list[int]) -> None:
    stream = b"".join(f.serialize() for f in frames)
    assert feed_all(ReplyReader(), split(stream, cuts)) == frames


@settings(deadline=None)
@given(st.lists(requests, max_size=8), st.lists(st.integers(0, 10_000), max_size=12))
def test_any_split_of_requests_decodes_the_same(frames: list[Frame], cuts: list[int]) -> None:
    stream = b"".join(f.serialize() for f in frames)
    assert feed_all(RequestReader(), split(stream, cuts)) == frames


@settings(deadline=None)
@given(
    st.lists(st.tuples(clean_noise, replies), max_size=8),
    clean_noise,
    st.lists(st.integers(0, 10_000), max_size=12),
)
def test_noise_between_replies_is_skipped(
    pairs: list[tuple[bytes, Frame]], tail: bytes, cuts: list[int]
) -> None:
    stream = b"".join(noise + f.serialize() for noise, f in pairs) + tail
    reader = ReplyReader()
    assert feed_all(reader, split(stream, cuts)) == [f for _, f in pairs]
    assert reader.dropped == sum(len(noise) for noise, _ in pairs) + len(tail)


@settings(deadline=None)
@given(st.lists(st.tuples(clean_noise, requests), max_size=8), st.integers(1, 5))
def test_noise_between_requests_is_skipped(pairs: list[tuple[bytes, Frame]], chunk: int) -> None:
    stream = b"".join(noise + f.serialize() for noise, f in pairs)
    chunks = [stream[i : i + chunk] for i in range(0, len(stream), chunk)]
    assert feed_all(RequestReader(), chunks) == [f for _, f in pairs]


@settings(deadline=None)
@given(st.binary(max_size=60), replies)
def test_resynchronizes_after_any_noise(noise: bytes, frame: Frame) -> None:
    """After arbitrary noise (start bytes included) and a frame's length of quiet filler,
    the next frame is found: no noise can hold the reader hostage for longer."""
    filler = b"\x00" * (MAX_FRAME_LEN - 1)
    out = feed_all(ReplyReader(), [bytes([b]) for b in noise + filler + frame.serialize()])
    assert out[-1:] == [frame]


# -- byte by byte, in the manner of zigpy-znp's test_uart.py -----------------------------
def bytewise(reader: ReplyReader, data: bytes) -> list[Frame]:
    return feed_all(reader, [bytes([b]) for b in data])


def test_byte_by_byte() -> None:
    assert bytewise(ReplyReader(), FRAME) == [OpenReply(1, 5, unlocked=True)]


def test_byte_by_byte_with_garbage() -> None:
    data = bytes.fromhex("58 4a 72 35 51 da 60 ed 1f 03 6d b6 ee 90")
    data += FRAME + bytes.fromhex("00 00 e4 4f 51 b2 39 4b 8d e3 ca 61")
    reader = ReplyReader()
    assert bytewise(reader, data) == [OpenReply(1, 5, unlocked=True)]
    assert reader.buffered == 0


def test_bad_checksum_yields_nothing() -> None:
    reader = ReplyReader()
    assert bytewise(reader, FRAME[:-1] + b"\x00") == []
    assert isinstance(reader.last_error, FrameError)
    assert "checksum" in str(reader.last_error)


def test_stray_start_bytes() -> None:
    reader = ReplyReader()
    near_miss = FRAME[:-1] + bytes([FRAME[-1] ^ 0xFF])
    out = bytewise(reader, b"\x8a\x80\x8a" + near_miss)
    out += bytewise(reader, b"\x8a\x8a\x00\x80\x01")
    out += bytewise(reader, b"\x80\x8a\x80" + FRAME + b"\x00\x00")
    assert out == [OpenReply(1, 5, unlocked=True)]  # exactly once


def test_frame_hiding_behind_a_stray_start_byte() -> None:
    """``80`` makes the reader expect a 6-byte read reply; the real frame is inside it."""
    reply = ReadReply(0, 3, unlocked=True, door=DoorSense.OPEN)
    assert bytewise(ReplyReader(), b"\x80" + reply.serialize()) == [reply]


def test_many_frames_in_one_chunk() -> None:
    frames = [OpenReply(1, n, unlocked=n % 2 == 0) for n in range(1, 11)]
    data = b"".join(f.serialize() for f in frames)
    assert ReplyReader().feed(data) == frames


def test_big_garbage_chunk_stays_bounded() -> None:
    reader = ReplyReader()
    assert reader.feed(bytes([START_READ, 0, 0, 48]) + b"\x01" * 10) == []
    assert reader.buffered == 14  # waiting for the rest of an 18-byte frame
    assert reader.feed(b"\x80" * 10_000) == []
    assert reader.buffered <= MAX_FRAME_LEN - 1


def test_clear_drops_the_partial_frame() -> None:
    reader = ReplyReader()
    reader.feed(FRAME[:3])
    reader.clear()
    assert reader.buffered == 0
    assert reader.feed(FRAME[3:]) == []
