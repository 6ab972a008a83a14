"""Errors raised by lock-controller drivers.

The type tells the caller what to do next::

    DriverError
    ├── RetryableError          transient: the same call may succeed later
    │   ├── LinkDownError       the port is missing or would not open; reopened with backoff
    │   ├── NoReplyError        the controller did not answer within the timeout
    │   └── BadFrameError       a reply arrived but was corrupt or not the one asked for
    └── TechnicianError         retrying will not help: a person must look
        ├── DeviceRejectedError the controller refused the request (e.g. Modbus exception:
        │                       illegal address), usually a wiring or configuration mistake
        └── UnsupportedError    the controller cannot do what was asked

Foreign exceptions (pyserial, pymodbus, OS errors) are translated into these in one
place per driver, with ``raise … from exc``.  A lock that answered but did not move is
*not* an error: the action returns a result with ``confirmed=False``.
"""

from __future__ import annotations


class DriverError(Exception):
    """Base of every driver error."""

    retryable: bool = False


class RetryableError(DriverError):
    """A transient failure: the state is unknown meanwhile; trying again may succeed."""

    retryable = True


class LinkDownError(RetryableError):
    """The serial port (or broker link) is not available; it is reopened with backoff."""


class NoReplyError(RetryableError):
    """The controller did not answer within the per-request timeout."""


class BadFrameError(RetryableError):
    """A reply was corrupt (checksum), truncated, or answered a different request."""


class TechnicianError(DriverError):
    """Retrying will not help: wiring, addressing or configuration needs a person."""


class DeviceRejectedError(TechnicianError):
    """The controller answered with a refusal (e.g. a Modbus exception response)."""


class UnsupportedError(TechnicianError):
    """The controller cannot perform the requested operation."""
