"""Driver for the hex-protocol RS-485 lock-control boards (CU16/CU48-style, KERONG & co).

``frames`` is the protocol as pure code, ``controller`` the driver interface over a
:class:`drivers.link.SerialBus`.  The simulator of boards on a pty is the dev kit's
(``devkit/sims/lockboard.py``), which production code never imports.
"""

from drivers.lockboard.controller import (
    BOARD_PULSE_S,
    SCAN_TIMEOUT_S,
    LockboardController,
    scan,
)
from drivers.lockboard.frames import FrameError

__all__ = ["BOARD_PULSE_S", "SCAN_TIMEOUT_S", "FrameError", "LockboardController", "scan"]
