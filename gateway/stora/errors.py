"""The Stora client's errors: which say retry later, which say a person must act.

::

    GatewayError (gateway.errors)
    └── StoraError
        ├── CredentialRejected   retryable = False: a person fixes the credential
        └── TokenUnavailable     retryable = True: no token now, try after retry_after_s

Transport failures (``httpx``) are not raised from here: the client turns them into
outcomes (gateway/stora/answers.py).  See docs/design/idempotency.md.
"""

from __future__ import annotations

from gateway.errors import GatewayError, one_line
from gateway.stora.ratelimit import CREDENTIAL_RETRY_BASE_S

__all__ = ["CredentialRejected", "StoraError", "TokenUnavailable"]


class StoraError(GatewayError):
    """Base of the errors of the Stora client (``gateway.errors`` tree)."""


class CredentialRejected(StoraError):  # noqa: N818 - the name says what to do
    """Stora refused the credential: a person must fix it; retry only slowly.

    Raised for a token endpoint 400/401 (``invalid_client``, ``invalid_grant``, …), an
    unreadable secret or token file, or a 401 to a token just renewed.  ``retry_after_s``
    is the earliest the source will try again.  The message never holds a secret.
    """

    retryable = False

    def __init__(self, message: str, retry_after_s: float = CREDENTIAL_RETRY_BASE_S) -> None:
        super().__init__(one_line(message))
        self.retry_after_s = retry_after_s


class TokenUnavailable(StoraError):  # noqa: N818 - the name says what to do
    """No token now for a passing reason (network, 5xx, 429): retry after ``retry_after_s``."""

    retryable = True

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(one_line(message))
        self.retry_after_s = retry_after_s
