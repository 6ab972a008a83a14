"""The ``osdp`` driver: door strikes and contacts on an OSDP peripheral (PD), via libosdp.

Layers: OSDP framing, sequencing and Secure Channel are libosdp's (a well-kept C library
with Python bindings, imported lazily); ``channel`` carries its bytes over a pyserial
port; ``controller`` is the driver API over libosdp's control panel (CP).  A simulated
PD (libosdp in PD mode) on a pty, for tests and the demo, is the dev kit's
(``devkit/sims/osdp.py``).

The names below are imported when first used: the config loader reads this
package's ``settings`` on every CLI command, which must not load the driver itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from drivers.lazy import lazy_getattr

if TYPE_CHECKING:
    from drivers.osdp.controller import OsdpController
    from drivers.osdp.settings import SCBK_D, OsdpTiming, ScbkError, load_scbk

__all__ = [
    "SCBK_D",
    "OsdpController",
    "OsdpTiming",
    "ScbkError",
    "load_scbk",
]

#: Where each name lives, imported on first use (PEP 562).
_LAZY: Final = {
    "OsdpController": "drivers.osdp.controller",
    "OsdpTiming": "drivers.osdp.settings",
    "SCBK_D": "drivers.osdp.settings",
    "ScbkError": "drivers.osdp.settings",
    "load_scbk": "drivers.osdp.settings",
}

__getattr__ = lazy_getattr(__name__, _LAZY)
