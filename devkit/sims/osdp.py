"""A simulated OSDP peripheral (PD): libosdp in PD mode on the far end of a pty.

The protocol is libosdp's own PD code, so the driver meets the same framing, sequence
numbers and Secure Channel handshake as on a real bus.  The device model around it:

* outputs (strikes) with OSDP output control (OSDP 2.2 §6.7): permanent on/off, and
  temporary on/off with a timer after which the PD resumes the permanent state by
  itself, on this process's clock, whatever the CP does meanwhile;
* inputs (door contacts, 1 = active = open), tamper and power status;
* a status report (osdp_OSTATR / ISTATR / LSTATR, sent in reply to the CP's polls) at
  every change and at the start of every CP session.

Switches:

* ``no_sc``: the PD offers no Secure Channel: its capability report (osdp_PDCAP) is
  rewritten on the wire to SC compliance 0, since libosdp's PD always advertises SC;
* ``install_mode``: the PD has no key of its own and accepts only SCBK-D;
* ``silent``: bytes in both directions are dropped (a dead PD);
* ``set_offline(True)``: the pty vanishes (an unplugged adapter).

A wire tap parses every frame the CP sends and counts the commands that arrived outside
Secure Channel (fault matrix #38: "commands sent in the clear").  Frame layout (OSDP 2.2
§5.1), enough to classify, not to decode::

    SOM(0x53) ADDR LEN_LSB LEN_MSB CTRL [SCB_LEN SCB_TYPE SCB_DATA..] CODE DATA..
        [MAC×4] CKSUM|CRC×2
        [MAC×4] CKSUM|CRC×2
    CTRL: bits 0-1 sequence, bit 2 CRC (else 1-byte checksum), bit 3 security block present
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devkit.pty import PtyPort
from drivers.base import Clock

LOGGER = logging.getLogger(__name__)

SOM = 0x53
CTRL_CRC = 0x04
CTRL_SCB = 0x08
#: Security block types that protect a message (MAC; 0x17/0x18 also encrypt the data).
SECURE_SCB_TYPES = frozenset({0x15, 0x16, 0x17, 0x18})
#: Commands allowed in the clear before a session: osdp_ID, osdp_CAP, and the Secure
#: Channel handshake osdp_CHLNG / osdp_SCRYPT.
HANDSHAKE_COMMANDS = frozenset({0x61, 0x62, 0x76, 0x77})
CMD_ID = 0x61
CMD_OUT = 0x68
CMD_KEYSET = 0x75
REPLY_PDCAP = 0x46
CAP_COMMUNICATION_SECURITY = 9
MAX_FRAME = 1500
#: The PD's thread runs libosdp every this many seconds (it asks for ≤ 50 ms).
REFRESH_S = 0.02


def crc16(data: bytes) -> int:
    """OSDP's CRC-16 (CRC-16/AUG-CCITT: polynomial 0x1021, initial value 0x1D0F)."""
    crc = 0x1D0F
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def checksum(data: bytes) -> int:
    """OSDP's 1-byte checksum: the two's complement of the byte sum."""
    return (-sum(data)) & 0xFF


@dataclass(frozen=True, slots=True)
class FrameInfo:
    """What the tap needs of one frame."""

    code: int
    secure: bool
    body_at: int  # index of the command/reply code in the frame


def classify(frame: bytes) -> FrameInfo | None:
    """The command/reply code of ``frame`` and whether a security block protects it."""
    if len(frame) < 7 or frame[0] != SOM:
        return None
    ctrl = frame[4]
    pos = 5
    secure = False
    if ctrl & CTRL_SCB:
        scb_len = frame[5]
        secure = frame[6] in SECURE_SCB_TYPES
        pos = 5 + scb_len
    if pos >= len(frame):
        return None
    return FrameInfo(frame[pos], secure, pos)


class FrameSplitter:
    """Whole frames out of a byte stream; skips marks (0xFF) and garbage before SOM."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Take bytes; return the frames now complete."""
        self._buf += data
        frames: list[bytes] = []
        while True:
            start = self._buf.find(SOM)
            if start < 0:
                self._buf.clear()
                return frames
            del self._buf[:start]
            if len(self._buf) < 5:
                return frames
            length = self._buf[2] | self._buf[3] << 8
            if not 7 <= length <= MAX_FRAME:
                del self._buf[:1]
                continue
            if len(self._buf) < length:
                return frames
            frames.append(bytes(self._buf[:length]))
            del self._buf[:length]


def strip_sc_capability(frame: bytes) -> bytes:
    """``frame`` (an osdp_PDCAP reply) with Secure Channel compliance set to 0."""
    info = classify(frame)
    if info is None or info.code != REPLY_PDCAP or info.secure:
        return frame
    crc = bool(frame[4] & CTRL_CRC)
    end = len(frame) - (2 if crc else 1)
    out = bytearray(frame)
    for i in range(info.body_at + 1, end - 2, 3):
        if out[i] == CAP_COMMUNICATION_SECURITY:
            out[i + 1] = 0
            out[i + 2] = 0
    if crc:
        value = crc16(bytes(out[:end]))
        out[end:] = bytes((value & 0xFF, value >> 8))
    else:
        out[end] = checksum(bytes(out[:end]))
    return bytes(out)


class PdChannel:
    """libosdp's PD channel on the master end of a pty, with the tap and the switches."""

    def __init__(self, port: PtyPort, sim: OsdpPdSim) -> None:
        self.port = port
        self._sim = sim
        self._pending = bytearray()
        self._rx = FrameSplitter()

    def read(self, max_bytes: int) -> bytes:
        """Bytes from the CP, at most ``max_bytes``, without waiting."""
        try:
            if len(self._pending) < max_bytes:
                data = self.port.read(0)
                if data and not self._sim.silent:
                    self._pending += data
                    for frame in self._rx.feed(data):
                        self._sim.tap(frame)
            out = bytes(self._pending[:max_bytes])
            del self._pending[:max_bytes]
            return out
        except Exception:  # never raise into libosdp
            LOGGER.exception("PD channel read failed")
            return b""

    def write(self, data: bytes) -> int:
        """Send a reply to the CP (dropped while silent)."""
        try:
            if not self._sim.silent:
                frame = bytes(data)
                if self._sim.no_sc:
                    frame = b"".join(strip_sc_capability(f) if f[:1] == bytes([SOM]) else f
                                     for f in _frames_and_marks(frame))
                self.port.write(frame)
            return len(data)
        except Exception:
            LOGGER.exception("PD channel write failed")
            return len(data)

    def flush(self) -> None:
        """Drop what the CP sent and libosdp did not take yet."""
        self._pending.clear()


def _frames_and_marks(data: bytes) -> list[bytes]:
    """Split one write of libosdp's into leading mark bytes and the frame."""
    start = data.find(SOM)
    if start <= 0:
        return [data]
    return [data[:start], data[start:]]


@dataclass(slots=True)
class Output:
    """One output: its permanent state and an optional temporary state with a deadline."""

    permanent: bool = False
    temporary: bool | None = None
    until: float = 0.0

    @property
    def on(self) -> bool:
        """The output's state now."""
        return self.permanent if self.temporary is None else self.temporary


@dataclass(slots=True)
class SimLog:
    """What the simulated PD saw and did, for the tests' figures."""

    #: (monotonic time, output, control code, timer units) of every output command.
    commands: list[tuple[float, int, int, int]] = field(default_factory=list)
    #: (monotonic time, output, on) of every change of an output.
    changes: list[tuple[float, int, bool]] = field(default_factory=list)
    #: Frames from the CP outside Secure Channel, other than osdp_ID/CAP and the handshake.
    clear_commands: int = 0
    #: osdp_OUT frames outside Secure Channel.
    clear_output_commands: int = 0
    #: osdp_OUT frames inside Secure Channel.
    secure_output_commands: int = 0
    sessions: int = 0
    #: osdp_KEYSET frames (a CP handing the PD a key), secure or not.
    keysets: int = 0


class OsdpPdSim:
    """A PD at ``address`` on a pty published at ``path``; call ``start()``."""

    def __init__(
        self,
        path: str | Path,
        *,
        address: int = 0,
        outputs: int = 4,
        inputs: int = 4,
        scbk: bytes | None = None,
        no_sc: bool = False,
        install_mode: bool = False,
        clock: Clock = time.monotonic,
    ) -> None:
        import osdp
        import osdp_sys

        self._osdp = osdp
        self.path = Path(path)
        self.address = address
        self.no_sc = no_sc
        self.install_mode = install_mode
        self.silent = False
        self._clock = clock
        self._lock = threading.RLock()
        self.outputs = [Output() for _ in range(outputs)]
        self.inputs = [False] * inputs
        self.tamper = False
        self.power_failure = False
        self.log = SimLog()
        self._dirty: set[int] = set()
        self._new_session = False
        self.port = PtyPort(self.path)
        self.channel = PdChannel(self.port, self)
        caps = [
            (osdp.Capability.OutputControl, 1, outputs),
            (osdp.Capability.ContactStatusMonitoring, 1, inputs),
            (osdp.Capability.CommunicationSecurity, 0 if no_sc else 1, 1),
        ]
        key = None if install_mode else scbk
        flags = [osdp.LibFlag.InstallMode] if install_mode else []
        info = osdp.PDInfo(address, self.channel, scbk=key, flags=flags, name="sim-pd")
        self._pd: Any = osdp_sys.PeripheralDevice(
            info.get(), capabilities=osdp.PDCapabilities(caps).get())
        self._pd.set_command_callback(self._on_command)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="osdp-pd-sim", daemon=True)

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> OsdpPdSim:
        """Start serving."""
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and remove the device."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        self.port.close()

    def __enter__(self) -> OsdpPdSim:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self._lock:
                    if self.port.present:
                        self._pd.refresh()
                    if self._new_session:
                        # Reports queued for a CP that is gone would arrive stale.
                        self._new_session = False
                        self._pd.flush_events()
                        self._dirty |= {0, 1, 2}
                    self._expire_timers()
                    self._send_reports()
            except Exception:
                LOGGER.exception("simulated PD failed")
            self._stop.wait(REFRESH_S)

    # -- the wire tap --------------------------------------------------------------------
    def tap(self, frame: bytes) -> None:
        """Account for one frame from the CP (called from the channel, in the PD thread)."""
        info = classify(frame)
        if info is None:
            return
        if info.code == CMD_ID:
            # A (new) CP session: report everything once it is up.
            self.log.sessions += 1
            self._new_session = True
        if not info.secure and info.code not in HANDSHAKE_COMMANDS:
            self.log.clear_commands += 1
        if info.code == CMD_KEYSET:
            self.log.keysets += 1
        if info.code == CMD_OUT:
            if info.secure:
                self.log.secure_output_commands += 1
            else:
                self.log.clear_output_commands += 1

    # -- the device model ----------------------------------------------------------------
    def _on_command(self, cmd: dict[str, Any]) -> tuple[int, Any]:
        """libosdp's command callback (inside ``refresh()``)."""
        try:
            if cmd.get("command") == self._osdp.Command.Output:
                self._output_command(int(cmd["output_no"]), int(cmd["control_code"]),
                                     int(cmd["timer_count"]))
        except Exception:
            LOGGER.exception("simulated PD: bad command %r", cmd)
            return -1, None
        return 0, None

    def _output_command(self, n: int, code: int, units: int) -> None:
        now = self._clock()
        self.log.commands.append((now, n, code, units))
        if not 0 <= n < len(self.outputs):
            return
        out = self.outputs[n]
        before = out.on
        if code in (1, 2):  # permanent, abort timed
            out.permanent = code == 2
            out.temporary = None
        elif code in (3, 4):  # permanent, let a timed operation complete
            out.permanent = code == 4
        elif code in (5, 6) and units > 0:  # temporary, resume permanent on timeout
            out.temporary = code == 5
            out.until = now + units * 0.1
        self._changed(n, before)
        self._dirty.add(1)  # a real PD answers osdp_OUT; report even without a change

    def _changed(self, n: int, before: bool) -> None:
        after = self.outputs[n].on
        if after != before:
            self.log.changes.append((self._clock(), n, after))
            self._dirty.add(1)

    def _expire_timers(self) -> None:
        now = self._clock()
        for n, out in enumerate(self.outputs):
            if out.temporary is not None and now >= out.until:
                before = out.on
                out.temporary = None
                self._changed(n, before)

    def _send_reports(self) -> None:
        types = self._osdp.StatusReportType
        for kind in sorted(self._dirty):
            if kind == 0:
                report = bytes(int(i) for i in self.inputs)
                rtype = types.Input
            elif kind == 1:
                report = bytes(int(o.on) for o in self.outputs)
                rtype = types.Output
            else:
                report = bytes((int(self.tamper), int(self.power_failure)))
                rtype = types.Local
            self._pd.submit_event({"event": self._osdp.Event.Status, "type": rtype,
                                   "report": report})
        self._dirty.clear()

    # -- what tests and harnesses do to the device ---------------------------------------
    def output(self, n: int) -> bool:
        """Whether output ``n`` is energized now."""
        with self._lock:
            self._expire_timers()
            return self.outputs[n].on

    def set_output(self, n: int, on: bool) -> None:
        """Someone at the PD switches output ``n`` permanently (drift)."""
        with self._lock:
            before = self.outputs[n].on
            self.outputs[n] = Output(permanent=on)
            self._changed(n, before)

    def set_input(self, n: int, active: bool) -> None:
        """Input ``n`` becomes active (a door contact: open) or inactive (closed)."""
        with self._lock:
            self.inputs[n] = active
            self._dirty.add(0)

    def set_tamper(self, tamper: bool) -> None:
        """The PD's tamper switch opens or closes."""
        with self._lock:
            self.tamper = tamper
            self._dirty.add(2)

    def set_power_failure(self, failure: bool) -> None:
        """The PD's supply fails or comes back."""
        with self._lock:
            self.power_failure = failure
            self._dirty.add(2)

    def set_offline(self, offline: bool) -> None:
        """Unplug (or plug back) the PD's adapter."""
        if offline:
            self.port.vanish()
        else:
            self.port.restore()
