"""``stora-gateway simulate DRIVER``: one simulator, standalone, until Ctrl-C.

A rehearsal without hardware: the simulators the tests use (``devkit/sims/*.py``, each
built from its driver's own frame or message code) served on their own, so an installer
can write the site's config, run ``check-config``, ``locks``, ``test`` and the agent
against them, and switch on the faults a site will meet (no reply, line noise, a jammed
latch, a door held open, a dead radio).

* ``modbus``, ``lockboard``, ``osdp``: a pseudo-terminal published at ``--port PATH``
  (a link to ``/dev/pts/N``, as ``/dev/serial/by-id/…`` is to ``/dev/ttyUSB0``).  The
  gateway accepts a port outside ``/dev`` only as a link to a character device in a
  directory nobody else may write to (``drivers/ports.py``), so PATH must be in such a
  directory (``mkdir -m 700 ~/sim``).  An existing file is never replaced; a link to a
  ``/dev/pts`` device (left by a simulator that was killed) is.
* ``zigbee2mqtt``, ``tasmota``: a bridge or device on the broker at ``--host/--port``,
  with its own account where the broker has accounts (TCP only).

It prints what it serves and the config tables that point the gateway at it, then one
line per change of the simulated hardware (a relay, a latch, an output, a bolt).  Ctrl-C
or SIGTERM stops it: the simulator is closed and the pty's link removed, exit 0.
``--json``: the same as JSON objects, one per line (``serving``, ``change``,
``stopped``).

This module is dev kit: the CLI imports it only inside the command, and no product
module imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Final, TextIO

from gateway.term import plural

__all__ = ["SimulateError", "Simulation", "run_simulate", "start_simulation"]

#: How often the simulated hardware is looked at for changes: a 100 ms pulse still
#: shows, and reading a few flags 20 times a second costs nothing.
ACTIVITY_POLL_S: Final = 0.05
#: How long an MQTT simulator may take to connect to its broker (a LAN broker answers
#: in milliseconds; a TLS-less local one in less).
CONNECT_TIMEOUT_S: Final = 10.0
#: Where a pty's slave end lives: a link pointing here was made by a simulator.
PTS_DIR: Final = "/dev/pts/"


class SimulateError(Exception):
    """The simulator cannot start; ``status`` is the exit status (2: bad usage)."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Simulation:
    """A running simulator: what it is, where, and how to watch and stop it."""

    driver: str
    what: str
    where: dict[str, str]
    config: str
    snapshot: Callable[[], dict[str, str]]
    close: Callable[[], None]
    faults: list[str] = field(default_factory=list)
    port: Path | None = None


# -- serial simulators ----------------------------------------------------------------
def prepare_port(text: str) -> Path:
    """The absolute path to publish a pty at, or :class:`SimulateError` saying why not."""
    path = Path(text).expanduser().absolute()
    parent = path.parent
    try:
        mode = parent.stat().st_mode
    except OSError as exc:
        raise SimulateError(f"cannot use {parent} for --port: {exc.strerror or exc}; "
                            f"create it first: mkdir -m 700 -p {parent}") from exc
    if not stat.S_ISDIR(mode):
        raise SimulateError(f"{parent} is not a directory")
    if mode & stat.S_IWOTH:
        raise SimulateError(f"{parent} may be written by anyone, and the gateway refuses a "
                            "port there (someone could swap the link): use a directory of "
                            "your own, e.g. mkdir -m 700 ~/sim")
    if path.is_symlink():
        target = os.readlink(path)
        if not target.startswith(PTS_DIR):
            raise SimulateError(f"{path} exists (a link to {target}); simulate only replaces "
                                "a link to a pseudo-terminal: choose another --port")
    elif path.exists():
        raise SimulateError(f"{path} exists and is not a simulator's link; simulate never "
                            "replaces a file or a device: choose another --port")
    return path


def _check_published(path: Path, close: Callable[[], None]) -> None:
    """Make sure the gateway will accept ``path`` as a port (drivers/ports.py)."""
    from drivers.ports import port_problem

    problem = port_problem(str(path))
    if problem is not None:
        close()
        raise SimulateError(f"the gateway would refuse this port: port {problem}")


def _in_range(option: str, values: list[int], count: int, what: str) -> None:
    for value in values:
        if not 0 <= value < count:
            raise SimulateError(f"{option} {value}: there are {count} {what} "
                                f"(0-{count - 1})")


def _transport_faults(args: argparse.Namespace) -> tuple[Any, list[str]]:
    from devkit.sims.base import TransportFaults

    if args.noise < 0 or args.noise > 255:
        raise SimulateError("--noise must be from 0 to 255 bytes")
    faults = TransportFaults(no_reply=args.no_reply, ignore_requests=args.dead,
                             reply_delay_s=args.reply_delay, corrupt=args.corrupt,
                             garbage=args.noise)
    words = [w for w, on in (("no reply", args.no_reply), ("dead", args.dead),
                             (f"replies {args.reply_delay:g} s late", args.reply_delay > 0),
                             ("corrupt replies", args.corrupt),
                             (f"{args.noise} bytes of noise per reply", args.noise > 0)) if on]
    return faults, words


def _modbus(args: argparse.Namespace) -> Simulation:
    from devkit.sims.modbus import ModbusSimBus

    if not 1 <= args.address <= 247:
        raise SimulateError("--address must be a Modbus slave id from 1 to 247")
    if not 1 <= args.coils <= 64 or not 0 <= args.inputs <= 64:
        raise SimulateError("--coils must be from 1 to 64 and --inputs from 0 to 64")
    _in_range("--stuck-relay", args.stuck_relay, args.coils, "relays")
    _in_range("--door-open", args.door_open, args.inputs, "inputs")
    if args.reply_as is not None and not 1 <= args.reply_as <= 247:
        raise SimulateError("--reply-as must be a slave id from 1 to 247")
    faults, words = _transport_faults(args)
    path = prepare_port(args.port)
    bus = ModbusSimBus(path, slaves=(args.address,), coils=args.coils, inputs=args.inputs)
    bus.server.faults = bus.faults = faults
    board = bus.board(args.address)
    for channel in args.stuck_relay:
        board.stick_relay(channel)
        words.append(f"relay {channel} stuck")
    for number in args.door_open:
        board.hold_door_open(number)
        words.append(f"door on input {number} open")
    if args.reply_as is not None:
        board.reply_as = args.reply_as
        words.append(f"answers as slave {args.reply_as}")
    _check_published(path, bus.close)
    door = "door_input = 0\n" if args.inputs else ""
    config = (f'[[controllers]]\nname = "sim-modbus"\ndriver = "modbus"\nport = "{path}"\n'
              f"address = {args.address}\nchannels = {args.coils}\ninputs = {args.inputs}\n\n"
              '[[locks]]             # one per relay: channel = relay, door_input = input\n'
              'unit = "unit_a101"\nreference = "A-101"\ncontroller = "sim-modbus"\n'
              f"channel = 0\n{door}")
    return Simulation(
        "modbus", f"a Modbus RTU relay board (slave {args.address}, "
        f"{plural(args.coils, 'relay')}, {plural(args.inputs, 'input')})",
        {"port": str(path), "device": bus.port.device}, config,
        lambda: {f"relay {ch}": "on" if board.coil(ch) else "off"
                 for ch in range(args.coils)},
        bus.close, words, path)


def _lockboard(args: argparse.Namespace) -> Simulation:
    from devkit.sims.lockboard import start_lockboard_sim
    from drivers.lockboard.frames import MAX_ADDRESS, MAX_LOCKS

    if not 0 <= args.address <= MAX_ADDRESS:
        raise SimulateError(f"--address must be a board number from 0 to {MAX_ADDRESS}")
    if not 1 <= args.locks <= MAX_LOCKS:
        raise SimulateError(f"--locks must be from 1 to {MAX_LOCKS}")
    for option in ("jam", "door_open", "no_door_sensor"):
        _in_range(f"--{option.replace('_', '-')}", getattr(args, option), args.locks, "locks")
    faults, words = _transport_faults(args)
    path = prepare_port(args.port)
    running = start_lockboard_sim(path, (args.address,), args.locks, hold_s=args.hold,
                                  faults=faults)
    sim, address = running.sim, args.address
    for channel in args.jam:
        sim.set_faults(address, channel + 1, jammed=True)
        words.append(f"lock {channel} jammed")
    for channel in args.door_open:
        sim.set_faults(address, channel + 1, door_held_open=True)
        words.append(f"door {channel} held open")
    for channel in args.no_door_sensor:
        sim.set_faults(address, channel + 1, no_door_sensor=True)
        words.append(f"lock {channel} without door sensor")
    _check_published(path, running.close)
    config = (f'[[controllers]]\nname = "sim-lockers"\ndriver = "lockboard"\nport = "{path}"\n'
              f"address = {address}\nchannels = {args.locks}\n\n"
              "[[locks]]             # one per lock: channel = lock number - 1\n"
              'unit = "unit_b201"\nreference = "B-201"\ncontroller = "sim-lockers"\n'
              "channel = 0\n")
    return Simulation(
        "lockboard", f"a lock board (board {address}, {plural(args.locks, 'lock')}, "
        f"latches hold {args.hold:g} s)",
        {"port": str(path), "device": running.port.device}, config,
        lambda: {f"lock {ch}": "released" if sim.is_unlocked(address, ch + 1) else "latched"
                 for ch in range(args.locks)},
        running.close, words, path)


def _osdp(args: argparse.Namespace) -> Simulation:
    from devkit.sims.osdp import OsdpPdSim

    if not 0 <= args.address <= 126:
        raise SimulateError("--address must be an OSDP address from 0 to 126")
    if not 1 <= args.outputs <= 16 or not 0 <= args.inputs <= 16:
        raise SimulateError("--outputs must be from 1 to 16 and --inputs from 0 to 16")
    _in_range("--door-open", args.door_open, args.inputs, "inputs")
    scbk: bytes | None = None
    if args.scbk_file is not None:
        from drivers.osdp.settings import ScbkError, load_scbk

        try:
            scbk = load_scbk(Path(args.scbk_file))
        except ScbkError as exc:
            raise SimulateError(str(exc)) from exc
    elif not (args.no_sc or args.install_mode):
        raise SimulateError("give --scbk-file (the same file as the controller's scbk_file), "
                            "or --no-sc or --install-mode to rehearse those cases")
    path = prepare_port(args.port)
    sim = OsdpPdSim(path, address=args.address, outputs=args.outputs, inputs=args.inputs,
                    scbk=scbk, no_sc=args.no_sc, install_mode=args.install_mode).start()
    words = [w for w, on in (("no Secure Channel", args.no_sc),
                             ("install mode (SCBK-D only)", args.install_mode),
                             ("silent", args.silent), ("tamper", args.tamper),
                             ("power failure", args.power_failure)) if on]
    sim.silent = args.silent
    for number in args.door_open:
        sim.set_input(number, True)
        words.append(f"door on input {number} open")
    if args.tamper:
        sim.set_tamper(True)
    if args.power_failure:
        sim.set_power_failure(True)
    _check_published(path, sim.close)
    key = (f'scbk_file = "{Path(args.scbk_file).absolute()}"\n' if args.scbk_file else
           "allow_insecure = true  # only to rehearse; never on a site\n" if args.no_sc else
           'scbk_file = "…"        # the key the gateway hands the PD in install mode\n')
    door = "door_input = 0\n" if args.inputs else ""
    config = (f'[[controllers]]\nname = "sim-pd"\ndriver = "osdp"\nport = "{path}"\n'
              f"address = {args.address}\n{key}channels = {args.outputs}\n"
              f"inputs = {args.inputs}\n\n"
              "[[locks]]             # one per output: channel = output, door_input = input\n"
              'unit = "unit_d1"\nreference = "D-1"\ncontroller = "sim-pd"\n'
              f"channel = 0\n{door}")
    return Simulation(
        "osdp", f"an OSDP peripheral (address {args.address}, "
        f"{plural(args.outputs, 'output')}, {plural(args.inputs, 'input')}, "
        f"Secure Channel {'off' if args.no_sc else 'on'})",
        {"port": str(path), "device": sim.port.device}, config,
        lambda: {f"output {n}": "on" if sim.output(n) else "off"
                 for n in range(args.outputs)},
        sim.close, words, path)


# -- MQTT simulators -------------------------------------------------------------------------
def _password(args: argparse.Namespace) -> str | None:
    if args.password_file is None:
        return None
    from gateway.link.site_client import SiteLinkError, read_password_file

    try:
        return read_password_file(Path(args.password_file))
    except SiteLinkError as exc:
        raise SimulateError(str(exc)) from exc


def _connect(start: Callable[[], object], close: Callable[[], None], where: str,
             user: str | None) -> None:
    try:
        start()
    except (OSError, RuntimeError) as exc:
        close()
        account = f" as {user}" if user else ""
        raise SimulateError(f"cannot connect to the broker at {where}{account}: {exc} "
                            "(check --host/--port, the account and the broker's ACL)",
                            1) from exc


def _zigbee2mqtt(args: argparse.Namespace) -> Simulation:
    from devkit.sims.zigbee2mqtt import SimFaults, SimLock, Zigbee2MqttSim

    devices = args.device or ["A-101"]
    unknown = sorted(set(args.jam) - set(devices))
    if unknown:
        raise SimulateError(f"--jam {unknown[0]}: no such --device")
    locks = [SimLock(name, jammed=name in args.jam, relock_after_s=args.relock_after)
             for name in devices]
    faults = SimFaults(drop_p=args.drop, skip_report_p=args.skip_report,
                       delay_p=args.late, delay_s=args.late_by, silent=args.silent)
    sim = Zigbee2MqttSim(args.host, args.port, locks, base_topic=args.base_topic,
                         faults=faults, report_delay_s=args.report_delay, seed=args.seed,
                         username=args.username, password=_password(args))
    where = f"{args.host}:{args.port}"
    _connect(lambda: sim.start(CONNECT_TIMEOUT_S), sim.close, where, args.username)
    words = [w for w, on in ((f"{args.drop:g} of commands lost", args.drop > 0),
                             (f"{args.skip_report:g} of reports skipped", args.skip_report > 0),
                             (f"{args.late:g} of reports {args.late_by:g} s late",
                              args.late > 0),
                             ("silent radio", args.silent)) if on]
    words += [f"{name} jammed" for name in args.jam]
    config = ('[[controllers]]\nname = "sim-zigbee"\ndriver = "zigbee2mqtt"\n'
              f'base_topic = "{args.base_topic}"\n'
              f"# host = \"{args.host}\" and port = {args.port}: only if not [mqtt]'s broker\n"
              "# on a broker with accounts, the link's own (hardware.md):\n"
              '# username = "gw-zigbee2mqtt"\n'
              '# password_file = "secrets/zigbee2mqtt-password"\n\n'
              "[[locks]]             # one per device\n"
              f'unit = "unit_z1"\nreference = "{devices[0]}"\ncontroller = "sim-zigbee"\n'
              f'device = "{devices[0]}"\n')
    return Simulation(
        "zigbee2mqtt", f"a Zigbee2MQTT bridge (base topic {args.base_topic}) with "
        f"{plural(len(devices), 'lock')}: {', '.join(devices)}",
        {"broker": where, "account": args.username or ""}, config,
        lambda: {f"lock {name}": "unlocked" if sim.unlocked(name) else "locked"
                 for name in devices},
        sim.close, words)


def _tasmota(args: argparse.Namespace) -> Simulation:
    from devkit.sims.tasmota import TasmotaSim

    if not 1 <= args.relays <= 8 or not 0 <= args.switches <= 8:
        raise SimulateError("--relays must be from 1 to 8 and --switches from 0 to 8")
    user = args.username or (args.topic if args.password_file else None)
    try:
        sim = TasmotaSim(args.host, args.port, args.topic, relays=args.relays,
                         switches=args.switches, loop_sleep_s=args.loop_sleep,
                         connect_timeout_s=CONNECT_TIMEOUT_S, username=user,
                         password=_password(args))
    except ValueError as exc:  # a topic Tasmota cannot have
        raise SimulateError(str(exc)) from exc
    sim.silent = args.silent
    sim.drop_commands = args.drop_commands
    sim.report_delay_s = args.report_delay
    where = f"{args.host}:{args.port}"
    _connect(sim.start, sim.close, where, user)
    words = [w for w, on in (("silent", args.silent),
                             ("POWER changes lost", args.drop_commands),
                             (f"reports {args.report_delay:g} s late", args.report_delay > 0))
             if on]
    door = "door_input = 0\n" if args.switches else ""
    config = ('[[controllers]]\nname = "sim-tasmota"\ndriver = "tasmota"\n'
              f'topic = "{args.topic}"\nchannels = {args.relays}\ninputs = {args.switches}\n'
              f"# host = \"{args.host}\" and port = {args.port}: only if not [mqtt]'s broker\n"
              "# on a broker with accounts, the link's own (hardware.md):\n"
              '# username = "gw-tasmota"\n'
              '# password_file = "secrets/tasmota-password"\n\n'
              "[[locks]]             # one per relay: channel 0 = POWER1\n"
              'unit = "unit_t1"\nreference = "G-1"\ncontroller = "sim-tasmota"\n'
              f"channel = 0\n{door}")
    return Simulation(
        "tasmota", f"a Tasmota device (topic {args.topic}, {args.relays} relays, "
        f"{args.switches} switches)", {"broker": where, "account": user or ""}, config,
        lambda: {f"POWER{i}": "ON" if sim.device.relay(i) else "OFF"
                 for i in range(1, args.relays + 1)},
        sim.close, words)


_STARTERS: Final[dict[str, Callable[[argparse.Namespace], Simulation]]] = {
    "modbus": _modbus, "lockboard": _lockboard, "zigbee2mqtt": _zigbee2mqtt,
    "tasmota": _tasmota, "osdp": _osdp,
}


def start_simulation(args: argparse.Namespace) -> Simulation:
    """Start the simulator ``args.driver`` with the options of ``devkit/simulate_options``."""
    try:
        return _STARTERS[args.driver](args)
    except OSError as exc:  # a pty or a link that cannot be made
        raise SimulateError(f"cannot start the simulator: {exc.strerror or exc}", 1) from exc


# -- running it ------------------------------------------------------------------------------
class _Output:
    """Lines for people or JSON objects for tools."""

    def __init__(self, out: TextIO, json_lines: bool) -> None:
        self.out = out
        self.json_lines = json_lines

    def emit(self, doc: dict[str, Any], text: str) -> None:
        if self.json_lines:
            self.out.write(json.dumps(doc, separators=(",", ":")) + "\n")
        else:
            self.out.write(text)
        self.out.flush()


def _banner(sim: Simulation) -> str:
    lines = [f"simulating {sim.what}"]
    if sim.port is not None:
        lines.append(f"  port     {sim.where['port']} -> {sim.where['device']}")
    else:
        account = f" as {sim.where['account']}" if sim.where.get("account") else ""
        lines.append(f"  broker   {sim.where['broker']}{account}")
    lines.append(f"  faults   {', '.join(sim.faults) or 'none'}")
    lines.append("Point the gateway at it (gateway.toml; see hardware.md, \"Rehearse without "
                 "hardware\"):\n")
    lines += [f"    {line}" if line else "" for line in sim.config.splitlines()]
    lines.append("\nCtrl-C to stop.")
    return "\n".join(lines) + "\n"


def _now() -> str:
    from gateway.clock import rfc3339

    return str(rfc3339(time.time()))


def run_simulate(args: argparse.Namespace, out: TextIO, *, json_lines: bool = False,
                 stop: threading.Event | None = None) -> int:
    """Run one simulator until ``stop`` (SIGINT/SIGTERM in the main thread); 0 then.

    Raises :class:`SimulateError` when it cannot start.
    """
    stop = stop or threading.Event()
    previous: list[tuple[int, Any]] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    if threading.current_thread() is threading.main_thread():
        # Installed before the simulator starts: a Ctrl-C during its start still
        # reaches the clean-up below.
        previous = [(sig, signal.signal(sig, on_signal)) for sig in (signal.SIGINT,
                                                                     signal.SIGTERM)]
    output = _Output(out, json_lines)
    try:
        sim = start_simulation(args)
        try:
            output.emit({"at": _now(), "event": "serving", "driver": sim.driver,
                         "what": sim.what, **sim.where, "faults": sim.faults,
                         "config": sim.config}, _banner(sim))
            _watch(sim, output, stop)
        finally:
            sim.close()
        gone = sim.port is None or not os.path.lexists(sim.port)
        removed = f"; {sim.port} removed" if sim.port is not None and gone else ""
        output.emit({"at": _now(), "event": "stopped", "removed": gone},
                    f"stopped{removed}\n")
    finally:
        for sig, handler in previous:
            signal.signal(sig, handler)
    return 0


def _watch(sim: Simulation, output: _Output, stop: threading.Event) -> None:
    """One line per change of the simulated hardware, until ``stop``."""
    before = sim.snapshot()
    while not stop.wait(ACTIVITY_POLL_S):
        now = sim.snapshot()
        for point, state in now.items():
            if before.get(point) != state:
                output.emit({"at": _now(), "event": "change", "point": point, "state": state},
                            f"{time.strftime('%H:%M:%S')}  {point:<12} {state}\n")
        before = now
