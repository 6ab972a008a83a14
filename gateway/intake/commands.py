"""Command verification for this gateway: sitelink's verifier, configured from ``Config``.

The rules, their order, their messages and the design behind them are the protocol's
and live in :mod:`sitelink.verify` (golden vectors: ``sitelink/vectors/commands.json``).
What is the gateway's is here:

* :class:`CommandVerifier` takes the site id, the trusted keys, the skew and the
  lifetime from :class:`~gateway.config.Config`, the time and its trust from the
  agent's :class:`~gateway.clock.TrustedClock` (:class:`TrustedClockLike`), and for
  ``unknown_unit`` the exact unit ids of the configured locks;
* :class:`Rejection` is the rejection it raises: a :class:`sitelink.errors.Rejection`
  (what the relay and the protocol's tests catch) that is also a
  :class:`~gateway.errors.GatewayError`, so the gateway's error tree stays whole.

The other names are sitelink's, re-exported for the gateway's existing imports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import sitelink.errors
from gateway.errors import GatewayError
from sitelink.claims import MAX_COMMAND_BYTES, MAX_MGMT_BYTES, Command, Kind
from sitelink.codes import COMMANDS, MGMT_COMMANDS, Reason
from sitelink.verify import TrustedClockLike, Verifier

if TYPE_CHECKING:
    from gateway.config import Config

__all__ = [
    "COMMANDS",
    "MAX_COMMAND_BYTES",
    "MAX_MGMT_BYTES",
    "MGMT_COMMANDS",
    "Command",
    "CommandVerifier",
    "RejectReason",
    "Rejection",
    "TrustedClockLike",
]

#: The type of :attr:`Rejection.reason`: a contract §4 reason code, one of
#: :data:`sitelink.codes.VERIFIER_REASONS`.
RejectReason = Reason


class Rejection(sitelink.errors.Rejection, GatewayError):  # noqa: N818 - the published name
    """A command refused before it could reach the hardware (see
    :class:`sitelink.errors.Rejection` for the fields); also a
    :class:`~gateway.errors.GatewayError`."""


class CommandVerifier(Verifier):
    """Checks raw command payloads against one configuration (:mod:`sitelink.verify`).

    Keys, the site id and the unit ids are taken from ``config`` once, here, so a changed
    configuration needs a new verifier.  ``kind="mgmt"`` verifies management requests
    (``P/S/mgmt``): the same envelope, ``cmd`` from :data:`MGMT_COMMANDS`, ``args``
    allowed, ``unit`` optional and not looked up.  Thread-safe: it holds no mutable state.
    """

    rejection_type = Rejection

    def __init__(self, config: Config, clock: TrustedClockLike, *, kind: Kind = "cmd") -> None:
        super().__init__(
            site_id=config.site.id,
            trusted_keys=config.commands.trusted_keys,
            clock=clock,
            clock_skew_s=config.commands.clock_skew_s,
            max_lifetime_s=config.commands.max_lifetime_s,
            # Exact unit ids only; equivalent to config.lock_by_id(u) with .unit == u,
            # but without its reference fallback and linear scan.
            units=[lock.unit for lock in config.locks],
            kind=kind,
        )
