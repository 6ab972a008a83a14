"""The ``osdp`` driver: door strikes and contacts on an OSDP peripheral (PD), via libosdp.

Layers: OSDP framing, sequencing and Secure Channel are libosdp's (a well-kept C library
with Python bindings, imported lazily); ``channel`` carries its bytes over a pyserial
port; ``controller`` is the driver API over libosdp's control panel (CP).  A simulated
PD (libosdp in PD mode) on a pty, for tests and the demo, is the dev kit's
(``devkit/sims/osdp.py``).
"""

from drivers.osdp.controller import (
    SCBK_D,
    OsdpController,
    OsdpTiming,
    ScbkError,
    load_scbk,
)

__all__ = ["SCBK_D", "OsdpController", "OsdpTiming", "ScbkError", "load_scbk"]
