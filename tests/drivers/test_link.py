"""SerialBus: one transaction at a time, the gap, bounded retries, reopen with backoff."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path
from typing import Any

import pytest
import serial

from devkit.pty import PtyBridge, PtyPort
from devkit.testing import FakeClock
from drivers.errors import BadFrameError, LinkDownError, NoReplyError
from drivers.link import LinkTiming, SerialBus, frame_gap_s, read_reply, wire_time_s


class FakePort:
    timeout: float | None = None
    in_waiting = 0

    def __init__(self) -> None:
        self.closed = False
        self.resets = 0

    def write(self, data: bytes) -> int:
        return len(data)

    def read(self, size: int = 1) -> bytes:
        return b""

    def reset_input_buffer(self) -> None:
        self.resets += 1

    def close(self) -> None:
        self.closed = True


TIMING = LinkTiming(timeout_s=0.1, retries=2, gap_s=0.004, reopen_initial_s=0.5, reopen_max_s=4)


def test_gap_follows_the_modbus_spec() -> None:
    assert frame_gap_s(9600) == pytest.approx(3.5 * 11 / 9600)
    assert frame_gap_s(19200) == pytest.approx(3.5 * 11 / 19200)
    assert frame_gap_s(115200) == pytest.approx(0.00175)
    assert wire_time_s(8, 9600) == pytest.approx(8 * 11 / 9600)


def test_no_reply_is_retried_exactly_retries_times() -> None:
    clock = FakeClock()
    bus = SerialBus("x", 9600, timing=TIMING, factory=lambda *a: FakePort(), clock=clock,
                    sleep=clock.sleep)
    calls = 0

    def exchange(port: Any) -> bytes:
        nonlocal calls
        calls += 1
        raise NoReplyError("silent")

    with pytest.raises(NoReplyError):
        bus.transact(exchange)
    assert calls == TIMING.retries + 1
    assert bus.health().online is False
    assert bus.health().consecutive_failures == 3


def test_a_corrupt_reply_then_a_good_one_succeeds_and_discards_input() -> None:
    clock = FakeClock()
    port = FakePort()
    bus = SerialBus("x", 9600, timing=TIMING, factory=lambda *a: port, clock=clock,
                    sleep=clock.sleep)
    replies: list[Exception | bytes] = [BadFrameError("crc"), b"ok"]

    def exchange(p: Any) -> bytes:
        r = replies.pop(0)
        if isinstance(r, Exception):
            raise r
        return r

    assert bus.transact(exchange) == b"ok"
    assert bus.last_attempts == 2
    # once at open, once after the failed attempt (a late reply must not be kept)
    assert port.resets == 2
    assert bus.health().online


def test_the_gap_is_kept_between_frames() -> None:
    clock = FakeClock()
    bus = SerialBus("x", 9600, timing=TIMING, factory=lambda *a: FakePort(), clock=clock,
                    sleep=clock.sleep)
    bus.transact(lambda p: None)
    bus.transact(lambda p: None)
    assert clock.sleeps == [pytest.approx(TIMING.gap_s)]


def test_vanished_port_backs_off_without_busy_loop() -> None:
    clock = FakeClock()
    opens: list[float] = []

    def factory(*a: Any) -> FakePort:
        opens.append(clock.now)
        raise serial.SerialException("could not open port /dev/ttyUSB0")

    bus = SerialBus("/dev/ttyUSB0", 9600, timing=TIMING, factory=factory, clock=clock,
                    sleep=clock.sleep, rng=lambda: 1.0)
    # 10 simulated seconds of callers hammering the bus every 10 ms
    for _ in range(1000):
        with pytest.raises(LinkDownError):
            bus.transact(lambda p: None)
        clock.now += 0.01
    # backoff 0.5, 1, 2, 4, 4 … (rng=1 means no jitter shortening)
    assert len(opens) <= 6
    gaps = [b - a for a, b in itertools.pairwise(opens)]
    assert all(g <= TIMING.reopen_max_s + 0.02 for g in gaps)
    assert gaps == sorted(gaps)


def test_never_written_off_comes_back_after_long_outage() -> None:
    clock = FakeClock()
    present = False

    def factory(*a: Any) -> FakePort:
        if not present:
            raise serial.SerialException("gone")
        return FakePort()

    bus = SerialBus("x", 9600, timing=TIMING, factory=factory, clock=clock, sleep=clock.sleep)
    for _ in range(200):  # a long outage: far past any retry count
        with pytest.raises(LinkDownError):
            bus.transact(lambda p: None)
        clock.now += 1
    present = True
    clock.now += TIMING.reopen_max_s
    assert bus.transact(lambda p: "back") == "back"


def test_one_transaction_at_a_time(tmp_path: Path) -> None:
    """Two threads on one bus never interleave their request/reply pairs."""
    port = PtyPort(tmp_path / "tty")
    inside = 0
    overlap = False
    lock = threading.Lock()

    def exchange(p: Any) -> None:
        nonlocal inside, overlap
        with lock:
            inside += 1
            overlap = overlap or inside > 1
        threading.Event().wait(0.002)
        with lock:
            inside -= 1

    bus = SerialBus(str(port.path), 9600, timing=TIMING)
    threads = [threading.Thread(target=lambda: [bus.transact(exchange) for _ in range(20)])
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bus.close()
    port.close()
    assert not overlap


def test_read_reply_times_out_on_a_real_pty(tmp_path: Path) -> None:
    with PtyBridge(tmp_path / "a", tmp_path / "b") as bridge:
        bus = SerialBus(str(bridge.a.path), 9600, timing=LinkTiming(timeout_s=0.05, retries=0))

        def exchange(p: Any) -> bytes:
            p.write(b"ping")
            return read_reply(p, lambda chunk: chunk or None, 0.05)

        with pytest.raises(NoReplyError):
            bus.transact(exchange)
        bus.close()


def test_pty_bridge_carries_bytes_both_ways(tmp_path: Path) -> None:
    with PtyBridge(tmp_path / "a", tmp_path / "b") as bridge:
        a = serial.serial_for_url(str(bridge.a.path), timeout=1)
        b = serial.serial_for_url(str(bridge.b.path), timeout=1)
        payload = bytes(range(256))
        a.write(payload)
        got = b""
        while len(got) < len(payload):
            chunk = b.read(256 - len(got))
            assert chunk, "bridge lost bytes"
            got += chunk
        assert got == payload  # raw mode: no byte translated, XON/XOFF and CR included
        a.close()
        b.close()
