"""Unlock → confirmed latency per serial driver, against the wire time it needs.

Each driver runs N unlock+confirm cycles against its simulator over a real pty.  The
port is wrapped to count the bytes each way and the frames sent, so the figure to
watch is a ratio measured side by side in one run (this machine is shared and noisy):

    overhead = measured latency / wire time at the configured baud rate

where wire time = bytes on the wire x 11 bits / baud + one inter-frame gap per frame.
A pty moves bytes far faster than 9600 baud, so on real RS-485 the latency is roughly
wire time + (measured - pty transfer time): the ratio bounds our software's share.
The lock board's deliberate 50 ms settle before its read-back is reported separately.

Run: ``.venv/bin/python bench/unlock_latency.py [--cycles 200]``
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from drivers.base import Controller, LockPoint
from drivers.link import LinkTiming, SerialBus, char_time_s, frame_gap_s, open_serial
from drivers.lockboard import LockboardController
from drivers.lockboard.sim import start_lockboard_sim
from drivers.modbus import ModbusBus, ModbusController
from drivers.modbus.sim import ModbusSimBus

BAUD = 9600


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
    return SerialBus(str(path), BAUD, timing=timing, factory=factory)


def measure(name: str, controller: Controller, point: LockPoint, cycles: int,
            counts: dict[str, int], settle_s: float, reset: Callable[[], None]) -> None:
    """Run ``cycles`` unlocks and print p50/p99 next to the wire time."""
    samples = []
    controller.read(point)  # open the port outside the measurement
    for key in counts:
        counts[key] = 0
    for _ in range(cycles):
        started = time.perf_counter()
        result = controller.unlock(point, 1.0)
        samples.append(time.perf_counter() - started)
        if not result.confirmed:
            raise SystemExit(f"{name}: unlock not confirmed: {result.detail}")
        reset()
    per = {k: v / cycles for k, v in counts.items()}
    wire = (per["tx"] + per["rx"]) * char_time_s(BAUD) + per["frames"] * frame_gap_s(BAUD)
    samples.sort()
    p50 = statistics.median(samples)
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    software = p50 - settle_s
    print(f"{name:<22} p50 {p50 * 1000:7.2f} ms  p99 {p99 * 1000:7.2f} ms  "
          f"wire {wire * 1000:6.2f} ms ({per['tx'] + per['rx']:.0f} B, {per['frames']:.0f} "
          f"frames)  (p50-settle)/wire {software / wire:5.2f}x  settle {settle_s * 1000:.0f} ms")


def main() -> None:
    """Run the benchmark for every serial driver."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=200)
    cycles = parser.parse_args().cycles
    print(f"unlock -> confirmed, {cycles} cycles per driver, {BAUD} baud, simulators on ptys")
    with tempfile.TemporaryDirectory() as tmp:
        counts = {"tx": 0, "rx": 0, "frames": 0}
        with start_lockboard_sim(Path(tmp) / "lb", (0,), 16, hold_s=60.0) as lb:
            bus = _bus(lb.port.path, counts)
            ctl = LockboardController("lb", bus, 0, 16)

            def relatch() -> None:  # a person opens and shuts the door: the latch engages
                lb.sim.open_door(0, 1)
                lb.sim.close_door(0, 1)

            measure("lockboard", ctl, LockPoint(channel=0), cycles, counts, 0.05, relatch)
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

                measure(f"modbus pulse={pulse}", mctl, point, cycles, counts, 0.0, relock)
                bus.close()


if __name__ == "__main__":
    main()
