"""What the link carries: :class:`Message` (one message from the broker), the status
payloads it publishes itself, and the cap on what it may publish
(:class:`OversizeLog`, with :func:`gateway.link.wire.publish_packet_size`)."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Final

from sitelink.payloads import offline_status_payload

__all__ = ["FALLBACK_BIRTH", "OFFLINE_PAYLOAD", "Message", "OversizeLog"]

#: What a clean stop leaves retained on the status topic (contract §4).
OFFLINE_PAYLOAD: Final = json.dumps(offline_status_payload(), separators=(",", ":")).encode()
#: Published when ``birth()`` itself fails: the link is up, whatever else is unknown.
FALLBACK_BIRTH: Final = b'{"online":true}'
#: An outgoing message over ``max_packet_bytes`` is logged at most once per topic per
#: this long: an alarm repeated every reconciliation pass must not flood the journal.
OVERSIZE_LOG_INTERVAL_S: Final = 600.0
#: Topics remembered for that rate limit; beyond it the memory starts afresh (unit
#: topics are bounded by the config, so this is only a guard).
_OVERSIZE_TOPICS_KEPT: Final = 256


@dataclass(frozen=True, slots=True)
class Message:
    """One message from the broker, as the agent sees it.

    ``received_at`` is the link's monotonic clock when paho decoded the packet, so the
    agent can measure queueing delay.  ``retain`` is true for a retained message
    delivered on subscribe (a command must reject it, contract §5); ``dup`` for a
    redelivery the broker marked as such.
    """

    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    received_at: float


class OversizeLog:
    """When a refused oversize message may be logged at WARNING: once per topic per
    :data:`OVERSIZE_LOG_INTERVAL_S` (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # topic -> when it may be logged again (the link's clock).
        self._next: dict[str, float] = {}

    def due(self, topic: str, now: float) -> bool:
        """True when a refusal on ``topic`` at ``now`` is to be logged loudly."""
        with self._lock:
            due = self._next.get(topic, now) <= now
            if due:
                if len(self._next) >= _OVERSIZE_TOPICS_KEPT:
                    self._next.clear()
                self._next[topic] = now + OVERSIZE_LOG_INTERVAL_S
        return due
