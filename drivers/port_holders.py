"""Who holds a serial port, and what to tell the person who cannot open it.

A port opened by another program (the agent, a terminal left in ``minicom``) refuses a
second opener: the drivers open device nodes with an exclusive lock.  "Port busy" alone
sends a technician hunting; the holder's pid and command line, read from
``/proc/<pid>/fd`` (links to the open files of each process we may inspect), say what
to stop.  A permission error names the group the device belongs to.

Pure reads of ``/proc`` and ``stat``; nothing here opens the port.
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["Holder", "busy_hint", "permission_hint", "port_holders"]

#: A holder's command line is cut to this many characters in a message.
COMMAND_MAX: Final = 80
#: The systemd unit of the agent (deploy/stora-gateway.service).
AGENT_UNIT: Final = "stora-gateway"


@dataclass(frozen=True, slots=True)
class Holder:
    """A process that has the port open."""

    pid: int
    command: str

    @property
    def is_agent(self) -> bool:
        """True when it looks like the gateway agent (``stora-gateway run``)."""
        words = self.command.split()
        return "run" in words and any(
            w.endswith(("stora-gateway", "gateway.cli.main", "gateway.cli")) for w in words)


def port_holders(path: str, *, proc: Path = Path("/proc")) -> list[Holder]:
    """Processes with ``path`` (or the device it links to) open, lowest pid first.

    Only processes whose ``fd`` directory we may read are seen: as an ordinary user,
    our own; as root, all.
    """
    try:
        target = os.path.realpath(path)
    except OSError:
        return []
    found: list[Holder] = []
    try:
        pids = sorted(int(p.name) for p in proc.iterdir() if p.name.isdigit())
    except OSError:
        return []
    for pid in pids:
        if _holds(proc / str(pid) / "fd", target):
            found.append(Holder(pid, _command(proc, pid)))
    return found


def _holds(fd_dir: Path, target: str) -> bool:
    try:
        fds = list(fd_dir.iterdir())
    except OSError:  # gone, or not ours to look at
        return False
    for fd in fds:
        try:
            if os.readlink(fd) == target:
                return True
        except OSError:  # closed meanwhile (the listing's own descriptor, for one)
            continue
    return False


def _command(proc: Path, pid: int) -> str:
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return "?"
    text = " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part)
    if not text:
        try:
            text = (proc / str(pid) / "comm").read_text().strip()
        except OSError:
            text = "?"
    return text if len(text) <= COMMAND_MAX else text[: COMMAND_MAX - 1] + "…"


def busy_hint(path: str, *, proc: Path = Path("/proc")) -> str:
    """Why ``path`` could not be opened when another program holds it, and what to do."""
    holders = port_holders(path, proc=proc)
    if not holders:
        return (f"port busy: another program has it open (`sudo fuser -v {path}` names it); "
                "stop it first")
    named = ", ".join(f"pid {h.pid} ({h.command})" for h in holders)
    if any(h.is_agent for h in holders):
        return (f"port in use by the gateway agent, {named}: commands go through it while "
                f"it runs; to use the port directly, pause it with `sudo systemctl stop "
                f"{AGENT_UNIT}` and start it again afterwards")
    return f"port in use by {named}: stop that program first"


def permission_hint(path: str) -> str:
    """Why this user may not open ``path`` and how to fix it (the device's group)."""
    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        user = str(os.geteuid())
    try:
        info = os.stat(path)
        group = grp.getgrgid(info.st_gid).gr_name
    except (OSError, KeyError):
        group = "dialout"  # Debian's group for serial devices
    return (f"permission denied: user {user} may not open {path}; add it to group {group} "
            f"(`sudo usermod -aG {group} {user}`, then log in again; the agent's service "
            f"user gets it from the unit's SupplementaryGroups)")
