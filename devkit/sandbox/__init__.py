"""``stora-gateway sandbox``: a local stand-in for the Stora Public API.

The outbox promises that each Timeline Event reaches Stora exactly once however the
network, the API or the gateway fail (contract §6).  Stora offers no self-service sandbox
(stora-api §1), so the tests and benchmarks need a peer that speaks the documented API over
real HTTP and fails on demand.  This is it: standard library only (``http.server``), one
process, state in memory.  Since issue 14 it is also "Stora for partners": several
operators with sites and units, a partner app's Authorization Code flow (PKCE, rotating
refresh tokens), webhook endpoints and signed ``unit.updated`` deliveries.  Its
endpoints, the layers a request passes, the choices taken where Stora documents
nothing, and the admin API are in docs/design/sandbox.md.

=================  =====================================================================
module             what it holds
=================  =====================================================================
``api``            :class:`Sandbox`: the request pipeline (Stora's endpoints, admin API)
``partner_admin``  the partner side's admin API (operators, app, OAuth, webhooks)
``partner_api``    the partner endpoints: consent, code and refresh grants, lists
``partner``        the partner side's state and Python admin methods
``app``            its state: settings, lifecycle, faults, introspection
``oauth``          the partner app, codes, grants, PKCE, the consent page
``operators``      operators, sites, units (data and JSON shapes)
``webhooks``       webhook endpoints: validation, shapes, signatures
``delivery``       signed deliveries from a background thread, retries, switches
``listing``        paging and sorting of lists
``rules``          limits, error shapes, event validation, the sliding-window limiter
``server``         the HTTP server and handler (framing, idle connections)
``serve``          the ``sandbox`` command: secret files, demo operator, serving
=================  =====================================================================
"""

from devkit.sandbox.api import Sandbox
from devkit.sandbox.oauth import AUTHORIZE_PATH, PartnerApp, pkce_matches
from devkit.sandbox.operators import DEFAULT_OPERATOR, UNIT_STATUSES
from devkit.sandbox.rules import API_VERSION, EVENT_SCOPE, RequestRecord, max_in_window
from devkit.sandbox.serve import add_demo_operator, read_secret_file, read_token_file, serve
from devkit.sandbox.server import ConnectionTracking
from devkit.sandbox.webhooks import signature

__all__ = [
    "API_VERSION",
    "AUTHORIZE_PATH",
    "DEFAULT_OPERATOR",
    "EVENT_SCOPE",
    "UNIT_STATUSES",
    "ConnectionTracking",
    "PartnerApp",
    "RequestRecord",
    "Sandbox",
    "add_demo_operator",
    "max_in_window",
    "pkce_matches",
    "read_secret_file",
    "read_token_file",
    "serve",
    "signature",
]
