"""The options of ``stora-gateway simulate DRIVER``: one sub-command per driver.

Only the parser lives here: ``stora-gateway --help`` loads it (through the dev kit's CLI
plugin, devkit/commands.py), so it imports nothing heavy; the simulators and their
plumbing (``devkit/simulate.py``, ``devkit/sims/``) load only when ``simulate`` runs.

Fault switches are named after the simulators' own (``devkit/sims/*.py``) and take the
numbers a config uses: ``channel`` and ``door_input`` are 0-based, as in ``[[locks]]``.
"""

from __future__ import annotations

import argparse
from typing import Final

#: driver -> one-line help.  The order is contract §3's.
DRIVERS: Final = {
    "modbus": "a Modbus RTU relay board on a pseudo-terminal",
    "lockboard": "a hex-protocol lock board on a pseudo-terminal",
    "zigbee2mqtt": "a Zigbee2MQTT bridge with Zigbee locks, on an MQTT broker",
    "tasmota": "a Tasmota relay device, on an MQTT broker",
    "osdp": "an OSDP peripheral (libosdp PD, Secure Channel) on a pseudo-terminal",
}


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a probability from 0 to 1")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 3600.0:
        raise argparse.ArgumentTypeError(f"{text} is not a number of seconds from 0 to 3600")
    return value


def _serial(p: argparse.ArgumentParser, address: int, address_help: str) -> None:
    p.add_argument("--port", required=True, metavar="PATH",
                   help="where to publish the pseudo-terminal (a link, like "
                   "/dev/serial/by-id/…), in a directory only you may write to, e.g. "
                   "~/sim/ttyRS485; the config's port names it")
    p.add_argument("--address", type=int, default=address, help=address_help)


def _transport(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("bus faults (every reply)")
    g.add_argument("--no-reply", action="store_true",
                   help="act on requests but never answer (a broken transmitter)")
    g.add_argument("--dead", action="store_true", help="ignore every request (no power)")
    g.add_argument("--reply-delay", type=_seconds, default=0.0, metavar="S",
                   help="answer this late (a slow board, a too-short timeout)")
    g.add_argument("--corrupt", action="store_true",
                   help="flip one bit in every reply (the checksum fails)")
    g.add_argument("--noise", type=int, default=0, metavar="N",
                   help="N random bytes of line noise before every reply")


def _broker(p: argparse.ArgumentParser, user_help: str) -> None:
    p.add_argument("--host", default="127.0.0.1",
                   help="the broker the gateway's driver uses (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=1883, help="its TCP port (default 1883)")
    p.add_argument("--username", default=None, help=user_help)
    p.add_argument("--password-file", default=None, metavar="FILE",
                   help="file holding that account's password (not readable by others)")


def add_driver_parsers(simulate: argparse.ArgumentParser,
                       parents: list[argparse.ArgumentParser]) -> None:
    """Add ``DRIVER`` and each driver's options to the ``simulate`` parser."""
    sub = simulate.add_subparsers(dest="driver", metavar="DRIVER", required=True)

    def add(name: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=parents, help=DRIVERS[name],
                              description=f"Simulate {DRIVERS[name]}, until Ctrl-C.")

    p = add("modbus")
    _serial(p, 1, "slave id of the board (default 1)")
    p.add_argument("--coils", type=int, default=8, help="relays on the board (default 8)")
    p.add_argument("--inputs", type=int, default=8,
                   help="discrete inputs (door contacts), all closed (default 8)")
    _transport(p)
    g = p.add_argument_group("device faults")
    g.add_argument("--stuck-relay", type=int, action="append", default=[], metavar="CH",
                   help="relay CH acknowledges writes but does not move (a welded or "
                   "jammed relay: the read-back fails); repeatable")
    g.add_argument("--door-open", type=int, action="append", default=[], metavar="INPUT",
                   help="the door on input INPUT reads open (propped, or a broken "
                   "contact); repeatable")
    g.add_argument("--reply-as", type=int, default=None, metavar="ID",
                   help="answer with another slave id (a mis-set address switch)")

    p = add("lockboard")
    _serial(p, 0, "board number (default 0)")
    p.add_argument("--locks", type=int, default=16, help="locks on the board (default 16)")
    p.add_argument("--hold", type=_seconds, default=3.0, metavar="S",
                   help="how long a latch stays released after an open (default 3)")
    _transport(p)
    g = p.add_argument_group("device faults (CH = the lock's channel, 0-based)")
    g.add_argument("--jam", type=int, action="append", default=[], metavar="CH",
                   help="the latch does not release (door stuck); repeatable")
    g.add_argument("--door-open", type=int, action="append", default=[], metavar="CH",
                   help="the door reads open whatever happens; repeatable")
    g.add_argument("--no-door-sensor", type=int, action="append", default=[], metavar="CH",
                   help="the lock reports no door sensor; repeatable")

    p = add("zigbee2mqtt")
    _broker(p, "broker account of the simulated bridge (the shipped ACL's is zigbee2mqtt)")
    p.add_argument("--base-topic", default="zigbee2mqtt",
                   help="Zigbee2MQTT's base_topic (default zigbee2mqtt)")
    p.add_argument("--device", action="append", default=[], metavar="NAME",
                   help="a lock's friendly name, as [[locks]] device; repeatable "
                   "(default one lock, A-101)")
    p.add_argument("--report-delay", type=_seconds, default=0.2, metavar="S",
                   help="how long a lock takes to report after a command (default 0.2)")
    p.add_argument("--relock-after", type=_seconds, default=None, metavar="S",
                   help="the locks relock by themselves this long after an unlock")
    p.add_argument("--seed", type=int, default=0, help="seed of the random faults (default 0)")
    g = p.add_argument_group("faults")
    g.add_argument("--drop", type=_probability, default=0.0, metavar="P",
                   help="probability that a command is lost on the radio")
    g.add_argument("--skip-report", type=_probability, default=0.0, metavar="P",
                   help="probability that a lock moves but does not report")
    g.add_argument("--late", type=_probability, default=0.0, metavar="P",
                   help="probability that a report comes --late-by seconds late")
    g.add_argument("--late-by", type=_seconds, default=5.0, metavar="S",
                   help="how late a late report is (default 5)")
    g.add_argument("--silent", action="store_true",
                   help="the radio is dead while Zigbee2MQTT still says online")
    g.add_argument("--jam", action="append", default=[], metavar="NAME",
                   help="that lock stops at not_fully_locked when asked to lock; repeatable")

    p = add("tasmota")
    _broker(p, "broker account of the simulated device (default with --password-file: "
               "its --topic, as the shipped ACL names each device's account)")
    p.add_argument("--topic", default="gate_relay",
                   help="the device's Tasmota Topic, as [[controllers]] topic "
                   "(default gate_relay)")
    p.add_argument("--relays", type=int, default=2, help="relays, POWER1… (default 2)")
    p.add_argument("--switches", type=int, default=0,
                   help="switch inputs for door contacts, Switch1… (default 0)")
    p.add_argument("--loop-sleep", type=_seconds, default=0.05, metavar="S",
                   help="Tasmota's main-loop sleep: a command waits up to this (default "
                   "0.05, Tasmota's Sleep 50)")
    g = p.add_argument_group("faults")
    g.add_argument("--silent", action="store_true",
                   help="connected, but hears no command")
    g.add_argument("--drop-commands", action="store_true",
                   help="POWER changes are lost; queries are still answered")
    g.add_argument("--report-delay", type=_seconds, default=0.0, metavar="S",
                   help="every report this late")

    p = add("osdp")
    _serial(p, 0, "the PD's OSDP address, 0-126 (default 0)")
    p.add_argument("--outputs", type=int, default=4, help="outputs (strikes) (default 4)")
    p.add_argument("--inputs", type=int, default=4,
                   help="inputs (door contacts), all closed (default 4)")
    p.add_argument("--scbk-file", default=None, metavar="FILE",
                   help="the Secure Channel key: the same file as the controller's "
                   "scbk_file (32 hex digits)")
    g = p.add_argument_group("faults")
    g.add_argument("--no-sc", action="store_true",
                   help="the PD offers no Secure Channel (the gateway refuses it unless "
                   "allow_insecure)")
    g.add_argument("--install-mode", action="store_true",
                   help="the PD knows only the install key SCBK-D")
    g.add_argument("--silent", action="store_true", help="the PD answers nothing")
    g.add_argument("--door-open", type=int, action="append", default=[], metavar="INPUT",
                   help="input INPUT is active (door open); repeatable")
    g.add_argument("--tamper", action="store_true", help="the enclosure is open")
    g.add_argument("--power-failure", action="store_true",
                   help="the PD reports a power failure")
