"""Commands that other packages add to ``stora-gateway``: the CLI's plugin point.

The dev kit (``demo``, ``sandbox``, ``simulate``, ``selftest``) lives beside the product
and is never imported by it; it adds its commands by naming a sequence of
:class:`PluginCommand` under the entry-point group :data:`GROUP` of its distribution::

    [project.entry-points."stora_gateway.commands"]
    devkit = "devkit.commands:COMMANDS"

:func:`plugin_commands` finds them at start, in ``sys.path`` order, the first
distribution of a name winning (as :mod:`importlib.metadata` does).  A plugin that fails
to load is left out with a warning: a broken dev tool must never take the technician's
commands with it.  A plugin never replaces a product command of the same name.

Why the ``entry_points.txt`` files are read here instead of through
:func:`importlib.metadata.entry_points`: importing :mod:`importlib.metadata` costs about
20 ms on a desktop (it pulls in ``email``, ``zipfile`` and ``csv``), a quarter of
``stora-gateway --help``'s whole cold start and several times that on a Pi; reading the
few small files of the PyPA entry-points format costs well under a millisecond.
``tests/gateway/cli/test_cli_plugins.py`` checks that both find the same entry points.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Final, NamedTuple

if TYPE_CHECKING:
    from gateway.cli.shell import Context

__all__ = ["GROUP", "PluginCommand", "entry_points", "load_entry_point", "plugin_commands"]

LOGGER = logging.getLogger(__name__)

#: The entry-point group of CLI plugins.
GROUP: Final = "stora_gateway.commands"
_METADATA_SUFFIXES: Final = (".dist-info", ".egg-info")


def _no_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    del parser, common


class PluginCommand(NamedTuple):
    """One command a plugin adds: its parser setup and its handler.

    ``add_arguments(parser, common)`` adds the command's options to ``parser``; ``common``
    is the parent of shared options (``--debug``, and ``--config``/``--json`` as
    chosen below), for a command with subcommands of its own.  ``run(ctx)`` returns
    the exit status and raises ``gateway.cli.shell.CliError`` for a one-line error.
    ``before`` names the command it is listed before in ``--help`` (``None``: last).
    The module that defines it should import nothing heavy: ``--help`` loads it.
    """

    name: str
    help: str
    run: Callable[[Context], int]
    add_arguments: Callable[[argparse.ArgumentParser, argparse.ArgumentParser], None] = (
        _no_arguments)
    reads_config: bool = False
    prints_json: bool = False
    before: str | None = None


def _normalize(name: str) -> str:
    """A distribution name as importlib.metadata compares them (PEP 503, underscores)."""
    return re.sub(r"[-_.]+", "_", name).lower()


def _parse(text: str, group: str) -> list[tuple[str, str]]:
    """``(name, value)`` of ``group`` in an ``entry_points.txt`` (an INI file)."""
    found: list[tuple[str, str]] = []
    section = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
        elif section == group and "=" in line:
            name, _, value = line.partition("=")
            found.append((name.strip(), value.strip()))
    return found


def entry_points(group: str, path: Iterable[str] | None = None) -> list[tuple[str, str]]:
    """The ``(name, value)`` entry points of ``group`` of the distributions on ``path``
    (default ``sys.path``), the first distribution of each name only."""
    seen: set[str] = set()
    found: list[tuple[str, str]] = []
    for entry in sys.path if path is None else path:
        try:
            with os.scandir(entry or ".") as found_here:
                names = sorted(e.name for e in found_here if e.name.endswith(_METADATA_SUFFIXES))
        except OSError:  # a zip file, a directory that went away
            continue
        for name in names:
            project = _normalize(name.rsplit(".", 1)[0].split("-", 1)[0])
            if project in seen:
                continue
            directory = os.path.join(entry or ".", name)
            if not os.path.isdir(directory):
                continue
            seen.add(project)
            try:
                with open(os.path.join(directory, "entry_points.txt"), encoding="utf-8") as f:
                    found += _parse(f.read(), group)
            except OSError:  # no entry points
                continue
    return found


def load_entry_point(value: str) -> object:
    """The object an entry point's ``module:attr`` value names (extras ignored)."""
    module, _, attr = value.split("[", 1)[0].strip().partition(":")
    obj: object = importlib.import_module(module.strip())
    for part in filter(None, attr.strip().split(".")):
        obj = getattr(obj, part)
    return obj


def _top(value: str) -> str:
    """The top-level package an entry point's ``module:attr`` value names."""
    return value.split("[", 1)[0].partition(":")[0].strip().split(".")[0]


def plugin_commands(reserved: Iterable[str] = (),
                    path: Iterable[str] | None = None) -> list[PluginCommand]:
    """Every plugin's commands, in entry-point order; names in ``reserved`` (the
    product's own commands) and repeated names are left out with a warning."""
    taken = set(reserved)
    commands: list[PluginCommand] = []
    for name, value in entry_points(GROUP, path):
        try:
            loaded = load_entry_point(value)
        except ModuleNotFoundError as exc:
            if exc.name is not None and _top(value) == exc.name.split(".")[0]:
                # Its package is not installed (deploy/install.sh installs the agent
                # without the dev kit that the distribution's metadata names): no plugin.
                LOGGER.debug("CLI plugin %s (%s) is not installed", name, value)
                continue
            LOGGER.warning("CLI plugin %s (%s) not loaded: %s: %s", name, value,
                           type(exc).__name__, exc)
            continue
        except Exception as exc:  # noqa: BLE001 (a broken plugin: warn, keep the CLI)
            LOGGER.warning("CLI plugin %s (%s) not loaded: %s: %s", name, value,
                           type(exc).__name__, exc)
            continue
        if not isinstance(loaded, Sequence) or not all(
                isinstance(c, PluginCommand) for c in loaded):
            LOGGER.warning("CLI plugin %s (%s) is not a sequence of PluginCommand", name,
                           value)
            continue
        for command in loaded:
            if command.name in taken:
                LOGGER.warning("CLI plugin %s: command %r already exists; left out", name,
                               command.name)
                continue
            taken.add(command.name)
            commands.append(command)
    return commands
