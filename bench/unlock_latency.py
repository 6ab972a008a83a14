"""Software time per confirmed unlock, as a ratio to the wire time of its frames.

Each driver runs N unlock+confirm cycles against its simulator over a real pty.  The
port is wrapped to count the bytes each way and the frames sent.  A pty moves bytes in
microseconds, so the time an unlock takes on it is software (ours, pyserial's,
pymodbus's, and the simulator's) plus deliberate waits: the inter-frame gap the bus
keeps (measured: the bus is given a sleep function that times itself, and the time is
subtracted) and the lock board's settle before its read-back (a fixed 50 ms for the
latch to move: the lock board is measured with it set to 0, and it is reported beside
the figures):

    software time = measured latency - deliberate waits
    ratio         = software time / wire time

where wire time = bytes x 11 bits / baud + one 3.5-character gap per frame, given at
9600 and 115200 baud for the same frames.  Target: <= 0.25x at 9600 (the bus, not
Python, is the bottleneck).  Both are measured side by side in one run.

Run: ``.venv/bin/python bench/unlock_latency.py [--cycles 300]``
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from devkit.sims.lockboard import start_lockboard_sim
from devkit.sims.modbus import ModbusSimBus
from drivers.base import Controller, LockPoint
from drivers.link import LinkTiming, SerialBus, char_time_s, frame_gap_s, open_serial
from drivers.lockboard import LockboardController
from drivers.modbus import ModbusBus, ModbusController

BAUD = 9600
#: The lock board's default wait for the latch to move before the read-back.
LOCKBOARD_SETTLE_S = 0.05
_real_sleep = time.sleep
_slept = [0.0]


def _timed_sleep(seconds: float) -> None:
    """time.sleep that adds up the deliberate waits of the benchmark's own thread."""
    if threading.current_thread() is threading.main_thread():
        _slept[0] += max(seconds, 0.0)
    _real_sleep(seconds)


def _wire_s(nbytes: float, frames: float, baud: int) -> float:
    return nbytes * char_time_s(baud) + frames * frame_gap_s(baud)


class CountingPort:
    """A pyserial port that counts bytes and frames both ways."""

    def __init__(self, port: Any, counts: dict[str, int]) -> None:
        self._port = port
        self._counts = counts

    def write(self, data: bytes) -> int | None:
        self._counts["tx"] += len(data)
        self._counts["frames"] += 1
        result: int | None = self._port.write(data)
        return result

    def read(self, size: int = 1) -> bytes:
        data: bytes = self._port.read(size)
        self._counts["rx"] += len(data)
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._port, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("_port", "_counts"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._port, name, value)


def _bus(path: Path, counts: dict[str, int]) -> SerialBus:
    def factory(url: str, baud: int, timeout: float) -> CountingPort:
        return CountingPort(open_serial(url, baud, timeout), counts)

    timing = LinkTiming.for_baudrate(BAUD, timeout_s=0.5, retries=2)
    return SerialBus(str(path), BAUD, timing=timing, factory=factory, sleep=_timed_sleep)


def measure(name: str, controller: Controller, point: LockPoint, cycles: int,
            counts: dict[str, int], reset: Callable[[], None], settle_note: str = "") -> None:
    """Run ``cycles`` unlocks and print software time next to the wire time."""
    samples, software = [], []
    controller.read(point)  # open the port outside the measurement
    for key in counts:
        counts[key] = 0
    for _ in range(cycles):
        _slept[0] = 0.0
        started = time.perf_counter()
        result = controller.unlock(point, 1.0)
        elapsed = time.perf_counter() - started
        samples.append(elapsed)
        software.append(elapsed - _slept[0])
        if not result.confirmed:
            raise SystemExit(f"{name}: unlock not confirmed: {result.detail}")
        reset()
    per = {k: v / cycles for k, v in counts.items()}
    nbytes = per["tx"] + per["rx"]
    samples.sort()
    software.sort()
    p50 = statistics.median(samples)
    sw50 = statistics.median(software)
    sw99 = software[min(len(software) - 1, int(len(software) * 0.99))]
    w9600 = _wire_s(nbytes, per["frames"], 9600)
    w115k = _wire_s(nbytes, per["frames"], 115200)
    print(f"{name:<20} {nbytes:4.0f} B {per['frames']:2.0f} fr | latency p50 "
          f"{p50 * 1e3:6.2f} ms | software p50 {sw50 * 1e3:5.2f} p99 {sw99 * 1e3:5.2f} ms | "
          f"wire@9600 {w9600 * 1e3:6.2f} ms -> {sw50 / w9600:4.2f}x | "
          f"wire@115200 {w115k * 1e3:5.2f} ms -> {sw50 / w115k:4.2f}x"
          + settle_note)


def main() -> None:
    """Run the benchmark for every serial driver."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=300)
    cycles = parser.parse_args().cycles
    print(f"software time per confirmed unlock, {cycles} cycles per driver, simulators on "
          "ptys; ratio = software p50 / wire time of the same frames")
    with tempfile.TemporaryDirectory() as tmp:
        counts = {"tx": 0, "rx": 0, "frames": 0}
        with start_lockboard_sim(Path(tmp) / "lb", (0,), 16, hold_s=60.0) as lb:
            bus = _bus(lb.port.path, counts)
            ctl = LockboardController("lb", bus, 0, 16, settle_s=0.0)

            def relatch() -> None:  # a person opens and shuts the door: the latch engages
                lb.sim.open_door(0, 1)
                lb.sim.close_door(0, 1)

            measure("lockboard", ctl, LockPoint(channel=0), cycles, counts, relatch,
                    f" | + {LOCKBOARD_SETTLE_S * 1e3:.0f} ms settle (physical) in service")
            bus.close()
        for pulse in (False, True):
            with ModbusSimBus(Path(tmp) / f"mb{pulse}", slaves=(1,), coils=8, inputs=8) as sim:
                counts = {"tx": 0, "rx": 0, "frames": 0}
                bus = _bus(sim.path, counts)
                mctl = ModbusController("mb", ModbusBus(bus), 1, 8, 8, pulse=pulse)
                point = LockPoint(channel=0, door_input=0)
                board = sim.board(1)

                def relock(board: Any = board) -> None:
                    board.set_coil(0, False)

                measure(f"modbus pulse={pulse}", mctl, point, cycles, counts, relock)
                bus.close()


if __name__ == "__main__":
    main()
