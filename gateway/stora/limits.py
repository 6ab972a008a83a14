"""What the Stora client bounds: the text it keeps of an answer, the ids it trusts, the
time a token request may take.  Light on purpose (no HTTP library): the outbox's
policy and the status command read these without loading httpx.
"""

from __future__ import annotations

import re
from typing import Final

from gateway import errors

__all__ = ["MAX_TEXT_CHARS", "TOKEN_DEADLINE_S", "cap_text", "safe_id"]

#: A string taken from outside (an error's code, message or detail, an id, a header) is
#: kept to this many characters.  Stora's documented messages are one short sentence;
#: the alarm, ``last_error`` and the retained status that quote a few of them must stay
#: far below the site broker's ``max_packet_size 65536`` (deploy/mosquitto/), which an
#: 80 KB message once pushed them over, getting the agent disconnected at each reconnect.
MAX_TEXT_CHARS: Final = 300
#: Stora's ids are opaque prefixed strings (``aevt_…``, stora-api §1): letters, digits,
#: ``_`` and ``-``.  Anything else is not kept, so it is never logged or stored raw.
_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: The whole token exchange, connect to last byte.  The token lock is held across it and
#: the event that needs the token waits behind it, so it is shorter than an event's
#: deadline: a healthy endpoint answers in well under a second, and a stuck refresh is
#: over (and, after ``TOKEN_ALARM_AFTER_S`` of gateway/outbox/policy.py, an alarm)
#: within a minute.
TOKEN_DEADLINE_S: Final = 15.0


def cap_text(value: object, limit: int = MAX_TEXT_CHARS) -> str:
    """``value`` (``str()`` of it) as one line of at most ``limit`` characters.

    :func:`gateway.errors.cap_text`: non-printable characters escaped first, so the
    limit counts what a reader sees; a cut is marked ``…(+N chars)``.
    """
    return errors.cap_text(value if isinstance(value, str) else str(value), limit)


def safe_id(value: object) -> str | None:
    """``value`` when it looks like a Stora id (``^[A-Za-z0-9_-]{1,64}$``), else ``None``."""
    if isinstance(value, str) and _ID_RE.fullmatch(value):
        return value
    return None
