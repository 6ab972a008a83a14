"""How a command reaches the config, the hardware and the running agent.

Loaded through the command table's seam (``gateway/cli/shell.py``, :data:`SITE_ACCESS`)
the first time a command asks its :class:`~gateway.cli.shell.Context` for one of them,
so ``--help``, ``ports`` and ``completion`` never load the config's code.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import Any

from gateway.cli.shell import EXIT_USAGE, CliError, SiteAccess
from gateway.config import Config, LockConfig, config_path_from_env, load_config
from gateway.ops.control import AgentUnavailable, ControlClient, ControlDenied, ControlError
from gateway.ops.lookup import unknown_unit_message
from gateway.units.hardware import Site, build_site

__all__ = ["ConfiguredSite", "site_access"]

LOGGER = logging.getLogger(__name__)


def site_access(args: argparse.Namespace) -> SiteAccess:
    """The :class:`~gateway.cli.shell.SiteAccess` of a command run with ``args``."""
    return ConfiguredSite(args.config)


class ConfiguredSite:
    """The config named by ``--config`` (else ``$STORA_GATEWAY_CONFIG``, else the
    default), loaded once, and the hardware and the agent it describes."""

    def __init__(self, config_path: str | None) -> None:
        self._path = config_path
        self._config: Config | None = None

    def config(self) -> Config:
        """Load the config (errors become a one-line message, exit 2)."""
        if self._config is None:
            self._config = load_config(config_path_from_env(self._path))
        return self._config

    def find_lock(self, text: str) -> LockConfig:
        """A lock by unit id or reference, or a usage error naming the config file."""
        config = self.config()
        lock = config.lock_by_id(text)
        if lock is None:
            raise CliError(unknown_unit_message(config, text))  # with the near matches
        return lock

    def site(self, only: Sequence[str] | None = None) -> Site:
        """Build the hardware (ports open lazily)."""
        return build_site(self.config(), only=only)

    def ask_agent(self, method: str, timeout: float, **params: Any) -> dict[str, Any]:
        """Ask the running agent; ``AgentUnavailable`` when none answers.

        A refusal is a usage error (exit 2); an error the agent answered with keeps its
        status.
        """
        client = ControlClient(self.config().control.socket, timeout=timeout)
        try:
            return client.call(method, **params)
        except ControlDenied as exc:
            raise CliError(str(exc), EXIT_USAGE) from exc
        except ControlError as exc:
            raise CliError(str(exc), exc.status) from exc

    def through_agent(self, method: str, timeout: float, **params: Any) -> dict[str, Any] | None:
        """:meth:`ask_agent`, or ``None`` when no agent answers (the caller goes direct)."""
        try:
            return self.ask_agent(method, timeout, **params)
        except AgentUnavailable as exc:
            LOGGER.debug("agent not running (%s): direct mode", exc)
            return None
