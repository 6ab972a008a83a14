"""The Idempotency-Key of one event's delivery attempt, and how long a key is safe.

The rule (docs/design/idempotency.md): keep the key until Stora has said, under that
key, that nothing was created; only then move to the next generation.  Pure: no I/O,
no clock.  See docs/design/idempotency.md.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Final

__all__ = ["IDEMPOTENCY_TTL_S", "IN_PROGRESS_GRACE_S", "REPLAY_SAFE_S", "IdempotencyKey"]

#: stora-api §5: a stored response is replayed for 24 hours, then the key is new.
IDEMPOTENCY_TTL_S: Final = 86_400.0
#: Sending an unanswered key later than this could create its event twice
#: (docs/design/idempotency.md); one hour short of the TTL covers clock drift and a
#: retry that is itself slow.
REPLAY_SAFE_S: Final = IDEMPOTENCY_TTL_S - 3_600.0
#: A 409 on a key whose earlier attempt went unanswered is read as "still in progress"
#: for this long; later it is the stored answer and the event is dead-lettered.
IN_PROGRESS_GRACE_S: Final = 600.0


@dataclass(frozen=True, slots=True)
class IdempotencyKey:
    """The key of one event's current delivery attempt, and what must be kept about it.

    ``value`` is ``f"{external_id}.{generation}"``.  ``unanswered_since`` is the wall
    time of the first attempt under this generation that got no answer (the server may
    have created the event): the key must then be kept, and retried within
    :data:`REPLAY_SAFE_S`.  The caller persists all three fields from every outcome.
    """

    external_id: str
    generation: int = 0
    unanswered_since: float | None = None

    def __post_init__(self) -> None:
        ext = self.external_id
        if not ext or any(c.isspace() or not c.isprintable() for c in ext):
            raise ValueError("an external id must be non-empty printable text without spaces")
        if self.generation < 0:
            raise ValueError("a key generation cannot be negative")

    @property
    def value(self) -> str:
        """The ``Idempotency-Key`` header value."""
        return f"{self.external_id}.{self.generation}"

    def rotated(self) -> IdempotencyKey:
        """The next generation: only once Stora has said nothing was created under this one."""
        return IdempotencyKey(self.external_id, self.generation + 1, None)

    def unanswered(self, at: float) -> IdempotencyKey:
        """This key, marked as having had an attempt without an answer (earliest kept)."""
        if self.unanswered_since is not None:
            return self
        return replace(self, unanswered_since=at)

    def replay_deadline(self) -> float | None:
        """The wall time after which this key must not be sent again, or ``None``."""
        if self.unanswered_since is None:
            return None
        return self.unanswered_since + REPLAY_SAFE_S
