"""Every timing of the agent's link: :class:`LinkTimings`, and the reconnect policy
(:func:`full_jitter_delay`, the drivers' one policy, :mod:`drivers.mqtt.backoff`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from drivers.mqtt.backoff import MAX_EXPONENT, full_jitter_delay

__all__ = ["MAX_EXPONENT", "SESSION_EXPIRY_S", "LinkTimings", "full_jitter_delay"]

#: How long the broker keeps our session (subscriptions and queued QoS 1 commands) after
#: a disconnect.  Longer than any command may live (max_lifetime_s is at most a day, 300 s
#: by default), so nothing still valid is lost in a short outage; queued ones that expired
#: meanwhile are rejected `expired` when they arrive.
SESSION_EXPIRY_S: Final = 86_400


@dataclass(frozen=True, slots=True)
class LinkTimings:
    """Every timing of the link, in seconds; tests shrink them rather than sleep.

    ``backoff_initial_s`` / ``backoff_max_s``: reconnect delays, ``uniform(0, min(max,
    initial * 2**n))`` (full jitter, "Exponential Backoff And Jitter", AWS Architecture
    Blog, 2015); the cap keeps a gateway that was offline for an hour trying every
    minute.  ``liveness_interval_s`` / ``liveness_timeout_s``: how often the link proves
    the round trip through the broker, and how long an echo may take on a healthy
    loopback or LAN broker (milliseconds in practice; 10 s tolerates a loaded broker).
    ``connect_timeout_s`` bounds TCP connect, TLS handshake, CONNACK and SUBACK
    together.  ``stable_after_s``: a connection that stayed up this long resets the
    backoff, so a broker that accepts and then drops every connection still meets a
    growing delay.
    """

    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    liveness_interval_s: float = 15.0
    liveness_timeout_s: float = 10.0
    connect_timeout_s: float = 10.0
    stable_after_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("backoff_initial_s", "backoff_max_s", "liveness_interval_s",
                     "liveness_timeout_s", "connect_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"LinkTimings.{name} must be > 0, got {getattr(self, name)}")
        if self.stable_after_s < 0:
            raise ValueError(f"LinkTimings.stable_after_s must be >= 0, got "
                             f"{self.stable_after_s}")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("LinkTimings.backoff_max_s must be >= backoff_initial_s")
