"""Errors of the protocol package, and the one-line rule their messages follow.

::

    SitelinkError      base of every error sitelink raises on purpose
    └── Rejection      a command refused by the verifier; ``reason`` is one contract §4
                       code (:class:`~sitelink.codes.Reason`)

This package imports nothing of the gateway's, so :class:`Rejection` cannot be a
``gateway.errors.GatewayError``; the gateway's verifier raises a subclass that is both
(``gateway.intake.commands.Rejection``, see :attr:`sitelink.verify.Verifier.rejection_type`).
Signing raises the standard ``TypeError`` / ``ValueError`` for a wrong key or claim.
"""

from __future__ import annotations

import functools
from typing import Any, Final

from sitelink.codes import Reason

__all__ = ["ClaimError", "Rejection", "SitelinkError", "json_kind", "one_line", "show"]

_CLOCK_UNTRUSTED: Final = Reason.CLOCK_UNTRUSTED  # read once: a rejection flood pays each


def one_line(text: str) -> str:
    """Return ``text`` with every non-printable character escaped (``\\n`` → ``\\\\n``).

    Values quoted in messages come from files and the network; a newline in one must not
    split a log line or forge a second one, so it is shown escaped rather than dropped.
    """
    if text.isprintable():
        return text
    return "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text
    )


def show(value: object) -> str:
    """A short, single-line rendering of an untrusted value for a message."""
    text = one_line(repr(value))
    return text if len(text) <= 40 else text[:37] + "..."


def json_kind(value: object) -> str:
    """The JSON type of ``value``, for messages: ``a boolean``, ``a string``, …"""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number with a fraction or exponent"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


class SitelinkError(Exception):
    """Base of every error the protocol package raises on purpose.

    ``retryable`` says whether the same operation may succeed if tried again unchanged.
    """

    retryable: bool = False


class ClaimError(ValueError):
    """A claim or JSON problem; the verifier turns it into a ``malformed`` rejection
    whose detail is this message."""


class Rejection(SitelinkError):  # noqa: N818 - the name is the published API
    """A command refused before it could reach the hardware.

    ``reason`` is one contract §4 reason code; ``detail`` is one line for the logs that
    never holds the token, its signature or a key.  ``jti``, ``cmd`` and ``unit`` are
    read from the claims, when they could be read and are printable strings of 1–64
    characters, so the caller can correlate the published result; otherwise ``None``.

    ``claims_verified`` tells whether those three came from signature-verified claims.
    When it is false they are attacker-controlled: fine to echo in a result, but never
    to record as a seen ``jti`` (a forger could otherwise burn the id of a real command).
    ``retryable`` is true only for ``clock_untrusted``: the same token may pass once the
    clock is trusted, if it has not expired by then.
    """

    def __init__(
        self,
        reason: Reason,
        detail: str,
        *,
        jti: str | None = None,
        cmd: str | None = None,
        unit: str | None = None,
        claims_verified: bool = False,
    ) -> None:
        self.reason: Reason = reason
        self.detail = one_line(detail)
        self.jti = jti
        self.cmd = cmd
        self.unit = unit
        self.claims_verified = claims_verified
        self.retryable = reason == _CLOCK_UNTRUSTED
        #: Judged on the claims without the signature check (``screen``); not published.
        self.screened = False
        super().__init__(reason, self.detail)

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception pickling replays self.args only; keep the keyword fields too (and the
        # class: the gateway raises a subclass).
        return (functools.partial(type(self), self.reason, self.detail, jti=self.jti,
                                  cmd=self.cmd, unit=self.unit,
                                  claims_verified=self.claims_verified), ())
