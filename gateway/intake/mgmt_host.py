"""What remote management acts on (gateway/intake/mgmt.py): :class:`ManagementHost`,
implemented by the operations service (gateway/ops/service.py), so that management
never imports the agent or the operations layer above it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from gateway.clock import TrustedClock
from gateway.config import Config
from gateway.intake.screen import TokenBucket
from gateway.link.mqtt import MqttLink
from gateway.store import Store
from sitelink.topics import Topics

__all__ = ["ManagementHost"]


class ManagementHost(Protocol):
    """What management requests act on: the running gateway's operations service
    (gateway/ops/service.py :class:`~gateway.ops.service.Operations`)."""

    @property
    def config(self) -> Config:
        """The live configuration."""
        ...

    @property
    def clock(self) -> TrustedClock:
        """The trusted clock."""
        ...

    @property
    def store(self) -> Store:
        """The state database."""
        ...

    @property
    def link(self) -> MqttLink:
        """The broker link."""
        ...

    @property
    def topics(self) -> Topics:
        """The site's topics."""
        ...

    @property
    def rejections(self) -> TokenBucket:
        """The rejection-result bucket shared with commands."""
        ...

    @property
    def started_at(self) -> float:
        """When the agent started (wall clock)."""
        ...

    def alarm(self, kind: str, unit: str | None, detail: str) -> None:
        """Publish an alarm."""

    def status(self) -> dict[str, Any]:
        """The agent's status (the retained ``P/S/status`` payload)."""
        ...

    def apply_config(self, new: Config) -> tuple[list[str], str]:
        """Apply a validated configuration: the changed sections, ``live``/``restart``."""
        ...

    def needs_restart(self, new: Config) -> bool:
        """Whether applying ``new`` takes a new process."""
        ...

    def request_restart(self, why: str) -> None:
        """Stop cleanly and exit for a restart."""

    def remote_locks_test(self, params: Mapping[str, Any], actor: str) -> dict[str, Any]:
        """The technician's test; :class:`~gateway.intake.mgmt.RequestError` when
        refused."""
        ...

    def remote_outbox_retry(self, params: Mapping[str, Any], actor: str) -> dict[str, Any]:
        """Retry dead-lettered events; :class:`~gateway.intake.mgmt.RequestError` when
        refused."""
        ...

    def republish_state(self) -> None:
        """Every unit's retained state and the status, published again."""

    def reset_clock_floor(self, actor: str) -> dict[str, Any]:
        """The trusted-time floor back to the build date, audited with ``actor``."""
        ...
