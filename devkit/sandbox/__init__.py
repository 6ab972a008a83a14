"""``stora-gateway sandbox``: a local stand-in for the Stora Public API.

The outbox promises that each Timeline Event reaches Stora exactly once however the
network, the API or the gateway fail (contract §6).  Stora offers no self-service sandbox
(stora-api §1), so the tests and benchmarks need a peer that speaks the documented API over
real HTTP and fails on demand.  This is it: standard library only (``http.server``), one
process, state in memory, one operator and one app.  Its endpoints, the layers a request
passes, the choices taken where Stora documents nothing, and the admin API are in
docs/design/sandbox.md.

==============  ====================================================================
module          what it holds
==============  ====================================================================
``api``         :class:`Sandbox`: the request pipeline (Stora's endpoints, admin API)
``app``         its state: settings, lifecycle, faults, introspection
``rules``       limits, error shapes, event validation, the sliding-window limiter
``server``      the HTTP server and handler (framing, idle connections)
``serve``       the ``sandbox`` command: secret files, serving in the foreground
==============  ====================================================================
"""

from devkit.sandbox.api import Sandbox
from devkit.sandbox.rules import API_VERSION, EVENT_SCOPE, RequestRecord, max_in_window
from devkit.sandbox.serve import read_secret_file, read_token_file, serve
from devkit.sandbox.server import ConnectionTracking

__all__ = [
    "API_VERSION",
    "EVENT_SCOPE",
    "ConnectionTracking",
    "RequestRecord",
    "Sandbox",
    "max_in_window",
    "read_secret_file",
    "read_token_file",
    "serve",
]
