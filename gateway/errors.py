"""Errors raised by the gateway package.

The type tells the caller what to do next::

    GatewayError                  base of every error the gateway raises on purpose
    ├── ConfigError               the configuration file is wrong: a person must edit it
    │                             (``check-config`` and every command exit with status 2)
    ├── HardwareUnavailableError  the config names a driver this build cannot drive
    ├── Rejection                 a command failed verification; ``reason`` is the
    │                             contract §4 code (gateway/intake/commands.py).  Also a
    │                             ``sitelink.errors.Rejection``: the protocol package
    │                             defines the rejection (it cannot import this tree),
    │                             the gateway's verifier raises this subclass of both
    ├── StoreError                the state database (gateway/store/)
    │   ├── StoreFull             disk full: retry once space is freed
    │   ├── StoreBusy             another writer held the lock too long: retry
    │   ├── StoreReadOnly         the filesystem or file is read-only: a person must look
    │   └── StoreCorrupt          failed its integrity check: quarantine and start empty
    └── (gateway/ops/control.py)      the local control socket
        ├── AgentUnavailable      no agent answers: the CLI works directly
        ├── ControlDenied         the caller is not root, the agent's user or its group
        ├── ControlError          the agent refused or failed the request (exit 1 or 2)
        └── ControlSocketError    the socket cannot be served (another agent has it, …)

Driver failures have their own tree in :mod:`drivers.errors`; the gateway never lets a
foreign exception (``OSError``, ``tomllib.TOMLDecodeError``, …) reach the user: it is
translated where it is caught, with ``raise … from exc``.

Every message is a single line, because it ends up as "one clear sentence on stderr"
(contract §2), in a journald entry, or in an MQTT result field.
"""

from __future__ import annotations

# One rule for every message, the protocol's and the gateway's (sitelink/errors.py).
from sitelink.errors import one_line

__all__ = ["ConfigError", "GatewayError", "cap_text", "one_line"]


def cap_text(text: str, limit: int) -> str:
    """``text`` on one line (:func:`one_line`) and at most ``limit`` characters.

    For text from outside that ends up in an alarm, a status or a stored record: what
    was cut is said, ``"…(+1234 chars)"``, so a reader knows there was more.
    """
    text = one_line(text)
    if len(text) <= limit:
        return text
    # The marker's longest form (all of text's digits) bounds its length.
    keep = max(0, limit - len(f"…(+{len(text)} chars)"))
    return text[:keep] + f"…(+{len(text) - keep} chars)"


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose.

    ``retryable`` says whether the same operation may succeed if tried again unchanged.
    """

    retryable: bool = False


class ConfigError(GatewayError):
    """A problem with the configuration file, naming the file, the key and the reason.

    ``key`` is the dotted path of the offending value (``site.id``,
    ``controllers[1].address``, ``commands.trusted_keys.relay-2026``) or ``""`` when the
    problem is with the file as a whole (missing, unreadable, not TOML).

    ``str(err)`` is exactly one line: ``"{file}: {key}: {reason}"``, or
    ``"{file}: {reason}"`` when there is no key.
    """

    retryable = False

    def __init__(self, file: str, key: str, reason: str) -> None:
        self.file = one_line(file)
        self.key = one_line(key)
        self.reason = one_line(reason)
        # Pass the parts on so the exception pickles and reprs like any other.
        super().__init__(self.file, self.key, self.reason)

    def __str__(self) -> str:
        if self.key:
            return f"{self.file}: {self.key}: {self.reason}"
        return f"{self.file}: {self.reason}"
