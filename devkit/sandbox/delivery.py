"""Signed webhook deliveries (stora-api §4.2–§4.4) from a background thread.

One worker thread sends queued deliveries in order with :mod:`http.client`, retries a
non-2xx or a failed connection on a schedule, and keeps a log of every attempt.  Fault
switches make it behave as Stora may: the same event twice, deliveries in reverse order,
an old or a kept ``t``, a wrong signature.  Retries wait on real (monotonic) time, short
in tests; the signature's ``t`` and the log's times come from the sandbox's clock.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

from devkit.sandbox.rules import LOGGER, Clock, _count
from devkit.sandbox.webhooks import USER_AGENT, Endpoint, signature

#: Stora retries a failed delivery up to 6 times, "1 min, 5 min, 30 min …" (stora-api
#: §4.4); the rest of the schedule is not documented, so it goes on growing.
RETRY_S: Final = (60.0, 300.0, 1800.0, 3600.0, 10800.0, 21600.0)
#: How long an attempt waits for the receiver's answer (Stora's is not documented).
TIMEOUT_S: Final = 5.0
#: How far back ``stale_t`` dates a signature by default.
STALE_BY_S: Final = 3600


@dataclass(slots=True, eq=False)
class _Delivery:
    id: str
    event_id: str
    event_type: str
    endpoint: Endpoint
    body: bytes
    stale: bool = False
    bad_signature: bool = False
    due: float = 0.0  # monotonic
    first_t: int | None = None
    state: str = "pending"  # held, pending, delivered, failed, skipped
    attempts: list[dict[str, Any]] = field(default_factory=list)
    raw: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "event_id": self.event_id, "event_type": self.event_type,
            "endpoint_id": self.endpoint.id, "operator": self.endpoint.operator,
            "url": self.endpoint.url, "state": self.state, "raw": self.raw,
            "stale_t": self.stale, "bad_signature": self.bad_signature,
            "attempts": [dict(a) for a in self.attempts],
        }


@dataclass(slots=True)
class _Switches:
    duplicate: int = 0
    reorder: int = 0
    stale_t: int = 0
    stale_by_s: int = STALE_BY_S
    keep_t_on_retry: bool = False
    bad_signature: int = 0


class Deliverer:
    """The queue, the worker thread, the switches and the log of webhook deliveries."""

    def __init__(self, now: Clock, retry_s: Sequence[float] = RETRY_S,
                 timeout_s: float = TIMEOUT_S) -> None:
        self._now = now
        self.retry_s = _schedule(retry_s)
        self.timeout_s = _timeout(timeout_s)
        self._cond = threading.Condition()
        self._queue: list[_Delivery] = []
        self._held: list[_Delivery] = []
        self._log: list[_Delivery] = []
        self._sending: _Delivery | None = None
        self._paused = False
        self._stopping = False
        self._switches = _Switches()
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker thread."""
        with self._cond:
            self._stopping = False
        self._thread = threading.Thread(target=self._run, name="stora-sandbox-webhooks",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the worker (an attempt under way ends within its timeout)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # -- switches -----------------------------------------------------------------------
    def configure(self, *, duplicate: int | None = None, reorder: int | None = None,
                  stale_t: int | None = None, stale_by_s: int | None = None,
                  keep_t_on_retry: bool | None = None, bad_signature: int | None = None,
                  retry_s: Sequence[float] | None = None, timeout_s: float | None = None,
                  reset: bool = False) -> None:
        """Set the switches given (``reset`` first turns every switch off).

        ``duplicate``: the next n events go out twice.  ``reorder``: the next n
        deliveries are held, then queued newest first once the n-th arrives (or at a
        flush).  ``stale_t``: the next n deliveries are signed with ``t`` = now −
        ``stale_by_s``.  ``keep_t_on_retry``: retries keep the first attempt's ``t``.
        ``bad_signature``: the next n deliveries carry a wrong ``v1``.
        """
        schedule = None if retry_s is None else _schedule(retry_s)
        timeout = None if timeout_s is None else _timeout(timeout_s)
        with self._cond:
            s = _Switches() if reset else self._switches
            s.duplicate = _count(duplicate) if duplicate is not None else s.duplicate
            s.reorder = _count(reorder) if reorder is not None else s.reorder
            s.stale_t = _count(stale_t) if stale_t is not None else s.stale_t
            s.stale_by_s = _count(stale_by_s) if stale_by_s is not None else s.stale_by_s
            s.bad_signature = _count(bad_signature) if bad_signature is not None \
                else s.bad_signature
            if keep_t_on_retry is not None:
                s.keep_t_on_retry = keep_t_on_retry
            self._switches = s
            if schedule is not None:
                self.retry_s = schedule
            if timeout is not None:
                self.timeout_s = timeout

    def pause(self) -> None:
        """Hold every delivery in the queue until :meth:`resume` or :meth:`flush`."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        """Send again what :meth:`pause` held."""
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def flush(self, timeout: float = 10.0) -> bool:
        """Release held deliveries, resume, make every pending retry due now, and wait
        until each has had its attempt; ``False`` if that took over ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._release_held()
            self._paused = False
            mark = time.monotonic()
            for d in self._queue:
                d.due = min(d.due, mark)
            self._cond.notify_all()
            while self._sending is not None or any(d.due <= mark for d in self._queue):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    # -- deliveries ---------------------------------------------------------------------
    def enqueue(self, endpoints: Sequence[Endpoint], event: Mapping[str, Any]) -> list[str]:
        """Queue ``{"event": event}`` for each endpoint; the deliveries' ids."""
        body = json.dumps({"event": event}, separators=(",", ":")).encode()
        ids = []
        with self._cond:
            s = self._switches
            copies = 1
            if s.duplicate > 0:
                s.duplicate -= 1
                copies = 2
            for endpoint in endpoints:
                for _ in range(copies):
                    d = _Delivery(f"dlv_{uuid.uuid4().hex[:24]}", event["id"], event["type"],
                                  endpoint, body, due=time.monotonic())
                    if s.stale_t > 0:
                        s.stale_t -= 1
                        d.stale = True
                    if s.bad_signature > 0:
                        s.bad_signature -= 1
                        d.bad_signature = True
                    self._log.append(d)
                    ids.append(d.id)
                    if s.reorder > 0:
                        d.state = "held"
                        self._held.append(d)
                        if len(self._held) >= s.reorder:
                            s.reorder = 0
                            self._release_held()
                    else:
                        self._queue.append(d)
            self._cond.notify_all()
        return ids

    def deliver_raw(self, endpoint: Endpoint, body: bytes, *, secret: str | None = None,
                    t: int | None = None, sign: bool = True,
                    headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Send ``body`` to ``endpoint`` now, once, in the caller's thread: signed with
        the endpoint's secret (or ``secret``) at ``t`` (default now) unless ``sign`` is
        false; ``headers`` are added last (a forged ``X-Stora-Signature``).  The attempt."""
        d = _Delivery(f"dlv_{uuid.uuid4().hex[:24]}", "", "raw", endpoint, body, raw=True)
        with self._cond:
            self._log.append(d)
        stamp = int(self._now()) if t is None else t
        extra = dict(headers or {})
        if sign:
            extra.setdefault("X-Stora-Signature", signature(secret or endpoint.secret,
                                                            stamp, body))
        attempt = self._post(d, extra, stamp)
        with self._cond:
            d.attempts.append(attempt)
            d.state = "delivered" if _ok(attempt) else "failed"
            self._cond.notify_all()
        return dict(attempt)

    def log(self, operator: str | None = None, endpoint: str | None = None) -> list[dict[str, Any]]:
        """Every delivery (queued, held, done), oldest first, with its attempts."""
        with self._cond:
            return [d.as_dict() for d in self._log
                    if operator in (None, d.endpoint.operator)
                    and endpoint in (None, d.endpoint.id)]

    def state(self) -> dict[str, Any]:
        """Switches and counts, for ``GET /_sandbox/state``."""
        with self._cond:
            s = self._switches
            return {
                "paused": self._paused, "queued": len(self._queue), "held": len(self._held),
                "deliveries": len(self._log),
                "delivered": sum(d.state == "delivered" for d in self._log),
                "failed": sum(d.state == "failed" for d in self._log),
                "duplicate": s.duplicate, "reorder": s.reorder, "stale_t": s.stale_t,
                "stale_by_s": s.stale_by_s, "keep_t_on_retry": s.keep_t_on_retry,
                "bad_signature": s.bad_signature, "retry_s": list(self.retry_s),
                "timeout_s": self.timeout_s,
            }

    # -- the worker ---------------------------------------------------------------------
    def _release_held(self) -> None:
        """Queue the held deliveries newest first (caller holds the lock)."""
        for d in reversed(self._held):
            d.state = "pending"
            d.due = time.monotonic()
            self._queue.append(d)
        self._held.clear()

    def _next_due(self) -> tuple[_Delivery | None, float | None]:
        """The first due delivery, or how long until one is due (caller holds the lock)."""
        if self._paused:
            return None, None
        now = time.monotonic()
        for d in self._queue:
            if d.due <= now:
                return d, None
        return None, min((d.due - now for d in self._queue), default=None)

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        return
                    d, wait = self._next_due()
                    if d is not None:
                        break
                    self._cond.wait(wait)
                self._queue.remove(d)
                self._sending = d
                skip = d.endpoint.status != "enabled"
                stamp = self._stamp(d)
            attempt = None if skip else self._post(d, self._signed(d, stamp), stamp)
            with self._cond:
                self._sending = None
                self._settle(d, attempt)
                self._cond.notify_all()

    def _stamp(self, d: _Delivery) -> int:
        """This attempt's ``t`` (caller holds the lock)."""
        s = self._switches
        if d.first_t is not None and s.keep_t_on_retry:
            return d.first_t
        stamp = int(self._now()) - (s.stale_by_s if d.stale else 0)
        if d.first_t is None:
            d.first_t = stamp
        return stamp

    def _signed(self, d: _Delivery, stamp: int) -> dict[str, str]:
        secret = d.endpoint.secret[::-1] if d.bad_signature else d.endpoint.secret
        return {"X-Stora-Signature": signature(secret, stamp, d.body)}

    def _settle(self, d: _Delivery, attempt: dict[str, Any] | None) -> None:
        """Record an attempt and decide: done, failed, or a retry (caller holds the lock)."""
        if attempt is None:
            d.state = "skipped"  # the endpoint was disabled meanwhile
            return
        d.attempts.append(attempt)
        if _ok(attempt):
            d.state = "delivered"
        elif len(d.attempts) <= len(self.retry_s):
            d.due = time.monotonic() + self.retry_s[len(d.attempts) - 1]
            self._queue.append(d)
        else:
            d.state = "failed"

    def _post(self, d: _Delivery, extra: Mapping[str, str], stamp: int) -> dict[str, Any]:
        """One HTTP attempt (no lock held): its record.  A 3xx is an answer, not followed."""
        request_id = str(uuid.uuid4())
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT,
                   "X-Stora-Request-Id": request_id, **extra}
        status: int | None = None
        error: str | None = None
        at = self._now()
        parts = urlsplit(d.endpoint.url)
        kind = http.client.HTTPSConnection if parts.scheme == "https" else \
            http.client.HTTPConnection
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn = kind(parts.hostname or "", parts.port, timeout=self.timeout_s)
        try:
            conn.request("POST", target, d.body, headers)
            answer = conn.getresponse()
            answer.read()
            status = answer.status
        except (OSError, http.client.HTTPException, ValueError) as exc:  # refused, reset, timeout
            error = f"{type(exc).__name__}: {exc}"
        finally:
            conn.close()
        LOGGER.debug("delivery %s of %s to %s: %s", d.id, d.event_id, d.endpoint.url,
                     status or error)
        return {"request_id": request_id, "at": at, "t": stamp, "status": status,
                "error": error, "signature": headers.get("X-Stora-Signature")}


def _ok(attempt: Mapping[str, Any]) -> bool:
    status = attempt.get("status")
    return isinstance(status, int) and 200 <= status < 300


def _schedule(retry_s: Sequence[float]) -> tuple[float, ...]:
    schedule = tuple(float(s) for s in retry_s)
    if any(not 0 <= s < 86_400 * 7 for s in schedule):
        raise ValueError("retry delays must be 0 up to a week, in seconds")
    return schedule


def _timeout(timeout_s: float) -> float:
    if not 0 < timeout_s <= 120:
        raise ValueError("the delivery timeout must be over 0 and at most 120 seconds")
    return float(timeout_s)
