"""Driver for the hex-protocol RS-485 lock-control boards (CU16/CU48-style, KERONG & co).

``frames`` is the protocol as pure code, ``controller`` the driver interface over a
:class:`drivers.link.SerialBus`.  The simulator of boards on a pty is the dev kit's
(``devkit/sims/lockboard.py``), which production code never imports.

The names below are imported when first used: the config loader reads this
package's ``settings`` on every CLI command, which must not load the driver itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from drivers.lazy import lazy_getattr

if TYPE_CHECKING:
    from drivers.lockboard.controller import (
        BOARD_PULSE_S,
        SCAN_TIMEOUT_S,
        LockboardController,
        scan,
    )
    from drivers.lockboard.frames import FrameError

__all__ = [
    "BOARD_PULSE_S",
    "SCAN_TIMEOUT_S",
    "FrameError",
    "LockboardController",
    "scan",
]

#: Where each name lives, imported on first use (PEP 562).
_LAZY: Final = {
    "BOARD_PULSE_S": "drivers.lockboard.controller",
    "FrameError": "drivers.lockboard.frames",
    "LockboardController": "drivers.lockboard.controller",
    "SCAN_TIMEOUT_S": "drivers.lockboard.controller",
    "scan": "drivers.lockboard.controller",
}

__getattr__ = lazy_getattr(__name__, _LAZY)
