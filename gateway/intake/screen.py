"""What arrives on a signed topic, screened before the signature check costs anything.

Both signed topics, ``P/S/cmd`` (commands) and ``P/S/mgmt`` (management requests), take
their messages through one :class:`Screen`.  One Ed25519 verification costs more than
everything else a message costs the agent (about 170 µs on this project's x86 test
machine, more on a Pi), so a flood of tokens that each need one would outrun a core.
Two cheap steps come before it:

* **Refused before.**  A payload refused for a reason that cannot change
  (:data:`LASTING_REASONS`) is remembered by its BLAKE2b-128 hash, the last
  :data:`REFUSED_CACHE_MAX` of them; a repeat gets the same rejection without parsing.
  Replaying captured traffic, the cheapest flood there is, costs a hash per message.
* **Claims first while results are throttled.**  When the rejection bucket is empty no
  result would be published, so the exact reason no longer matters: a token whose
  claims could never be accepted (expired, another site, unknown unit, bad shape…) is
  dropped before its signature is checked (``CommandVerifier.verify_claims_first``) and
  counted as ``shed``.  A token that passes still gets the full check, so nothing that
  could be accepted is ever shed here; a late duplicate of a command this agent answered
  (its ``jti`` among the recent ones) still gets its original result.

Found in review: the management topic had neither step, so a repeated forgery there cost
36–140 times what it cost on the command topic, and each wrote an INFO line.

What remains is a flood of *distinct* forgeries whose claims are all plausible (right
site, fresh, a configured unit): each needs a full check, and the agent is then bound by
the curve.  The defence for that is the broker's ACL (deploy/README.md), which stops
foreign publishers before they cost the agent anything.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict, deque
from collections.abc import MutableMapping
from typing import Any, Final

from gateway.intake.commands import Command, CommandVerifier, Rejection
from sitelink.codes import Reason

__all__ = [
    "LASTING_REASONS",
    "REFUSED_CACHE_MAX",
    "RecentIds",
    "Screen",
    "TokenBucket",
]

#: Refused payloads remembered (by a 16-byte hash) to refuse a repeat without parsing it.
REFUSED_CACHE_MAX = 4096
#: Rejection reasons that no later moment can change for the same bytes under the same
#: configuration.  Not ``not_yet_valid`` or ``clock_untrusted`` (time cures those) and not
#: ``retained`` (the same bytes may come live).  ``expired`` is final while the trusted
#: clock only moves forward; when it does not (a step, the floor lowered or reset) the
#: agent calls :meth:`Screen.forget`.
LASTING_REASONS = frozenset({Reason.MALFORMED, Reason.BAD_SIGNATURE, Reason.UNKNOWN_KEY,
                             Reason.WRONG_SITE, Reason.EXPIRED, Reason.LIFETIME_TOO_LONG,
                             Reason.UNKNOWN_UNIT})
#: Marks a payload whose claims were refused while its signature was not checked.
_SHED: Final = object()


class TokenBucket:
    """A token bucket on the monotonic clock."""

    def __init__(self, rate: float, burst: int, clock: Any = time.monotonic) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self._clock = clock
        self._at = clock()
        self._lock = threading.Lock()
        self.dropped = 0

    def ready(self) -> bool:
        """True if :meth:`take` would succeed now (takes nothing)."""
        with self._lock:
            now = self._clock()
            tokens: float = min(self.burst, self.tokens + (now - self._at) * self.rate)
            return tokens >= 1

    def take(self) -> bool:
        """True if a token was available."""
        with self._lock:
            now = self._clock()
            self.tokens = min(self.burst, self.tokens + (now - self._at) * self.rate)
            self._at = now
            if self.tokens >= 1:
                self.tokens -= 1
                return True
            self.dropped += 1
            return False


class RecentIds:
    """The last ``size`` command ids, as their 64-bit hashes: "was this id seen lately?".

    Only hashes are kept (about 60 bytes an id instead of about 230 for the strings in an
    ordered dict: 1.7 MB less at 10,000, on a Pi).  A collision can only make an unseen
    id look recent, which costs a database lookup or a full signature check, never a
    wrong answer: the database decides.  Not thread-safe (the link's worker owns it).
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._set: set[int] = set()
        self._order: deque[int] = deque()

    def add(self, jti: str) -> None:
        """Remember ``jti`` (the oldest is forgotten beyond ``size``)."""
        key = hash(jti)
        if key in self._set:
            return
        self._set.add(key)
        self._order.append(key)
        if len(self._order) > self._size:
            self._set.discard(self._order.popleft())

    def __contains__(self, jti: object) -> bool:
        return isinstance(jti, str) and hash(jti) in self._set

    def __len__(self) -> int:
        return len(self._order)


class Screen:
    """Verifies the payloads of one signed topic, shedding what a flood repeats.

    :meth:`check` returns the verified :class:`Command`, the :class:`Rejection` to answer,
    or ``None`` when the payload was shed (nothing to answer: results are throttled).
    ``counters`` (the owner's) gets ``refused_again`` and ``shed``; ``bucket`` is the
    owner's rejection-result bucket, consulted and, for shed payloads, drawn from (each
    counts as a result not published).  ``recent`` holds the ids of commands this topic
    answered lately: a token refused on its claims alone whose ``jti`` is among them may
    be a late duplicate and gets the full check.  Not thread-safe: one link worker calls
    it.
    """

    def __init__(self, verifier: CommandVerifier, bucket: TokenBucket, *, max_bytes: int,
                 counters: MutableMapping[str, int], recent: RecentIds | None = None,
                 cache_max: int = REFUSED_CACHE_MAX) -> None:
        self.verifier = verifier
        self._bucket = bucket
        self._max_bytes = max_bytes
        self._counters = counters
        self._recent = recent
        self._cache_max = cache_max
        # BLAKE2b-128 of refused payloads -> their rejection, or _SHED when only the
        # claims were judged (the reason is then unknown).  OrderedDict, not dict:
        # popping a dict's oldest key scans the slots its earlier deletions left behind,
        # which a flood turns quadratic.
        self._refused: OrderedDict[bytes, Rejection | object] = OrderedDict()
        self._stale = False

    def reset(self, verifier: CommandVerifier) -> None:
        """New keys or rules: verify with ``verifier`` and forget every verdict."""
        self.verifier = verifier
        self._refused.clear()

    def forget(self) -> None:
        """Forget every verdict before the next check; safe from any thread (the clock
        stepped or its floor moved, so ``expired`` may no longer be final)."""
        self._stale = True

    def __len__(self) -> int:
        return len(self._refused)

    def check(self, payload: bytes, *, retained: bool) -> Command | Rejection | None:
        """The verdict on ``payload`` (see the class docstring)."""
        if self._stale:
            self._stale = False
            self._refused.clear()
        # Oversized payloads fail on their length alone; hashing them would cost more.
        digest = (hashlib.blake2b(payload, digest_size=16).digest()
                  if not retained and len(payload) <= self._max_bytes else None)
        known = self._refused.get(digest) if digest is not None else None
        if isinstance(known, Rejection):
            self._count("refused_again")
            return known
        throttled = not self._bucket.ready()
        if throttled and known is _SHED:
            self._shed()
            return None
        return self._verify(payload, retained, digest, throttled=throttled)

    def _verify(self, payload: bytes, retained: bool, digest: bytes | None, *,
                throttled: bool) -> Command | Rejection | None:
        try:
            if throttled:  # no result could be published: claims first, one parse
                return self.verifier.verify_claims_first(payload, retained=retained)
            return self.verifier.verify(payload, retained=retained)
        except Rejection as exc:
            rejection = exc
        if rejection.screened:
            if (self._recent is not None and rejection.jti is not None
                    and rejection.jti in self._recent):
                # Maybe a late duplicate of a command run here: it gets its original
                # result, which takes the signature check.
                return self._verify(payload, retained, digest, throttled=False)
            self._shed()
            if rejection.reason in LASTING_REASONS:  # not_yet_valid may pass later
                self._remember(digest, _SHED)
            return None
        if rejection.reason in LASTING_REASONS:
            self._remember(digest, rejection)
        return rejection

    def _shed(self) -> None:
        self._count("shed")
        self._bucket.take()  # counted as a result not published

    def _count(self, key: str) -> None:
        self._counters[key] = self._counters.get(key, 0) + 1

    def _remember(self, digest: bytes | None, verdict: Rejection | object) -> None:
        if digest is None:
            return
        if isinstance(verdict, Rejection):
            # Kept for long: drop what would keep the verifier's frames (and with them
            # the payload and parsed JSON) alive, the traceback of the exception that
            # was being handled when it was raised included.
            verdict.__context__ = verdict.__cause__ = None
            verdict.__traceback__ = None
        refused = self._refused
        refused.pop(digest, None)  # re-inserted last: a precise verdict replaces _SHED
        refused[digest] = verdict
        if len(refused) > self._cache_max:
            refused.popitem(last=False)
