"""Driver for the hex-protocol RS-485 lock-control boards (CU16/CU48-style, KERONG & co).

``frames`` is the protocol as pure code, ``controller`` the driver interface over a
:class:`drivers.link.SerialBus`, ``sim`` a simulator of boards on a pty.  The simulator is
not imported here: production code should not pay for it.
"""

from drivers.lockboard.controller import (
    BOARD_PULSE_S,
    SCAN_TIMEOUT_S,
    LockboardController,
    scan,
)
from drivers.lockboard.frames import FrameError

__all__ = ["BOARD_PULSE_S", "SCAN_TIMEOUT_S", "FrameError", "LockboardController", "scan"]
