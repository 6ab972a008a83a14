"""The CLI's shell: exit statuses, :class:`CliError`, :class:`Context`, and the command
table, the one place where the CLI loads code lazily.

**The lazy seam.**  ``stora-gateway --help`` must stay quick on a Raspberry Pi, so
parsing imports only the parser (``gateway/cli/parser.py``).  What runs a command is
named, not imported: :data:`COMMAND_TABLE` maps each subcommand to the function that
runs it as ``"module:function"``, and :func:`load` imports that module with
:mod:`importlib` only when that command runs.  Inside each command module, imports of
our own modules are ordinary top-level imports, so mypy sees every one of them.  Two
parts of a command load through the same table because they pull in much more than the
command itself always needs:

* :data:`SITE_ACCESS`: reading the config, building the hardware and asking the agent
  (``gateway/cli/site_access.py``), loaded the first time a command asks
  :class:`Context` for one of them (``ports`` and ``completion`` never do);
* :data:`ONLINE_CHECKS`: ``check-config --online``'s Stora checks, which load httpx
  through ``gateway/stora/http.py`` (``check-config`` without ``--online`` never does).

A module behind the table loads only when it is needed, so it imports heavy third-party
libraries at its top like anything else (pyserial in ``ports.py``, httpx in
``check_online.py``).  Plugins' commands (``gateway/cli/plugins.py``) are not in the
table: their parsers are built with ``--help``, their handlers come with them.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol, TextIO, cast

if TYPE_CHECKING:
    from gateway.config import Config, LockConfig
    from gateway.units.hardware import Site

__all__ = [
    "AGENT_ACTION_S",
    "AGENT_READ_S",
    "AGENT_TEST_MARGIN_S",
    "COMMAND_TABLE",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "ONLINE_CHECKS",
    "PROG",
    "SITE_ACCESS",
    "CliError",
    "Context",
    "SiteAccess",
    "command_handler",
    "load",
]

PROG: Final = "stora-gateway"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

#: How long the CLI waits for the agent's answer (after which it says the agent "may
#: still be acting", and never falls back to direct mode).  An unlock or lock waits in
#: the unit's queue for up to two minutes (``gateway.agent.CONTROL_WAIT_S``) first.
AGENT_ACTION_S = 180.0
#: ``status`` and ``locks`` only read; a minute covers every controller timing out.
AGENT_READ_S = 60.0
#: ``test``: on top of ``AGENT_ACTION_S``, per lock its unlock time, its relock timeout
#: and this for the bus's retries.
AGENT_TEST_MARGIN_S = 15.0

#: What runs each of the product's commands (the lazy seam: see the module docstring).
#: ``gateway/cli/parser.py`` lists the same names with their help.
COMMAND_TABLE: Final[Mapping[str, str]] = {
    "run": "gateway.cli.run:cmd_run",
    "status": "gateway.cli.status:run_status",
    "check-config": "gateway.cli.check_config:cmd_check_config",
    "init": "gateway.cli.init_config:cmd_init",
    "ports": "gateway.cli.ports:cmd_ports",
    "scan": "gateway.cli.technician:run_scan",
    "locks": "gateway.cli.doors:cmd_locks",
    "unlock": "gateway.cli.doors:cmd_unlock",
    "lock": "gateway.cli.doors:cmd_lock",
    "test": "gateway.cli.technician:run_test",
    "outbox": "gateway.cli.records:cmd_outbox",
    "watch": "gateway.cli.watch:cmd_watch",
    "clock": "gateway.cli.records:cmd_clock",
    "completion": "gateway.cli.completion:cmd_completion",
}
#: Builds a command's :class:`SiteAccess` from its parsed arguments.
SITE_ACCESS: Final = "gateway.cli.site_access:site_access"
#: ``check_online(StoraConfig) -> list[Check]``: ``check-config --online``.
ONLINE_CHECKS: Final = "gateway.cli.check_online:check_online"


def load(target: str) -> Callable[..., object]:
    """The callable a ``"module:attribute"`` target names, its module imported now."""
    module, _, attribute = target.partition(":")
    found: object = getattr(importlib.import_module(module), attribute)
    if not callable(found):
        raise TypeError(f"{target} is not callable")
    return cast("Callable[..., object]", found)


def command_handler(name: str) -> Callable[[Context], int] | None:
    """The function that runs the product's command ``name`` (``None``: not ours)."""
    target = COMMAND_TABLE.get(name)
    return None if target is None else cast("Callable[[Context], int]", load(target))


class CliError(Exception):
    """A failure to report in one sentence with an exit status."""

    def __init__(self, message: str, status: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.status = status


class SiteAccess(Protocol):
    """The config, the hardware and the agent, as a command reaches them
    (``gateway/cli/site_access.py``)."""

    def config(self) -> Config:
        """The config (loaded once; errors are one line, exit 2)."""
        ...

    def find_lock(self, text: str) -> LockConfig:
        """A lock by unit id or reference, or a :class:`CliError` naming near matches."""
        ...

    def site(self, only: Sequence[str] | None = None) -> Site:
        """The hardware (ports open lazily)."""
        ...

    def ask_agent(self, method: str, timeout: float, **params: Any) -> dict[str, Any]:
        """The running agent's answer, or ``AgentUnavailable`` when none answers."""
        ...

    def through_agent(self, method: str, timeout: float,
                      **params: Any) -> dict[str, Any] | None:
        """:meth:`ask_agent`, or ``None`` when no agent answers."""
        ...


class Context:
    """What a command needs: parsed args, streams, and the config, the hardware and the
    agent on demand (through :class:`SiteAccess`, loaded the first time it is asked)."""

    def __init__(self, args: argparse.Namespace, out: TextIO, err: TextIO) -> None:
        self.args = args
        self.out = out
        self.err = err
        self._access: SiteAccess | None = None

    @property
    def json(self) -> bool:
        """True when the user asked for JSON."""
        return bool(getattr(self.args, "json", False))

    @property
    def access(self) -> SiteAccess:
        """The config, the hardware and the agent for this command's arguments."""
        if self._access is None:
            make = cast("Callable[[argparse.Namespace], SiteAccess]", load(SITE_ACCESS))
            self._access = make(self.args)
        return self._access

    def config(self) -> Config:
        """Load the config (errors become a one-line message, exit 2)."""
        return self.access.config()

    def find_lock(self, text: str) -> LockConfig:
        """A lock by unit id or reference, or a usage error naming the config file."""
        return self.access.find_lock(text)

    def site(self, only: Sequence[str] | None = None) -> Site:
        """Build the hardware (ports open lazily)."""
        return self.access.site(only)

    def ask_agent(self, method: str, timeout: float, **params: Any) -> dict[str, Any]:
        """Ask the running agent; ``AgentUnavailable`` when none answers.

        A refusal is a usage error (exit 2); an error the agent answered with keeps its
        status.  ``timeout`` bounds the wait for the answer, sized to the work asked for.
        """
        return self.access.ask_agent(method, timeout, **params)

    def through_agent(self, method: str, timeout: float, **params: Any) -> dict[str, Any] | None:
        """:meth:`ask_agent`, or ``None`` when no agent answers (the caller goes direct).

        Only "nobody answered the connection" falls back: once the request is sent, the
        agent may be acting on it, and a second actor on the bus is what the socket is
        there to prevent.
        """
        return self.access.through_agent(method, timeout, **params)
